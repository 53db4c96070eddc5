"""Prompt lookup: proposals that cost no model call.

A CommonGen answer copies its concepts from the prompt, and any answer copies phrases from the
text so far; the tokens that followed the latest earlier occurrence of the current tail are a
proposal the target can check in the same call that checks the draft's (an extra row of a
forward over a few tokens costs almost nothing on a memory-bound model)."""

from __future__ import annotations

from collections.abc import Sequence


def lookup(ids: Sequence[int], longest: int, length: int, shortest: int = 1) -> list[int]:
    """Up to `length` tokens that followed the latest earlier occurrence of the last n tokens of
    `ids`, for the largest n in [`shortest`, `longest`] that occurs; [] where none does."""
    ids = list(ids)
    for n in range(min(longest, len(ids) - 1), shortest - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + length]
    return []
