"""Drafting ahead (PEARL's post-verify) for `sd`: while the target verifies a round's proposal,
the draft writes the next round's, on the guess that the target keeps the whole proposal and
then writes one of the draft's top tokens. Where a guess holds, the next round starts with its
proposal written and only the target's call is on the clock; where none does, the draft's work
is dropped and the round goes on as it would have. Greedy choices only, so the text is greedy
decoding's either way, and only where draft and target are workers of their own (`overlaps`) and
no other request shares their batches (then drafting ahead would take draft time from them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cdsl.decoder import Rollout, Verifying
from cdsl.methods.context import Context
from cdsl.methods.speculative import Verified, commit_prefix, cut, draft_more


@dataclass
class Ahead:
    """The next round's proposal, written while the target verified the last one."""

    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    """The draft's rows that chose each of `tokens`."""


def overlapping(ctx: Context) -> bool:
    """Whether this round drafts ahead: greedy, both models on workers of their own, alone in
    their batches, and no prompt lookup (whose row would join a call drafted ahead of it)."""
    cfg = ctx.config
    # not the first round: its call is the prefill, after which a round may branch
    return (cfg.greedy and ctx.draft is not None and ctx.target.overlaps and ctx.draft.overlaps
            and not cfg.lookup_len and not ctx.target.others and bool(ctx.target.n_cached))


def write_ahead(ctx: Context, tokens: list[int]) -> Rollout | None:
    """While the target verifies `tokens`, the draft guesses the target's next token (its top
    `draft_branches` where it doubts its best, as `sd`'s branches) and rolls each guess out as
    the next round's proposal, in one batched draft call per token. None where no round follows."""
    cfg = ctx.config
    d = min(cfg.draft_len, ctx.budget - len(tokens) - 1)
    if d < 1 or tokens[-1] in ctx.ends:
        return None
    top = torch.softmax(ctx.draft.next_logits().float(), -1).topk(cfg.draft_branches)
    guesses = top.indices.tolist() if float(top.values[0]) < cfg.branch_below else top.indices[:1].tolist()
    return ctx.draft.rollout(guesses, d, ctx.pick, cfg.draft_confidence)  # the first token taken, as `draft` does


def ahead_round(ctx: Context, d: int, ahead: Ahead | None) -> Ahead | None:
    """One `sd` round whose draft work overlaps the target's: it sends `ahead`'s proposal (or
    one drafted now) to the target, rolls out the draft's guesses at the next round while the
    target verifies, and returns the next round's proposal where the target kept the whole
    proposal and then wrote one of the guesses."""
    tokens, logits = (ahead.tokens, ahead.logits) if ahead else ([], [])
    if ahead:
        ctx.stats.ahead_rounds += 1
    else:
        draft_more(ctx, d, tokens, logits)
    draft_logits = torch.stack(logits)
    verifying = ctx.target.verify_later(tokens)
    try:
        guessed = write_ahead(ctx, tokens) if overlapping(ctx) else None
    except BaseException:
        _settle(verifying)  # the target's call must end before this request's caches are freed
        raise
    target_logits = verifying()
    ctx.stats.drafted += len(tokens)
    n, nxt = ctx.pick.verify(tokens, draft_logits, target_logits)
    ctx.stats.accepted += n
    if guessed is not None and n == len(tokens) and nxt in guessed.candidates:
        row = guessed.candidates.index(nxt)
        proposal = cut(ctx, guessed.tokens[row].tolist())
        ctx.stats.ahead_dropped += guessed.tokens.numel() - len(proposal)
        ctx.draft.adopt(guessed, row, len(proposal))  # the draft holds nxt and the proposal after it
        ctx.target.push([nxt])
        ctx.emit(tokens + [nxt])
        return Ahead(proposal, list(guessed.logits[row, : len(proposal)])) if proposal else None
    if guessed is not None:
        ctx.stats.ahead_dropped += guessed.tokens.numel()
        ctx.draft.discard(guessed)
    commit_prefix(ctx, Verified(tokens, draft_logits, target_logits, n, nxt))
    return None


def _settle(verifying: Verifying) -> None:
    try:
        verifying()
    except Exception:  # the error that is already on its way up matters, not this one
        pass


def drop(ctx: Context, ahead: Ahead | None) -> None:
    """Forget a proposal drafted ahead (the round goes another way): the draft returns to the
    round's start, whose next-token row is the proposal's first."""
    if ahead is not None and ahead.tokens:
        ctx.stats.ahead_dropped += len(ahead.tokens)
        ctx.draft.truncate(ctx.base, ahead.logits[0])
