"""Searching ahead: while the reward scores a CDSL search's rows (a reward model on a worker of
its own), the target already rolls out the next round's search, on the guess that the search
keeps its top candidate. The guess usually holds: CDLH's text departs from the target's argmax at
about one token in ten on the hh-rlhf dialogues (docs/speed-bounds.md). Where the reward picks
another row, the round searched ahead is dropped and redone after the winner, so every choice is
the serial loop's and the text is the same.

Only for greedy choices and a reward whose score cannot change how much of the winner's
lookahead is kept (not monotone: a reward model), scored where it runs beside the target (the
reward's `ahead`: `Engine(search_ahead=True)`), for a request alone in their batches. Tokens kept on the guess reach
`ctx.out` at once (the next round reads them) but stream only once the reward has confirmed
them, and a failure while a guess is open takes them back, so a retried request resumes from
confirmed text only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cdsl.decoder import Rollout
from cdsl.methods.context import Context, RewardsLater


@dataclass
class Mark:
    """What a guess changed, to take it back: lengths and counters before the guessed keep."""

    out: int
    tokens: int
    rounds: int
    trace: int
    states: dict[str, int]
    draft_ids: int | None
    logits: torch.Tensor
    """The target's next-token logits at the mark (known: the search's candidates came from them)."""


@dataclass
class Scoring:
    """A search whose rows the reward is scoring, with its top candidate kept for now."""

    rows: list[list[int]]
    logp: torch.Tensor
    """log p of each row's candidate."""
    rolled: Rollout
    kept: Callable[[int], int]
    """How many of row i's rolled tokens are kept if it wins."""
    rewards: RewardsLater
    mark: Mark
    held: list[int] = field(default_factory=list)
    """Tokens kept on the guess, not streamed yet."""
    on_emit: Callable[[list[int]], None] | None = None


def searching_ahead(ctx: Context) -> bool:
    """Whether a search's reward may be left in flight while the next round goes on."""
    # alone only, as drafting ahead: under load other requests' work fills the wait, and a
    # redone round would take target time from them
    return (ctx.config.greedy and not getattr(ctx.reward, "monotone", False) and getattr(ctx.reward, "ahead", False)
            and not ctx.target.others)


def mark(ctx: Context, logits: torch.Tensor) -> Mark:
    s = ctx.stats
    return Mark(len(ctx.out), s.tokens, s.rounds, len(s.state_trace), dict(s.states),
                None if ctx.draft is None else len(ctx.draft.ids), logits)


def restore(ctx: Context, m: Mark) -> None:
    """Back to the mark: the output, the counters of rounds after it, both decoders' tokens (the
    target's cache is cropped by its next call; the draft only had tokens pending)."""
    s = ctx.stats
    del ctx.out[m.out:]
    ctx.finish_reason = None
    s.tokens, s.rounds, s.states = m.tokens, m.rounds, m.states
    del s.state_trace[m.trace:]
    ctx.target.truncate(ctx.base, m.logits)
    if ctx.draft is not None:
        ctx.draft.truncate(m.draft_ids)


def start(ctx: Context, rows: list[list[int]], logp: torch.Tensor, rolled: Rollout, kept: Callable[[int], int],
          keep: Callable) -> Scoring:
    """Send the rows to the reward and keep the top candidate (and its kept tokens) for now."""
    pending = Scoring(rows, logp, rolled, kept, ctx.rewards_later(rows),
                      mark(ctx, ctx.target.next_logits()), on_emit=ctx.on_emit)
    ctx.on_emit = pending.held.extend
    keep(ctx, rolled, None, 0, rows[0], kept(0))
    ctx.stats.ahead_rounds += 1
    return pending


def winner(ctx: Context, pending: Scoring) -> int:
    """The row CDLH chooses (waits for the reward)."""
    return int((pending.logp + ctx.config.reward_weight * pending.rewards()).argmax())


def lost(ctx: Context, pending: Scoring) -> bool:
    """Whether the reward has answered already and another row won: then the round searched on
    the guess can stop where it is (`settle` takes it back)."""
    if not pending.rewards.done():
        return False
    try:
        return winner(ctx, pending) != 0
    except Exception:  # settle raises it, once the round is dropped
        return True


def settle(ctx: Context, pending: Scoring) -> bool:
    """Wait for the reward: True where the top candidate won (its tokens stream now), False
    where another did (the rounds after the mark are taken back and the winner is kept)."""
    ctx.on_emit = pending.on_emit
    try:
        best = winner(ctx, pending)
    except BaseException:
        restore(ctx, pending.mark)
        raise
    if best == 0:
        if pending.held and ctx.on_emit is not None:
            ctx.on_emit(pending.held)
        return True
    restore(ctx, pending.mark)
    ctx.stats.ahead_redone += 1
    kept, rolled = pending.kept(best), pending.rolled
    tokens = pending.rows[best][: kept + 1]
    # the winner's cache row left with the guess: the next call feeds its tokens again, but the
    # logits after them are the search's own (as the serial loop's), so no call is needed first
    ctx.target.push(tokens, rolled.logits[best, kept] if kept < rolled.logits.shape[1] else None)
    if ctx.draft is not None:
        ctx.draft.push(tokens)
    ctx.emit(tokens)
    return False
