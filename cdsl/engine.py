"""Many generations at once: each request runs the plain method code in its own thread, and every
model or reward call it makes joins a per-phase `Batcher`, which answers all waiting calls of
that phase with one batched call. Target, draft and reward phases run side by side, so while the
target verifies one batch the draft drafts the next and the reward scores another.

What answers a phase is an `Executor`: in this process a `SeqStore` or `RewardTable`; in
`actors/` a Ray worker with the same interface. The engine never knows which.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from cdsl.constraints import RewardSpec
from cdsl.methods import METHODS, Context, Generation, check_inputs
from cdsl.models import LM, Codec
from cdsl.request import Request
from cdsl.reward_table import RewardCall, RewardTable
from cdsl.rewards import RewardInput
from cdsl.store import CacheLost, SeqStore


class WorkerLost(RuntimeError):
    """A worker died and took its caches with it; the engine re-runs the request from its
    last emitted token."""


class Cancelled(RuntimeError):
    """The request was cancelled (e.g. its HTTP client went away); its caches are freed."""


class Quarantined(ValueError):
    """The request lost a worker a second time while its calls ran alone in their batches, so
    it is the likely cause: it is refused instead of retried until the workers' restarts run out."""


class Executor(Protocol):
    def execute(self, calls: list[Any], released: list[str]) -> list[Any]:
        """Free the `released` keys, then answer `calls` in order, as one batch."""
        ...


class Batcher:
    """Gathers the calls of many request threads into one executor call per batch."""

    def __init__(self, name: str, executor: Executor, expected: Callable[[], int], window_s: float = 0.002) -> None:
        self.name, self.executor, self.expected, self.window_s = name, executor, expected, window_s
        self.pending = 0
        """Calls queued or executing (each waiting request holds at most one)."""
        self.busy_s, self.batches, self.calls = 0.0, 0, 0
        self._queue: queue.Queue = queue.Queue()
        self._released: list[str] = []
        self._held = None
        """A call that must run alone, taken from the queue while gathering: the next batch."""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def run(self, call: Any, alone: bool = False) -> Any:
        """The executor's answer to `call`, batched with others' (`alone`: in a batch of its own)."""
        return self.submit(call, alone).result()

    def submit(self, call: Any, alone: bool = False) -> Future:
        """`run`, answered by the returned future."""
        fut: Future = Future()
        with self._lock:
            self.pending += 1
        fut.add_done_callback(self._answered)
        self._queue.put((call, fut, alone))
        return fut

    def _answered(self, _: Future) -> None:
        with self._lock:
            self.pending -= 1

    def release(self, key: str) -> None:
        with self._lock:
            self._released.append(key)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _gather(self, first) -> list:
        batch = [first]
        if first[2]:
            return batch
        deadline = time.monotonic() + self.window_s
        while True:
            try:
                item = self._queue.get_nowait()
                if item is None:  # closing: after this batch
                    self._queue.put(None)
                    return batch
                if item[2]:  # a call that must run alone opens the next batch
                    self._held = item
                    return batch
                batch.append(item)
                continue
            except queue.Empty:
                pass
            # wait briefly only while requests that could still join are not yet here
            if len(batch) >= self.expected() or time.monotonic() >= deadline:
                return batch
            time.sleep(0.0002)

    def _loop(self) -> None:
        while True:
            try:
                item, self._held = self._held or self._queue.get(timeout=0.05), None
            except queue.Empty:
                if self._released:
                    self._execute([])
                continue
            if item is None:
                return
            self._execute(self._gather(item))

    def _execute(self, batch: list) -> None:
        with self._lock:
            released, self._released = self._released, []
        start = time.perf_counter()
        try:
            results = self.executor.execute([call for call, _, _ in batch], released)
        except BaseException as err:  # every waiting request must hear of it
            for _, fut, _ in batch:
                fut.set_exception(err)
            return
        finally:
            self.busy_s += time.perf_counter() - start
            self.batches += bool(batch)
            self.calls += len(batch)
        for (_, fut, _), result in zip(batch, results):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def utilisation(self, wall_s: float) -> dict:
        return {"busy_share": self.busy_s / wall_s if wall_s else 0.0, "batches": self.batches,
                "calls": self.calls, "mean_batch": self.calls / self.batches if self.batches else 0.0}


class Guarded:
    """One request's view of a batcher: every call first checks that the request still stands,
    so a cancelled request stops at its next model or reward call; a suspect request's calls run
    alone."""

    def __init__(self, batcher: Batcher, cancelled: threading.Event, suspect: threading.Event,
                 others: Callable[[], int] = lambda: 0, overlaps: bool = False) -> None:
        self.batcher, self.cancelled, self.suspect = batcher, cancelled, suspect
        self.others = others
        """Other requests in flight, whose calls share this batcher's batches."""
        self.overlaps = overlaps
        """Whether the method may keep working while a submitted call runs (`Engine.overlap`)."""

    def run(self, call: Any) -> Any:
        return self.submit(call).result()

    def submit(self, call: Any) -> Future:
        if self.cancelled.is_set():
            raise Cancelled("request cancelled")
        return self.batcher.submit(call, alone=self.suspect.is_set())

    def release(self, key: str) -> None:
        self.batcher.release(key)


class BatchedReward:
    """The `Reward` protocol for one request, answered through the reward batcher."""

    def __init__(self, batcher: Guarded, spec: RewardSpec, ahead: bool = False) -> None:
        self.batcher, self.spec, self.ahead = batcher, spec, ahead
        """`ahead`: CDSL may leave a search's scoring in flight and search on (`Engine.search_ahead`)."""
        self.monotone, self.one_sentence = spec.monotone, spec.one_sentence

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return self.submit(batch).result()

    def submit(self, batch: Sequence[RewardInput]) -> Future:
        """`score`, answered by a future (CDSL searches ahead while it runs)."""
        return self.batcher.submit(RewardCall(self.spec, tuple(batch)))


def cache_tokens(request: Request, prompt_tokens: int) -> int:
    """KV-cache tokens one request may hold at its peak, a conservative bound: prompt + output,
    times `k` for the methods whose search forks `k` rows."""
    rows = request.config.k if METHODS[request.config.method].searches else 1
    return (prompt_tokens + request.config.max_new_tokens) * rows


class Engine:
    """Runs many requests at once over three executors (target, draft, reward)."""

    def __init__(self, codec: Codec, target: Executor, draft: Executor | None = None,
                 reward: Executor | None = None, window_s: float = 0.002, max_retries: int = 3,
                 max_tokens_held: int | None = None, overlap: bool = False, search_ahead: bool = False) -> None:
        """`max_tokens_held`: most KV-cache tokens the requests in flight may reserve together
        (see `cache_tokens`); a request waits until its share fits, one that could never fit is
        refused. None: no bound. `overlap`: a request running alone drafts its next `sd` round
        while the target verifies this one (worth it where target and draft are separate
        workers). `search_ahead`: a `cdsl` request alone, scored by a reward model, searches its
        next round while the reward executor scores this one (worth it where that executor is a
        worker of its own)."""
        self.codec, self.max_retries, self.max_tokens_held = codec, max_retries, max_tokens_held
        self.overlap, self.search_ahead = overlap, search_ahead
        self.active = 0
        self.tokens_held = self.peak_tokens_held = 0
        self._room = threading.Condition()
        self._lock = threading.Lock()
        self._attempts = itertools.count()
        self.started = time.perf_counter()
        self.phases = {name: Batcher(name, ex, self._expected(name), window_s)
                       for name, ex in [("target", target), ("draft", draft), ("reward", reward or RewardTable())]
                       if ex is not None}
        self.retries = 0
        self.quarantined = 0
        """Requests refused after a second worker loss while running alone (`Quarantined`)."""
        self.cancelled = 0
        """Requests stopped by `cancel`."""
        self._live: dict[str, list[threading.Event]] = {}

    def cancel(self, request_id: str) -> bool:
        """Stop a running request at its next model or reward call (its caches are freed);
        False if no such request is running."""
        with self._lock:
            events = list(self._live.get(request_id, ()))
        for event in events:
            event.set()
        return bool(events)

    @property
    def running(self) -> list[str]:
        """Ids of the requests in flight."""
        with self._lock:
            return list(self._live)

    def _others(self) -> int:
        return max(0, self.active - 1)

    def _expected(self, name: str) -> Callable[[], int]:
        def expected() -> int:
            elsewhere = sum(b.pending for n, b in self.phases.items() if n != name)
            return max(1, self.active - elsewhere)
        return expected

    def generate(self, request: Request, on_emit: Callable[[list[int]], None] | None = None) -> Generation:
        """Run one request to the end (blocking; call from many threads at once)."""
        config = request.config
        check_inputs(config.method, "draft" in self.phases, request.reward is not None)
        stop, suspect = threading.Event(), threading.Event()
        phases = {name: Guarded(b, stop, suspect, self._others, self.overlap) for name, b in self.phases.items()}
        reward = BatchedReward(phases["reward"], request.reward, self.search_ahead) if request.reward else None
        with self._lock:
            self._live.setdefault(request.id, []).append(stop)
        start, out, stats = time.perf_counter(), [], None
        held, admitted = 0, False
        try:
            held = self._admit(request, stop)
            with self._lock:  # batchers wait for admitted requests only
                self.active += 1
                admitted = True
            for attempt in range(self.max_retries + 1):
                ctx = Context(request.prompt, phases["target"], phases.get("draft"), reward, config,
                              codec=self.codec, key=f"{request.id}#{next(self._attempts)}", out=out, stats=stats)
                ctx.on_emit = on_emit
                try:
                    METHODS[config.method].run(ctx)
                    break
                except (WorkerLost, CacheLost) as err:
                    if isinstance(err, WorkerLost) and suspect.is_set():
                        self.quarantined += 1
                        raise Quarantined(f"request {request.id}: a worker died while running it alone, after "
                                          f"an earlier worker loss in its batch; refused, not retried ({err})") from err
                    if attempt == self.max_retries:
                        raise
                    if isinstance(err, WorkerLost):  # it was in the batch that lost the worker: a suspect
                        suspect.set()
                    out, stats = list(ctx.out), ctx.stats  # resume from the last emitted token
                    self.retries += 1
                except Cancelled:
                    self.cancelled += 1
                    raise
                finally:
                    ctx.close()
        finally:
            with self._room:
                self.tokens_held -= held
                self._room.notify_all()
            with self._lock:
                self.active -= admitted
                self._live[request.id].remove(stop)
                if not self._live[request.id]:
                    del self._live[request.id]
        ctx.stats.time_total = time.perf_counter() - start
        return ctx.result()

    def _admit(self, request: Request, stop: threading.Event) -> int:
        """Wait until the request's cache tokens fit under `max_tokens_held`; returns them."""
        if self.max_tokens_held is None:
            return 0
        need = cache_tokens(request, len(self.codec.prompt_ids(request.prompt)))
        if need > self.max_tokens_held:
            raise ValueError(f"prompt + max_new_tokens: this request may hold {need} KV-cache tokens, more than "
                             f"the engine's max_tokens_held of {self.max_tokens_held}")
        with self._room:
            while self.tokens_held + need > self.max_tokens_held:
                if stop.is_set():
                    raise Cancelled("request cancelled")
                self._room.wait(timeout=0.1)
            self.tokens_held += need
            self.peak_tokens_held = max(self.peak_tokens_held, self.tokens_held)
        return need

    def generate_many(self, requests: Sequence[Request], concurrency: int = 64) -> list[Generation]:
        """All requests, up to `concurrency` in flight; results in input order."""
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(self.generate, requests))

    def stream(self, request: Request) -> Iterator[str | Generation]:
        """Text pieces as they are emitted; the last item is the `Generation`. Closing the
        iterator early cancels the request."""
        pieces: queue.Queue = queue.Queue()
        emitted: list[int] = []
        sent = ""

        def on_emit(tokens: list[int]) -> None:
            nonlocal sent
            emitted.extend(tokens)
            # a character split across tokens decodes as U+FFFD until its last byte arrives
            text = self.codec.decode(emitted).rstrip("\ufffd")
            if len(text) > len(sent) and text.startswith(sent):
                pieces.put(text[len(sent):])
                sent = text

        def work() -> None:
            try:
                result = self.generate(request, on_emit)
                if len(result.text) > len(sent):
                    pieces.put(result.text[len(sent):])
                pieces.put(result)
            except BaseException as err:
                pieces.put(err)

        threading.Thread(target=work, daemon=True).start()
        done = False
        try:
            while True:
                item = pieces.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = isinstance(item, Generation)
                yield item
                if done:
                    return
        finally:
            if not done:  # the consumer stopped listening: stop the request and free its caches
                self.cancel(request.id)

    def reset_utilisation(self) -> None:
        """Start a new measurement window (e.g. after a warm-up)."""
        self.started = time.perf_counter()
        for b in self.phases.values():
            b.busy_s, b.batches, b.calls = 0.0, 0, 0

    def utilisation(self) -> dict:
        """Per phase since start or the last reset: share of wall time busy, batches, calls, mean batch."""
        wall = time.perf_counter() - self.started
        return {name: b.utilisation(wall) for name, b in self.phases.items()}

    def close(self) -> None:
        for b in self.phases.values():
            b.close()


def local_engine(target: LM, draft: LM | None = None, window_s: float = 0.002, overlap: bool = False) -> Engine:
    """An engine whose executors are stores in this process over `target` and `draft`."""
    return Engine(target, SeqStore(target), SeqStore(draft) if draft is not None else None, RewardTable(), window_s,
                  overlap=overlap)
