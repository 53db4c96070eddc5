"""`cdsl`: search where the reward is at stake, speculate where it is not.

Each round starts from the target's next-token logits (known from the previous round's call):
1. *Stake.* The target's top-k candidates, less those no reward could lift to the top: a
   candidate more than lambda * room below the best log-probability cannot win a CDLH step,
   where room = 1 - R(prefix) for a monotone reward (coverage cannot go down), `reward_range`
   for a reward model, 0 once R(prefix) >= tau_r, times `gain_share`. r = R(prefix) while two
   or more candidates remain, else 1 (nothing for the reward to decide).
2. *State.* a = the draft's acceptance so far in this generation (1 before any drafting);
   S1 a >= tau_a, r >= tau_r; S2 a >= tau_a, r < tau_r; S3 a < tau_a, r >= tau_r; S4 both low.
3. *Action,* from `DecodeConfig.policy`:
   - `verified_prefix`: speculative decoding from the top candidate: the draft writes
     `draft_len` tokens, one target call checks them (a token passes while its target
     probability is at least `accept_ratio` times the best; the speculative-sampling test when
     sampling), and the candidate and the passed tokens are kept;
   - `accept_draft`: the same, keeping every drafted token;
   - `cdlh_appx`: a speculative lookahead search: the draft rolls out every candidate, ONE
     target call checks all rows, the reward ranks the rows as the target would continue them
     (passed tokens plus the target's own token where it disagrees), and the winner's
     candidate and passed tokens are kept;
   - `cdlh`: a CDLH step whose lookahead is kept: the target rolls out every candidate
     `lookahead` tokens (one batched call per position), the reward ranks them, and the winner's
     candidate and rolled tokens (the target's own greedy text) are kept.
Tokens after the candidate are kept only while they are *settled*: the target's top two differ
by more than lambda * room there, so CDLH would take the argmax too. With greedy choices, a
monotone reward and gain_share = 1 the output is therefore CDLH's own. A round never ends on a
correction token: the next round decides that position with the reward, from target logits the
round's last call already computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from cdsl.config import Action, State
from cdsl.decoder import Rollout
from cdsl.methods.context import Context
from cdsl.methods.greedy import take
from cdsl.methods.search_ahead import Scoring, lost, restore, searching_ahead, settle, start
from cdsl.methods.speculative import crowded, cut, looked_up, novel


def classify(a: float, r: float, tau_a: float, tau_r: float) -> State:
    if a >= tau_a:
        return State.S1 if r >= tau_r else State.S2
    return State.S3 if r >= tau_r else State.S4


def headroom(ctx: Context) -> tuple[float, float]:
    """R(prefix) and the most any continuation can add to it that matters: nothing once the
    prefix reaches tau_r, else 1 - R(prefix) for a monotone reward (coverage cannot go down) and
    `reward_range` for a reward model, times `gain_share`."""
    cfg = ctx.config
    monotone = getattr(ctx.reward, "monotone", False)
    # a reward model's prefix score only matters against a threshold it can reach
    floor = float(ctx.rewards([[]])[0]) if monotone or not cfg.greedy or cfg.tau_reward < 1.0 else 0.0
    if floor >= cfg.tau_reward:
        return floor, 0.0
    return floor, (1.0 - floor if monotone else cfg.reward_range) * cfg.gain_share


def stake(ctx: Context, logp: torch.Tensor, room: float) -> list[int]:
    """The top-k candidates the reward could still choose, best first: one candidate more than
    lambda * room below the best log-probability cannot win."""
    top = logp.topk(min(ctx.config.k, logp.shape[-1]))
    if not ctx.config.greedy:  # sampling may pick any candidate
        return top.indices.tolist()
    return top.indices[top.values >= top.values[0] - ctx.config.reward_weight * room].tolist()


def settled(ctx: Context, rows: torch.Tensor, room: float) -> int:
    """How many leading positions of `rows` [T, V] (target logits) leave the reward nothing to
    decide: there CDLH would take the target's argmax too, so no search is needed."""
    if not ctx.config.greedy:
        return len(rows)
    if ctx.config.k == 1 or not len(rows):
        return len(rows)
    top = rows.topk(2, dim=-1).values
    ok = top[:, 0] - top[:, 1] > ctx.config.reward_weight * room
    return int(ok.long().cumprod(0).sum())


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
        ctx.draft.push(tokens[: rolled + 1])
    ctx.emit(tokens[: rolled + 1])


@dataclass
class Speculation:
    """The top candidate's proposals (the draft's; prompt lookup's where it adds one), checked by
    one target call; the one that passes furthest is kept."""

    tokens: list[int]
    """The candidate, then the kept proposal's tokens (cut after an end token)."""
    target_logits: torch.Tensor
    """[len(tokens) + 1, V] the target's logits before the candidate and after every token."""
    drafted: Rollout
    passed: int
    """Proposed tokens that pass the target's check and leave the reward nothing to decide."""
    checked: Rollout | None = None
    """The target's forked cache where two proposals were checked (row 1 is prompt lookup's)."""
    row: int = 0


def propose(ctx: Context, cands: list[int], room: float, lookup: bool = True) -> Speculation:
    """The draft writes up to `draft_len` tokens after the top candidate, prompt lookup proposes
    its own, and one target call checks them. A token passes only where the reward has nothing
    to decide. `lookup` False: the draft's proposal only."""
    drafted = ctx.draft.rollout(cands[:1], max(1, min(ctx.config.draft_len, ctx.budget - 1)), ctx.pick,
                                ctx.config.draft_confidence)
    tokens = cut(ctx, [cands[0], *drafted.tokens[0].tolist()])
    looked = [cands[0], *(looked_up(ctx, cands[:1]) if lookup else [])]
    if len(looked) == 1 or not novel([tokens], looked):
        logits = ctx.target.verify(tokens)  # one row: no forked cache to copy
        n, _ = check(ctx, tokens, logits[1:], drafted.logits[0])
        return Speculation(tokens, logits, drafted, min(n, settled(ctx, logits[1: len(tokens)], room)))
    rows = [tokens, cut(ctx, looked)]
    width = max(map(len, rows))
    rest = torch.tensor([row[1:] + row[-1:] * (width - len(row)) for row in rows], dtype=torch.long)
    checked = ctx.target.score_rows(cands[:1] * 2, rest, lead=True)
    passed = []
    for i, row in enumerate(rows):
        logits = checked.logits[i, : len(row) + 1]
        n, _ = check(ctx, row, logits[1:], drafted.logits[0])
        passed.append(min(n, settled(ctx, logits[1: len(row)], room)))
    best = int(passed[1] > passed[0])
    return Speculation(rows[best], checked.logits[best, : len(rows[best]) + 1], drafted, passed[best], checked, best)


def commit(ctx: Context, s: Speculation, kept: int) -> None:
    """Emit the candidate and `kept` proposed tokens; both models continue there."""
    ctx.stats.drafted += len(s.tokens) - 1
    ctx.stats.accepted += s.passed
    if s.checked is None:
        ctx.target.truncate(ctx.base + 1 + kept, s.target_logits[kept + 1])
    else:
        ctx.target.adopt(s.checked, s.row, kept)
    ours = s.drafted.tokens[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, s.tokens[1: kept + 1])) if a != b), min(len(ours), kept))
    ctx.draft.adopt(s.drafted, 0, same)
    ctx.draft.push(s.tokens[1 + same: kept + 1])
    if s.row:
        ctx.stats.looked_up += s.passed
    ctx.emit(s.tokens[: kept + 1])


def speculate(ctx: Context, cands: list[int], room: float, all_drafted: bool) -> None:
    """`verified_prefix` (keep the passed tokens) / `accept_draft` (keep every drafted token)."""
    s = propose(ctx, cands, room, lookup=not all_drafted)  # unchecked tokens kept: the draft's only
    commit(ctx, s, len(s.tokens) - 1 if all_drafted else s.passed)


def search_on_draft(ctx: Context, cands: list[int], logp: torch.Tensor, room: float) -> None:
    """`cdlh_appx`: the draft rolls out every candidate, one target call checks every row."""
    drafted = ctx.draft.rollout(cands, max(1, min(ctx.config.draft_len, ctx.budget - 1)), ctx.pick)
    checked = ctx.target.score_rows(cands, drafted.tokens)
    rows, verdicts = [], []
    for i, c in enumerate(cands):
        tokens = cut(ctx, [c, *drafted.tokens[i].tolist()])
        n, nxt = check(ctx, tokens, checked.logits[i], drafted.logits[i])
        verdicts.append((tokens, min(n, settled(ctx, checked.logits[i, : len(tokens) - 1], room))))
        rows.append(tokens[: n + 1] + ([] if tokens[n] in ctx.ends else [nxt]))
    best, _ = choose(ctx, logp[cands], rows)
    tokens, n = verdicts[best]
    ctx.stats.drafted += len(tokens) - 1
    ctx.stats.accepted += n
    keep(ctx, checked, drafted, best, tokens, n)


def roll_candidates(ctx: Context, cands: list[int], stop: Callable[[], bool] | None = None
                    ) -> tuple[Rollout, list[list[int]]]:
    """The target rolls out every candidate `lookahead` tokens (one batched call per position;
    the full L even near the budget: CDLH's reward sees it too); each row cut after an end.
    `stop`: the rollout is no longer needed (see `Decoder.rollout`)."""
    rolled = ctx.target.rollout(cands, ctx.config.lookahead, ctx.pick, stop=stop)
    return rolled, [cut(ctx, [c, *row]) for c, row in zip(cands, rolled.tokens.tolist())]


def kept_of(ctx: Context, rolled: Rollout, rows: list[list[int]], room: float, row: int) -> int:
    """How many of row `row`'s rolled tokens the reward leaves nothing to decide (its last
    token stays a lookahead: the logits after it are not computed)."""
    upto = min(ctx.config.lookahead - 1, len(rows[row]) - 1)
    return settled(ctx, rolled.logits[row, :upto], room)


def search_on_target(ctx: Context, cands: list[int], logp: torch.Tensor, room: float,
                     rolled: Rollout | None = None, rows: list[list[int]] | None = None) -> Scoring | None:
    """`cdlh`: the reward ranks the target's rollouts of every candidate and the winner's
    lookahead is kept as far as the reward has nothing to decide. Where the reward is scored
    elsewhere, the top row is kept while it scores (`search_ahead`): the reward's answer,
    returned as a `Scoring`, is waited for in the next round. `rolled`, `rows`: the rollouts,
    where the caller made them (`roll_candidates`)."""
    if rolled is None or rows is None:
        rolled, rows = roll_candidates(ctx, cands)
    if searching_ahead(ctx):
        return start(ctx, rows, logp[cands], rolled, partial(kept_of, ctx, rolled, rows, room), keep)
    best, reward = choose(ctx, logp[cands], rows)
    if getattr(ctx.reward, "monotone", False) and ctx.config.greedy:
        # CDLH's lookahead from any of the winner's rolled tokens contains the rest of the
        # winner's row, so its reward there is at least this row's: only 1 - that is left to gain
        room = min(room, (1.0 - reward) * ctx.config.gain_share)
    keep(ctx, rolled, None, best, rows[best], kept_of(ctx, rolled, rows, room, best))
    return None


def choose(ctx: Context, logp: torch.Tensor, rows: list[list[int]]) -> tuple[int, float]:
    """CDLH's choice, log p(candidate) + lambda * R(prefix + row): the row and its reward."""
    rewards = ctx.rewards(rows)
    scores = logp + ctx.config.reward_weight * rewards
    best = int(scores.argmax()) if ctx.config.greedy else ctx.pick.one(scores)
    return best, float(rewards[best])


def cdsl(ctx: Context) -> None:
    pending: Scoring | None = None  # a search whose reward is in flight (search_ahead)
    try:
        while not ctx.finished:
            pending = one_round(ctx, pending)
            if ctx.finished and pending is not None:
                settle(ctx, pending)  # where another row wins, the text goes on
                pending = None
    except BaseException:
        if pending is not None:  # a retry resumes from confirmed text only
            ctx.on_emit = pending.on_emit
            restore(ctx, pending.mark)
        raise


def one_round(ctx: Context, pending: Scoring | None) -> Scoring | None:
    """One round; `pending` is the last search's reward in flight, settled before this round
    emits anything or sends its own rows to the reward (a search's target rollout goes first).
    Returns this round's own reward in flight, if any."""
    cfg = ctx.config
    ctx.stats.rounds += 1
    logp = torch.log_softmax(ctx.target.next_logits(), dim=-1)
    floor, room = headroom(ctx)
    cands = stake(ctx, logp, room)
    r = floor if len(cands) > 1 else 1.0
    a = ctx.stats.acceptance if ctx.stats.drafted else 1.0
    state = classify(a, r, cfg.tau_accept, cfg.tau_reward)
    ctx.stats.record_state(state.value)
    action = cfg.policy[state]
    if action is Action.cdlh and len(cands) > 1:
        # searched on a guess, the rollout ends as soon as the reward says another row won
        rolled, rows = roll_candidates(ctx, cands, None if pending is None else partial(lost, ctx, pending))
        if pending is not None and not settle(ctx, pending):
            ctx.target.discard(rolled)  # this round was searched after the wrong row
            return None
        return search_on_target(ctx, cands, logp, room, rolled, rows)
    if pending is not None and not settle(ctx, pending):
        return None
    if action in (Action.verified_prefix, Action.accept_draft) or len(cands) == 1:
        if action is not Action.accept_draft and cfg.greedy and crowded(ctx):
            take(ctx, cands[0])  # what speculation would emit first; the next round goes on
        else:
            speculate(ctx, cands, room, action is Action.accept_draft)
    else:
        search_on_draft(ctx, cands, logp, room)
    return None
