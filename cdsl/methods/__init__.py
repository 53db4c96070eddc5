"""The five decoding methods: the one registry that config validation, the command line, the
engine and the servers read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cdsl.errors import RequestError
from cdsl.methods.cdsl import cdsl
from cdsl.methods.context import Context, Generation
from cdsl.methods.greedy import greedy
from cdsl.methods.lookahead import cdlh, cdlh_appx
from cdsl.methods.sd import sd


@dataclass(frozen=True)
class Method:
    """A decoding method and what it needs."""

    run: Callable[[Context], None]
    """Decodes one generation in place (`Context.emit` until `Context.finished`)."""
    needs_draft: bool
    """Uses the draft model."""
    searches: bool
    """Ranks k candidates with the reward: needs a constraint, and forks k cache rows."""


METHODS: dict[str, Method] = {
    "greedy": Method(greedy, needs_draft=False, searches=False),
    "sd": Method(sd, needs_draft=True, searches=False),
    "cdlh": Method(cdlh, needs_draft=False, searches=True),
    "cdlh-appx": Method(cdlh_appx, needs_draft=True, searches=True),
    "cdsl": Method(cdsl, needs_draft=True, searches=True),
}


def check_inputs(method: str, has_draft: bool, has_reward: bool) -> None:
    """RequestError (a ValueError) when `method` lacks the draft model or the reward it needs."""
    if METHODS[method].needs_draft and not has_draft:
        raise RequestError("method", f"{method!r} needs a draft model, and none is loaded")
    if METHODS[method].searches and not has_reward:
        raise RequestError("constraints", f"method {method!r} needs a reward (e.g. concepts to cover)")


__all__ = ["METHODS", "Context", "Generation", "Method", "check_inputs"]
