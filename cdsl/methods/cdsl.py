"""`cdsl`: search where the reward is at stake, speculate where it is not.

Each round starts from the target's next-token logits (known from the previous round's call):
1. *Stake.* The target's top-k candidates, less those no reward could lift to the top: a
   candidate more than lambda * headroom below the best log-probability cannot win, where the
   headroom is 1 - R(prefix) for a monotone reward (coverage cannot go down) and 1 otherwise.
   r = R(prefix) while two or more candidates remain, else 1 (nothing for the reward to decide).
2. *State.* a = the draft's acceptance so far in this generation (1 before any drafting);
   S1 a >= tau_a, r >= tau_r; S2 a >= tau_a, r < tau_r; S3 a < tau_a, r >= tau_r; S4 both low.
3. *Action,* from `DecodeConfig.policy`:
   - `verified_prefix`: speculative decoding from the top candidate: the draft writes
     `draft_len` tokens, one target call checks them, the candidate and the accepted prefix are
     kept (a token passes while its target probability is at least `accept_ratio` times the
     best; the speculative-sampling test when sampling);
   - `accept_draft`: the same, keeping every drafted token;
   - `cdlh_appx`: a speculative lookahead search: the draft rolls out every candidate, ONE
     target call checks all rows, the reward ranks the rows as the target would continue them
     (accepted tokens plus the target's own token where it disagrees), and the winner's
     candidate and accepted tokens are kept;
   - `cdlh`: a CDLH step whose winning lookahead is kept: the target rolls out every candidate
     `lookahead` tokens (one batched call per position), the reward ranks them, and the winner's
     candidate plus its first L - 1 rolled tokens (the target's own greedy text) are kept.
A round never ends on a correction token: the next round re-decides that position with the
reward, from target logits the round's last call already computed.
"""

from __future__ import annotations

import math

import torch

from cdsl.config import Action, State
from cdsl.decoder import Rollout
from cdsl.methods.context import Context


def classify(a: float, r: float, tau_a: float, tau_r: float) -> State:
    if a >= tau_a:
        return State.S1 if r >= tau_r else State.S2
    return State.S3 if r >= tau_r else State.S4


def stake(ctx: Context, logp: torch.Tensor) -> tuple[list[int], float]:
    """The candidates the reward could still choose (best first) and r (see the module doc)."""
    cfg = ctx.config
    top = logp.topk(min(cfg.k, logp.shape[-1]))
    monotone = getattr(ctx.reward, "monotone", False)
    floor = float(ctx.rewards([[]])[0]) if monotone or not cfg.greedy else 0.0
    if not cfg.greedy:  # sampling may pick any candidate
        return top.indices.tolist(), floor
    keep = top.values >= top.values[0] - cfg.reward_weight * (1.0 - floor)
    cands = top.indices[keep].tolist()
    return cands, (floor if len(cands) > 1 else 1.0)


def cut(ctx: Context, tokens: list[int]) -> list[int]:
    """Tokens up to and including the first EOS."""
    for i, tok in enumerate(tokens):
        if tok in ctx.eos:
            return tokens[: i + 1]
    return tokens


def check(ctx: Context, tokens: list[int], target: torch.Tensor, draft: torch.Tensor) -> tuple[int, int]:
    """How many rolled tokens (after the candidate `tokens[0]`) the target accepts, and its own
    token where it stops. `target` [>= len(tokens), V] predicts each rolled token and the next."""
    rolled = tokens[1:]
    if not ctx.config.greedy:
        return ctx.pick.verify(rolled, draft[: len(rolled)], target[: len(rolled) + 1])
    rows = target[: len(rolled)]
    floor = rows.max(-1).values + math.log(ctx.config.accept_ratio) if ctx.config.accept_ratio else None
    ok = torch.ones(len(rolled), dtype=torch.bool) if floor is None else (
        rows.gather(-1, torch.tensor(rolled, dtype=torch.long)[:, None])[:, 0] >= floor)
    n = int(ok.long().cumprod(0).sum())
    return n, int(target[n].argmax())


def keep(ctx: Context, target: Rollout, draft: Rollout | None, row: int, tokens: list[int], rolled: int) -> None:
    """Emit the candidate of `row` and `rolled` of its tokens; both models continue there."""
    ctx.target.adopt(target, row, rolled)
    if draft is not None:
        ctx.draft.adopt(draft, row, rolled)
    else:
        ctx.draft.ids.extend(tokens[: rolled + 1])  # fed by the draft's next call
    ctx.emit(tokens[: rolled + 1])


def speculate(ctx: Context, cands: list[int], all_drafted: bool) -> None:
    """`verified_prefix` / `accept_draft`: speculative decoding from the top candidate."""
    drafted = ctx.draft.rollout(cands[:1], max(1, min(ctx.config.draft_len, ctx.budget - 1)), ctx.pick)
    tokens = cut(ctx, [cands[0], *drafted.tokens[0].tolist()])
    logits = ctx.target.verify(tokens)  # one row: no forked cache to copy
    n, _ = check(ctx, tokens, logits[1:], drafted.logits[0])
    ctx.stats.drafted += len(tokens) - 1
    ctx.stats.accepted += n
    kept = len(tokens) - 1 if all_drafted else n
    ctx.target.truncate(ctx.base + 1 + kept, logits[kept + 1])
    ctx.draft.adopt(drafted, 0, kept)
    ctx.emit(tokens[: kept + 1])


def search_on_draft(ctx: Context, cands: list[int], logp: torch.Tensor) -> None:
    """`cdlh_appx`: the draft rolls out every candidate, one target call checks every row."""
    drafted = ctx.draft.rollout(cands, max(1, min(ctx.config.draft_len, ctx.budget - 1)), ctx.pick)
    checked = ctx.target.score_rows(cands, drafted.tokens)
    rows, verdicts = [], []
    for i, c in enumerate(cands):
        tokens = cut(ctx, [c, *drafted.tokens[i].tolist()])
        n, nxt = check(ctx, tokens, checked.logits[i], drafted.logits[i])
        verdicts.append((tokens, n))
        rows.append(tokens[: n + 1] + ([] if tokens[n] in ctx.eos else [nxt]))
    best = choose(ctx, logp[cands], rows)
    tokens, n = verdicts[best]
    ctx.stats.drafted += len(tokens) - 1
    ctx.stats.accepted += n
    keep(ctx, checked, drafted, best, tokens, n)


def search_on_target(ctx: Context, cands: list[int], logp: torch.Tensor) -> None:
    """`cdlh`: the target rolls out every candidate; the winner's lookahead is kept."""
    steps = max(1, min(ctx.config.lookahead, ctx.budget - 1))
    rolled = ctx.target.rollout(cands, steps, ctx.pick)
    rows = [cut(ctx, [c, *row]) for c, row in zip(cands, rolled.tokens.tolist())]
    best = choose(ctx, logp[cands], rows)
    keep(ctx, rolled, None, best, rows[best], min(steps - 1, len(rows[best]) - 1))


def choose(ctx: Context, logp: torch.Tensor, rows: list[list[int]]) -> int:
    """CDLH's choice: log p(candidate) + lambda * R(prefix + row)."""
    scores = logp + ctx.config.reward_weight * ctx.rewards(rows)
    return int(scores.argmax()) if ctx.config.greedy else ctx.pick.one(scores)


def cdsl(ctx: Context) -> None:
    cfg = ctx.config
    while not ctx.finished:
        ctx.stats.rounds += 1
        logp = torch.log_softmax(ctx.target.next_logits(), dim=-1)
        cands, r = stake(ctx, logp)
        a = ctx.stats.acceptance if ctx.stats.drafted else 1.0
        state = classify(a, r, cfg.tau_accept, cfg.tau_reward)
        ctx.stats.record_state(state.value)
        action = cfg.policy[state]
        if action in (Action.verified_prefix, Action.accept_draft) or len(cands) == 1:
            speculate(ctx, cands, action is Action.accept_draft)
        elif action is Action.cdlh_appx:
            search_on_draft(ctx, cands, logp)
        else:
            search_on_target(ctx, cands, logp)
