"""`cdlh` and `cdlh-appx`: choose each token by rolling out its top-k candidates.

A CDLH step costs L batched calls of the model that rolls out (k rows sharing the prefix
cache) and k reward scores. The chosen candidate's row of the rollout cache is kept, so the
token after it needs no extra call: `cdlh` costs 1 + N * L target calls for N tokens, one
fewer per token than the textbook 1 + L.
"""

from __future__ import annotations

import torch

from cdsl.decoder import Decoder
from cdsl.methods.context import Context


def cdlh_step(ctx: Context, logits: torch.Tensor, roller: Decoder) -> int:
    """Pick the next token from the target's `logits` at the current output; `roller`
    (target or draft) rolls out the lookaheads and continues from the winner's cache."""
    cfg = ctx.config
    logp = torch.log_softmax(logits, dim=-1)
    candidates = logp.topk(min(cfg.k, logp.shape[-1])).indices.tolist()
    rollout = roller.rollout(candidates, cfg.lookahead, ctx.pick)
    conts = [[c, *row] for c, row in zip(candidates, rollout.tokens.tolist())]
    scores = logp[candidates] + cfg.reward_weight * ctx.rewards(conts)
    best = int(scores.argmax()) if cfg.greedy else ctx.pick.one(scores)
    roller.adopt(rollout, best)
    return candidates[best]


def cdlh(ctx: Context) -> None:
    while not ctx.finished:
        tok = cdlh_step(ctx, ctx.target.next_logits(), ctx.target)
        ctx.emit([tok])


def cdlh_appx(ctx: Context) -> None:
    """CDLH whose lookaheads come from the draft; the target only proposes candidates."""
    while not ctx.finished:
        tok = cdlh_step(ctx, ctx.target.next_logits(), ctx.draft)
        ctx.target.push([tok])
        ctx.emit([tok])
