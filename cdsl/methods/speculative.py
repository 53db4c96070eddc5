"""`sd`: speculative decoding (draft d tokens, one target call verifies them; where the draft
doubts its first token, its top few first tokens are drafted as branches and the same one call
verifies them all)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdsl.decoder import unsure
from cdsl.methods.context import Context
from cdsl.methods.greedy import target_step


@dataclass
class Verified:
    """One drafted and verified lookahead, relative to the round's start `base`."""

    tokens: list[int]
    draft_logits: torch.Tensor
    """[len(tokens), V] the draft's logits that produced each token."""
    target_logits: torch.Tensor
    """[len(tokens) + 1, V] the target's logits at every draft position and the bonus one."""
    accepted: int
    next_token: int
    """The target's token after the accepted prefix (correction, or bonus when all passed)."""

    @property
    def acceptance(self) -> float:
        return self.accepted / len(self.tokens)


def draft(ctx: Context, d: int) -> tuple[list[int], torch.Tensor]:
    """The draft rolls out up to d tokens (stopping at EOS, or before a token it gives less
    than `draft_confidence`); one draft call per token."""
    tokens, logits = [], []
    row = ctx.draft.next_logits()
    while True:
        tok = ctx.pick.one(row)
        tokens.append(tok)
        logits.append(row)
        if tok in ctx.ends or len(tokens) == d:
            ctx.draft.push([tok])  # its logits are not needed unless every token passes
            break
        row = ctx.draft.step([tok])[-1]
        if ctx.config.draft_confidence > 0 and unsure(row, ctx.config.draft_confidence):
            break
    return tokens, torch.stack(logits)


def draft_and_verify(ctx: Context, d: int) -> Verified:
    """Draft up to d tokens, then one target call scores all of them."""
    tokens, draft_logits = draft(ctx, d)
    ctx.stats.drafted += len(tokens)
    target_logits = ctx.target.verify(tokens)
    n, nxt = ctx.pick.verify(tokens, draft_logits, target_logits)
    ctx.stats.accepted += n
    return Verified(tokens, draft_logits, target_logits, n, nxt)


def commit_prefix(ctx: Context, v: Verified) -> None:
    """Keep the verified prefix plus the target's own next token (speculative decoding)."""
    keep = ctx.base + v.accepted
    ctx.target.truncate(keep, v.target_logits[v.accepted])
    full = v.accepted == len(v.tokens)
    ctx.draft.truncate(keep, None if full else v.draft_logits[v.accepted])
    ctx.target.push([v.next_token])
    ctx.draft.push([v.next_token])
    ctx.emit(v.tokens[: v.accepted] + [v.next_token])


def cut(ctx: Context, tokens: list[int]) -> list[int]:
    """Tokens up to and including the first that ends the text (nothing is drafted past one)."""
    for i, tok in enumerate(tokens):
        if tok in ctx.ends:
            return tokens[: i + 1]
    return tokens


def matched(tokens: list[int], target_logits: torch.Tensor) -> int:
    """How many leading `tokens` are the target's argmax (`target_logits` [>= len(tokens), V])."""
    hits = target_logits[: len(tokens)].argmax(-1) == torch.tensor(tokens, dtype=torch.long)
    return int(hits.long().cumprod(0).sum())


def branches(ctx: Context, d: int) -> list[int]:
    """The draft's top `draft_branches` first tokens where it gives its best one less than
    `branch_below`; an empty list where this round makes one proposal."""
    cfg = ctx.config
    # a fork needs the target's prefix cached (the first round's call would be a prefill of its
    # own), and extra rows are free only while no other request's rows fill the batch
    if cfg.draft_branches == 1 or not cfg.greedy or d < 2 or not ctx.target.n_cached or ctx.target.others:
        return []
    probs = torch.softmax(ctx.draft.next_logits().float(), -1)
    top = probs.topk(cfg.draft_branches)
    return top.indices.tolist() if float(top.values[0]) < cfg.branch_below else []


def branched_round(ctx: Context, d: int, cands: list[int]) -> None:
    """Greedy SD over several first tokens, each rolled out by the draft (one batched draft call
    per token) and all checked by ONE target call: on a memory-bound model a forward over a few
    rows of a few tokens costs about what one row does. The row the target accepts furthest is
    kept, so the output is still greedy decoding's."""
    drafted = ctx.draft.rollout(cands, d - 1, ctx.pick, ctx.config.draft_confidence, least=0)
    checked = ctx.target.score_rows(cands, drafted.tokens, lead=True)
    rows = [cut(ctx, [c, *row]) for c, row in zip(cands, drafted.tokens.tolist())]
    hits = [matched(row, checked.logits[i]) for i, row in enumerate(rows)]
    best = max(range(len(rows)), key=lambda i: (hits[i], -i))
    n, nxt = hits[best], int(checked.logits[best, hits[best]].argmax())
    ctx.stats.drafted += len(rows[best])
    ctx.stats.accepted += n
    ctx.stats.other_branches += sum(map(len, rows)) - len(rows[best])
    if n:
        ctx.target.adopt(checked, best, n - 1)
        ctx.draft.adopt(drafted, best, n - 1)
    else:  # no branch starts right: the target's own token follows the prefix
        ctx.target.adopt_prefix(checked, checked.logits[0, 0])
        ctx.draft.discard(drafted)
    ctx.target.push([nxt])
    ctx.draft.push([nxt])
    ctx.emit(rows[best][:n] + [nxt])


def crowded(ctx: Context) -> bool:
    """Whether more than `draft_max_others` other requests share the target's batches: their
    rows fill each forward, so drafting would only add work."""
    most = ctx.config.draft_max_others
    return most is not None and ctx.target.others > most


def sd(ctx: Context) -> None:
    while not ctx.finished:
        if crowded(ctx):
            target_step(ctx)
            continue
        ctx.stats.rounds += 1
        d = min(ctx.config.draft_len, ctx.budget)
        cands = branches(ctx, d)
        if cands:
            branched_round(ctx, d, cands)
        else:
            commit_prefix(ctx, draft_and_verify(ctx, d))
