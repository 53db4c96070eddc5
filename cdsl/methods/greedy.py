"""`greedy`: one target call per token."""

from __future__ import annotations

from cdsl.methods.context import Context


def take(ctx: Context, tok: int) -> None:
    """Emit `tok` as the target's own next token (a draft, if any, reads it with its next call)."""
    ctx.target.push([tok])
    if ctx.draft is not None:
        ctx.draft.push([tok])
    ctx.emit([tok])


def target_step(ctx: Context) -> None:
    """Emit the target's next token."""
    take(ctx, ctx.pick.one(ctx.target.next_logits()))


def greedy(ctx: Context) -> None:
    while not ctx.finished:
        target_step(ctx)
