"""`cdsl`: rounds of draft, verify, score, act, with the action chosen by state.

a = accepted / drafted, r = the reward's progress score of prefix + draft.
S1 (a >= tau_a, r >= tau_r), S2 (a >= tau_a, r < tau_r), S3 (a < tau_a, r >= tau_r), S4 (both
low); `DecodeConfig.policy` maps each state to an `Action`.
"""

from __future__ import annotations

from cdsl.config import Action, State
from cdsl.methods.context import Context
from cdsl.methods.lookahead import cdlh_step
from cdsl.methods.speculative import Verified, commit_all, commit_prefix, draft_and_verify


def classify(a: float, r: float, tau_a: float, tau_r: float) -> State:
    if a >= tau_a:
        return State.S1 if r >= tau_r else State.S2
    return State.S3 if r >= tau_r else State.S4


def lookahead_step(ctx: Context, v: Verified, on_target: bool) -> None:
    """One CDLH step at the round's start, from the target logits the verify call already
    computed; rolled out by the target (S4 default) or the draft (S2 default)."""
    base = ctx.base
    ctx.target.truncate(base, v.target_logits[0])
    ctx.draft.truncate(base, v.draft_logits[0])
    roller, other = (ctx.target, ctx.draft) if on_target else (ctx.draft, ctx.target)
    tok = cdlh_step(ctx, v.target_logits[0], roller)
    other.ids.append(tok)
    ctx.emit([tok])


def cdsl(ctx: Context) -> None:
    cfg = ctx.config
    while not ctx.finished:
        ctx.stats.rounds += 1
        v = draft_and_verify(ctx, min(cfg.draft_len, ctx.budget))
        r = float(ctx.rewards([v.tokens], progress=True)[0])
        state = classify(v.acceptance, r, cfg.tau_accept, cfg.tau_reward)
        ctx.stats.record_state(state.value)
        action = cfg.policy[state]
        if action is Action.accept_draft:
            commit_all(ctx, v)
        elif action is Action.verified_prefix:
            commit_prefix(ctx, v)
        else:
            lookahead_step(ctx, v, on_target=action is Action.cdlh)
