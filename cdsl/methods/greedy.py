"""`greedy`: one target call per token."""

from __future__ import annotations

from cdsl.methods.context import Context


def greedy(ctx: Context) -> None:
    while not ctx.finished:
        tok = ctx.pick.one(ctx.target.next_logits())
        ctx.target.push([tok])
        ctx.emit([tok])
