"""`sd`'s round loop: each round is a plain one (draft, then one target call), a branched one, one
with prompt lookup's row, or one that drafts the next round while the target verifies."""

from __future__ import annotations

from cdsl.methods.context import Context
from cdsl.methods.greedy import target_step
from cdsl.methods.overlap import ahead_round, drop, overlapping
from cdsl.methods.speculative import (
    branched_round,
    branches,
    commit_prefix,
    crowded,
    draft_and_verify,
    lined_round,
    looked_up,
)


def sd(ctx: Context) -> None:
    ahead = None  # the next proposal, where the draft wrote it during the last verification
    while not ctx.finished:
        if crowded(ctx):
            drop(ctx, ahead)
            ahead = None
            target_step(ctx)
            continue
        ctx.stats.rounds += 1
        d = min(ctx.config.draft_len, ctx.budget)
        if ahead is not None:  # the draft's guesses were its branches
            ahead = ahead_round(ctx, d, ahead)
            continue
        cands, looked = branches(ctx, d), looked_up(ctx)
        if cands:
            branched_round(ctx, d, cands, looked)
        elif looked:
            lined_round(ctx, d, looked)
        elif overlapping(ctx):
            ahead = ahead_round(ctx, d, None)
        else:
            commit_prefix(ctx, draft_and_verify(ctx, d))
