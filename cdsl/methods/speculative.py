"""`sd`: plain speculative decoding (draft d tokens, one target call verifies them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdsl.decoder import unsure
from cdsl.methods.context import Context


@dataclass
class Verified:
    """One drafted and verified lookahead, relative to the round's start `base`."""

    tokens: list[int]
    draft_logits: torch.Tensor
    """[len(tokens), V] the draft's logits that produced each token."""
    target_logits: torch.Tensor
    """[len(tokens) + 1, V] the target's logits at every draft position and the bonus one."""
    accepted: int
    next_token: int
    """The target's token after the accepted prefix (correction, or bonus when all passed)."""

    @property
    def acceptance(self) -> float:
        return self.accepted / len(self.tokens)


def draft(ctx: Context, d: int, stop: Callable[[torch.Tensor], bool] | None = None) -> tuple[list[int], torch.Tensor]:
    """The draft rolls out up to d tokens (stopping at EOS, or before a token it gives less
    than `draft_confidence`); one draft call per token. `stop(logits)`, if given, replaces the
    confidence rule: whether to end the proposal before the token those logits would give."""
    tokens, logits = [], []
    row = ctx.draft.next_logits()
    while True:
        tok = ctx.pick.one(row)
        tokens.append(tok)
        logits.append(row)
        if tok in ctx.eos or len(tokens) == d:
            ctx.draft.push([tok])  # its logits are not needed unless every token passes
            break
        row = ctx.draft.step([tok])[-1]
        doubtful = stop(row) if stop is not None else (
            ctx.config.draft_confidence > 0 and unsure(row, ctx.config.draft_confidence))
        if doubtful:
            break
    return tokens, torch.stack(logits)


def draft_and_verify(ctx: Context, d: int, stop: Callable[[torch.Tensor], bool] | None = None) -> Verified:
    """Draft d tokens (see `draft` for `stop`), then one target call scores all of them."""
    tokens, draft_logits = draft(ctx, d, stop)
    ctx.stats.drafted += len(tokens)
    target_logits = ctx.target.verify(tokens)
    n, nxt = ctx.pick.verify(tokens, draft_logits, target_logits)
    ctx.stats.accepted += n
    return Verified(tokens, draft_logits, target_logits, n, nxt)


def commit_prefix(ctx: Context, v: Verified) -> None:
    """Keep the verified prefix plus the target's own next token (speculative decoding)."""
    keep = ctx.base + v.accepted
    ctx.target.truncate(keep, v.target_logits[v.accepted])
    full = v.accepted == len(v.tokens)
    ctx.draft.truncate(keep, None if full else v.draft_logits[v.accepted])
    ctx.target.push([v.next_token])
    ctx.draft.push([v.next_token])
    ctx.emit(v.tokens[: v.accepted] + [v.next_token])


def sd(ctx: Context) -> None:
    while not ctx.finished:
        ctx.stats.rounds += 1
        commit_prefix(ctx, draft_and_verify(ctx, min(ctx.config.draft_len, ctx.budget)))
