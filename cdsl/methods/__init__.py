"""The five decoding methods, by name."""

from __future__ import annotations

from collections.abc import Callable

from cdsl.methods.cdsl import cdsl
from cdsl.methods.context import Context, Generation
from cdsl.methods.greedy import greedy
from cdsl.methods.lookahead import cdlh, cdlh_appx
from cdsl.methods.speculative import sd

METHODS: dict[str, Callable[[Context], None]] = {
    "greedy": greedy,
    "sd": sd,
    "cdlh": cdlh,
    "cdlh-appx": cdlh_appx,
    "cdsl": cdsl,
}
NEEDS_DRAFT = {"sd", "cdlh-appx", "cdsl"}
NEEDS_REWARD = {"cdlh", "cdlh-appx", "cdsl"}

__all__ = ["METHODS", "NEEDS_DRAFT", "NEEDS_REWARD", "Context", "Generation"]
