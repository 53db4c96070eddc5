"""`sd`: speculative decoding (draft d tokens, one target call verifies them; where the draft
doubts its first token, its top few first tokens are drafted as branches, and prompt lookup's
proposal is one more row: the same one call verifies them all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdsl.decoder import Rollout, unsure
from cdsl.methods.context import Context
from cdsl.methods.ngram import lookup


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
    draft_more(ctx, d, tokens, logits)
    return tokens, torch.stack(logits)


def draft_more(ctx: Context, d: int, tokens: list[int], logits: list[torch.Tensor],
               go_on: Callable[[], bool] = lambda: True) -> bool:
    """Extend the proposal `tokens` (the rows that chose them in `logits`) in place, as `draft`
    writes it; before each draft call, stop if `go_on()` is false. True when the proposal is
    complete, False when `go_on` cut it (calling again resumes it)."""
    row = ctx.draft.next_logits()
    confidence = ctx.config.draft_confidence
    while True:
        if tokens and confidence > 0 and unsure(row, confidence):
            return True
        tok = ctx.pick.one(row)
        tokens.append(tok)
        logits.append(row)
        if tok in ctx.ends or len(tokens) == d:
            ctx.draft.push([tok])  # its logits are not needed unless every token passes
            return True
        if not go_on():
            ctx.draft.push([tok])
            return False
        row = ctx.draft.step([tok])[-1]


def draft_and_verify(ctx: Context, d: int) -> Verified:
    """Draft up to d tokens, then one target call scores all of them."""
    return verify_line(ctx, *draft(ctx, d))


def verify_line(ctx: Context, tokens: list[int], draft_logits: torch.Tensor) -> Verified:
    """One target call scores the drafted `tokens` (the draft's own cache holds them)."""
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


def looked_up(ctx: Context, after: list[int] = ()) -> list[int]:
    """Prompt lookup's proposal after the text so far and `after` (cut after an end token); []
    where it finds none, or where its row would not be free: sampling, the first call (a
    prefill of its own), or other requests' rows filling the batch."""
    cfg = ctx.config
    if not cfg.lookup_len or not cfg.greedy or not ctx.target.n_cached or ctx.target.others:
        return []
    room = min(cfg.lookup_len, ctx.budget - len(after))
    found = lookup(ctx.target.ids + list(after), cfg.lookup_ngram, room, cfg.lookup_shortest) if room > 0 else []
    return cut(ctx, found)


def novel(rows: list[list[int]], row: list[int]) -> bool:
    """Whether `row` proposes anything that no row of `rows` already starts with."""
    return bool(row) and not any(other[: len(row)] == row for other in rows)


def verify_rows(ctx: Context, rows: list[list[int]]) -> tuple[Rollout, int, int, int]:
    """ONE target call over every row (padded to one width; a pad is only ever accepted where it
    is the target's own token): the cache, the row accepted furthest (the earliest on a tie),
    how far, and the target's token after that."""
    width = max(map(len, rows))
    padded = [row + row[-1:] * (width - len(row)) for row in rows]
    rest = torch.tensor([row[1:] for row in padded], dtype=torch.long).reshape(len(rows), width - 1)
    checked = ctx.target.score_rows([row[0] for row in padded], rest, lead=True)
    hits = [matched(row, checked.logits[i]) for i, row in enumerate(rows)]
    best = max(range(len(rows)), key=lambda i: (hits[i], -i))
    n = hits[best]
    ctx.stats.drafted += len(rows[best])
    ctx.stats.accepted += n
    ctx.stats.other_branches += sum(map(len, rows)) - len(rows[best])
    if n:
        ctx.target.adopt(checked, best, n - 1)
    else:  # no row starts right: the target's own token follows the prefix
        ctx.target.adopt_prefix(checked, checked.logits[0, 0])
    return checked, best, n, int(checked.logits[best, n].argmax())


def finish_round(ctx: Context, kept: list[int], nxt: int) -> None:
    """Both models continue after the kept tokens and the target's own next one."""
    ctx.target.push([nxt])
    ctx.draft.push([nxt])
    ctx.emit(kept + [nxt])


def branched_round(ctx: Context, d: int, cands: list[int], looked: list[int] = ()) -> None:
    """Greedy SD over several first tokens, each rolled out by the draft (one batched draft call
    per token), and prompt lookup's row, all checked by ONE target call: on a memory-bound model
    a forward over a few rows of a few tokens costs about what one row does. The row the target
    accepts furthest is kept, so the output is still greedy decoding's."""
    drafted = ctx.draft.rollout(cands, d - 1, ctx.pick, ctx.config.draft_confidence, least=0)
    rows = [cut(ctx, [c, *row]) for c, row in zip(cands, drafted.tokens.tolist())]
    if novel(rows, list(looked)):
        rows.append(list(looked))
    _, best, n, nxt = verify_rows(ctx, rows)
    if n and best < len(cands):
        ctx.draft.adopt(drafted, best, n - 1)
    else:
        ctx.draft.discard(drafted)
        ctx.draft.push(rows[best][:n])
    if best == len(cands):
        ctx.stats.looked_up += n
    finish_round(ctx, rows[best][:n], nxt)


def lined_round(ctx: Context, d: int, looked: list[int]) -> None:
    """The draft's one proposal and prompt lookup's, checked by one target call (one row, no
    forked cache, where lookup adds nothing)."""
    tokens, draft_logits = draft(ctx, d)
    if not novel([tokens], looked):
        commit_prefix(ctx, verify_line(ctx, tokens, draft_logits))
        return
    _, best, n, nxt = verify_rows(ctx, [tokens, looked])
    kept = [tokens, looked][best][:n]
    same = next((i for i, (a, b) in enumerate(zip(tokens, kept)) if a != b), min(len(tokens), n))
    ctx.draft.truncate(ctx.base + same, draft_logits[same] if same < len(tokens) else None)
    ctx.draft.push(kept[same:])
    if best == 1:
        ctx.stats.looked_up += n
    finish_round(ctx, kept, nxt)


def crowded(ctx: Context) -> bool:
    """Whether more than `draft_max_others` other requests share the target's batches: their
    rows fill each forward, so drafting would only add work."""
    most = ctx.config.draft_max_others
    return most is not None and ctx.target.others > most
