"""One sequence's view of a model: its token ids, how many are cached, and the next logits.

The cache itself lives wherever the `Runner` keeps it (a `SeqStore` in this process, or a Ray
worker), under this decoder's key; only token ids go out and logits come back. Tokens appended
but not yet run through the model are "pending": the next call feeds them with any new ones, so
the first call of a generation is the prefill. Cropping and adopting a rollout row cost no call:
they travel with the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from cdsl.models import LM
from cdsl.rules import NoRepeat
from cdsl.stats import Role, Stats
from cdsl.store import Run, SeqStore


class Runner(Protocol):
    """Where a decoder's forwards go."""

    overlaps: bool
    """Whether a `submit`ted call runs while its caller goes on (a worker of its own), so work
    on the other model can hide behind it."""

    def run(self, call: Run) -> torch.Tensor:
        """Logits of one `Run` ([rows, T, V], or [rows, V] when `last_only`)."""
        ...

    def submit(self, call: Run) -> Future:
        """`run`, answered by the returned future."""
        ...

    def release(self, key: str) -> None:
        """Free the caches of `key` and its rollouts."""
        ...

    def others(self) -> int:
        """How many other generations share this runner's batches right now."""
        ...


class LocalRunner:
    """Runs each call at once on a store in this process."""

    overlaps = False

    def __init__(self, store: SeqStore) -> None:
        self.store = store

    def run(self, call: Run) -> torch.Tensor:
        (out,) = self.store.run([call])
        if isinstance(out, Exception):
            raise out
        return out

    def submit(self, call: Run) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self.run(call))
        except Exception as err:
            fut.set_exception(err)
        return fut

    def release(self, key: str) -> None:
        self.store.release(key)

    def others(self) -> int:
        return 0


def unsure(logits: torch.Tensor, confidence: float) -> bool:
    """Whether no row of `logits` [..., V] gives any token probability `confidence` or more."""
    return bool(torch.softmax(logits.float(), -1).amax(-1).max() < confidence)


SHARED_PENDING = 4
"""A rollout feeds at most this many uncached prefix tokens in every row (saving a call); a
longer pending stretch, or a prompt with no cache yet to fork, is run once first instead."""


@dataclass
class Rollout:
    """k candidate tokens, each followed by `steps` rolled-out tokens, in a forked cache."""

    candidates: list[int]
    tokens: torch.Tensor
    """[k, steps] rolled-out tokens after each candidate."""
    logits: torch.Tensor
    """[k, steps, V]: `logits[:, j]` chose `tokens[:, j]` (so `[:, 0]` follows the candidate)."""
    key: str
    """The forked cache, one row per candidate."""
    lead: int = 0
    """1 where `logits[:, 0]` predicts the candidates (`score_rows(lead=True)`): every later
    index is one further on."""

    @property
    def first_logits(self) -> torch.Tensor:
        """[k, V] next-token logits right after each candidate."""
        return self.logits[:, 0]


class Answer:
    """A call in flight; `result()` waits for its logits (masked by the decoder's rule) and
    counts the call."""

    def __init__(self, decoder: Decoder, future: Future, before: list[list[int]], tokens: list[list[int]],
                 last_only: bool, start: float) -> None:
        self.decoder, self.future, self.before, self.tokens = decoder, future, before, tokens
        self.last_only, self.start = last_only, start

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> torch.Tensor:
        dec = self.decoder
        try:
            logits = self.future.result()
        finally:
            dec.stats.count_call(dec.role, time.perf_counter() - self.start)
        if dec.rule is None:
            return logits
        if self.last_only:
            return dec.rule.mask(logits[:, None], self.before, self.tokens)[:, 0]
        return dec.rule.mask(logits, self.before, self.tokens)


class Verifying:
    """A decoder's `verify` in flight: calling it waits for the logits and brings the decoder
    up to date."""

    def __init__(self, decoder: Decoder, answer: Answer, known: torch.Tensor | None, new: int) -> None:
        self.decoder, self.answer, self.known, self.new = decoder, answer, known, new

    def done(self) -> bool:
        return self.answer.done()

    def __call__(self) -> torch.Tensor:
        rows = self.answer.result()[0]
        dec = self.decoder
        dec.n_cached, dec.logits = len(dec.ids), rows[-1]
        if self.known is not None:
            rows = torch.cat([self.known[None], rows])
        return rows[-(self.new + 1):]


class Decoder:
    """One sequence on one model: token ids, a cache over a prefix of them, call accounting."""

    def __init__(self, source: LM | Runner, ids: list[int], stats: Stats, role: Role | str, key: str = "seq",
                 rule: NoRepeat | None = None) -> None:
        """`rule`, if given, is part of this model's next-token distribution: every logits row
        a call returns has the tokens it bans at -inf."""
        self.runner: Runner = LocalRunner(SeqStore(source)) if isinstance(source, LM) else source
        self.stats, self.role, self.key, self.rule = stats, Role(role), key, rule
        self.ids = list(ids)
        self.n_cached = 0
        self.logits: torch.Tensor | None = None
        self._moves: list[tuple[str, str, int]] = []
        self._rollouts = 0
        self._known: tuple[int, torch.Tensor] | None = None  # (len(ids), logits) pushed tokens came with

    def _run(self, key: str, tokens: list[list[int]], keep: int, fork: str | None = None,
             last_only: bool = False, before: list[list[int]] | None = None) -> torch.Tensor:
        """One call feeding `tokens[i]` in row i after `before[i]` (default: the first `keep` ids)."""
        return self._submit(key, tokens, keep, fork, last_only, before).result()

    def _submit(self, key: str, tokens: list[list[int]], keep: int, fork: str | None = None,
                last_only: bool = False, before: list[list[int]] | None = None) -> Answer:
        call = Run(key, tokens, keep, self._moves, fork, last_only)
        self._moves = []
        before = before if before is not None or self.rule is None else [self.ids[:keep]] * len(tokens)
        start = time.perf_counter()  # before submit: an in-process runner answers inside it
        return Answer(self, self.runner.submit(call), before, tokens, last_only, start)

    @property
    def overlaps(self) -> bool:
        """Whether a call of this decoder runs while its caller works on the other model."""
        return getattr(self.runner, "overlaps", False)

    def push(self, tokens: list[int], logits: torch.Tensor | None = None) -> None:
        """Append tokens whose logits nobody needs yet: they stay pending, and the next call
        feeds them (an emitted token costs no call of its own). `logits`, the next-token logits
        after them where already known (from a rollout), answer `next_logits` without a call."""
        self.ids.extend(tokens)
        self._known = None if logits is None else (len(self.ids), logits)

    def step(self, new: list[int] = (), last_only: bool = False) -> torch.Tensor:
        """Append `new`, run every uncached token; logits [T, V] for the positions fed ([1, V],
        the last, with `last_only`: a prefill then returns one row, not one per prompt token)."""
        self.ids.extend(new)
        fed = self.ids[self.n_cached:]
        if not fed:
            return self.logits[None]
        self._known = None
        logits = self._run(self.key, [fed], self.n_cached, last_only=last_only)[0]
        if last_only:
            logits = logits[None]
        self.n_cached = len(self.ids)
        self.logits = logits[-1]
        return logits

    def verify(self, new: list[int]) -> torch.Tensor:
        """Append `new`; logits [len(new) + 1, V] predicting each new token and the one after."""
        return self.verify_later(new)()

    def verify_later(self, new: list[int]) -> Verifying:
        """`verify`, issued now and answered when the result is called; meanwhile the caller may
        work on the other model, but not on this decoder."""
        known = self.logits if self.n_cached == len(self.ids) else None
        self.ids.extend(new)
        return Verifying(self, self._submit(self.key, [self.ids[self.n_cached:]], self.n_cached), known, len(new))

    def next_logits(self) -> torch.Tensor:
        """Logits [V] for the token after `ids`."""
        if self._known is not None and self._known[0] == len(self.ids):
            return self._known[1]
        return self.step(last_only=True)[-1]

    def truncate(self, length: int, logits: torch.Tensor | None = None) -> None:
        """Keep the first `length` tokens (the cache is cropped by the next call). `logits`, the
        known next-token logits after them, saves a call; without it the last token stays pending."""
        del self.ids[length:]
        self._known = None
        if length < self.n_cached or (length == self.n_cached and self.logits is None):
            self.n_cached = length if logits is not None else length - 1
            self.logits = logits

    def _pending_for_rows(self) -> list[int]:
        """Uncached prefix tokens that forked rows can feed themselves (a long stretch, such as a
        prompt, is run once here instead)."""
        pending = self.ids[self.n_cached:]
        if len(pending) > SHARED_PENDING or not self.n_cached:
            self.step(last_only=True)
            return []
        return pending

    def _fork_key(self) -> str:
        self._rollouts += 1
        return f"{self.key}:rollout{self._rollouts}"

    def rollout(self, candidates: list[int], steps: int, pick, confidence: float = 0.0, least: int = 1,
                stop: Callable[[], bool] | None = None) -> Rollout:
        """Roll each candidate out `steps` tokens in one batched call per step, forking the
        prefix cache. `pick(logits [k, V]) -> [k]` chooses each next token. With `confidence`,
        the rollout ends early (after at least `least` rolled tokens) once the first row's next
        token has less than that probability under this model: a token the model itself doubts
        is likely rejected, and the first row is its own best guess. `stop`, asked before every
        call after the first: True ends the rollout there (one its caller no longer needs)."""
        pending = self._pending_for_rows()
        key, base = self._fork_key(), self.n_cached
        feed, out, rows = [[*pending, c] for c in candidates], [], []
        history = [self.ids[:base]] * len(candidates)  # each row's ids before its fed tokens
        for i in range(steps):
            if i and stop is not None and stop():
                break
            keep = base + len(pending) + i if i else base
            logits = self._run(key, feed, keep, fork=self.key if i == 0 else None, last_only=True, before=history)
            if i >= least and confidence and unsure(logits[:1], confidence):
                break
            picked = pick(logits)
            rows.append(logits)
            out.append(picked[:, None])
            history = [h + f for h, f in zip(history, feed)]
            feed = picked[:, None].tolist()
        if not rows:
            return Rollout(list(candidates), torch.empty(len(feed), 0, dtype=torch.long),
                           logits.new_empty(len(feed), 0, logits.shape[-1]), key)
        return Rollout(list(candidates), torch.cat(out, dim=1), torch.stack(rows, dim=1), key)

    def score_rows(self, candidates: list[int], tokens: torch.Tensor, lead: bool = False) -> Rollout:
        """One batched call over candidate + `tokens` [k, steps] per row, forking the prefix
        cache: logits [k, steps + 1, V] after each fed token (the last one is the bonus). With
        `lead`, the logits that predict the candidates come first ([k, steps + 2, V]): computed
        in the same call from the last pending token, or the ones already known."""
        pending = self._pending_for_rows()
        known = None if pending else self.logits
        key = self._fork_key()
        feed = [[*pending, c, *row] for c, row in zip(candidates, tokens.tolist())]
        logits = self._run(key, feed, self.n_cached, fork=self.key)
        if not lead:
            logits = logits[:, len(pending):]
        elif pending:
            logits = logits[:, len(pending) - 1:]
        else:
            logits = torch.cat([known.expand(len(feed), 1, -1), logits], dim=1)
        return Rollout(list(candidates), tokens, logits, key, int(lead))

    def adopt(self, rollout: Rollout, row: int, keep: int = 0) -> None:
        """Continue from candidate `row` of a rollout and its first `keep` rolled tokens: that
        cache row replaces this one's."""
        self._moves.append((self.key, rollout.key, row))
        self._known = None
        self.ids.append(rollout.candidates[row])
        self.ids.extend(rollout.tokens[row, :keep].tolist())
        if keep + rollout.lead < rollout.logits.shape[1]:
            self.n_cached, self.logits = len(self.ids), rollout.logits[row, keep + rollout.lead]
        else:  # a rollout never feeds its last token: it stays pending
            self.n_cached, self.logits = len(self.ids) - 1, None

    def adopt_prefix(self, rollout: Rollout, logits: torch.Tensor) -> None:
        """Keep none of a rollout's candidates but take its cache of the prefix, pending tokens
        included (they were fed in every row); `logits` are the next-token logits after it."""
        self._moves.append((self.key, rollout.key, 0))
        self._known = None
        self.n_cached, self.logits = len(self.ids), logits

    def discard(self, rollout: Rollout) -> None:
        """Drop a rollout that will not be adopted."""
        self.runner.release(rollout.key)

    @property
    def others(self) -> int:
        """How many other generations' calls share this model's batches right now."""
        return self.runner.others()

    def close(self) -> None:
        """Free this sequence's caches wherever they live."""
        self.runner.release(self.key)
