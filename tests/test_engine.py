"""The batched store and the many-request engine compute exactly what one request alone does."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cdsl.config import DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.engine import Cancelled, Engine, Quarantined, RewardTable, WorkerLost, local_engine
from cdsl.generate import generate
from cdsl.request import Request
from cdsl.rewards import Coverage
from cdsl.store import Run, SeqStore

from .conftest import FAMILIES

CONCEPTS = [["dog", "frisbee", "catch", "throw"], ["child", "river", "stone"], ["cook", "dinner", "kitchen", "wife"],
            ["cat", "sleep"]]
PROMPTS = [f"Concepts: {', '.join(c)}\nSentence:" for c in CONCEPTS] + ["The child", "A man"]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_forward_equals_separate(pairs, family):
    """Caches of different lengths, forks and several widths in one forward: same logits as alone."""
    target, _ = pairs[family]
    prompts = [target.encode(p) for p in PROMPTS[:3]]
    alone, batched = SeqStore(target), SeqStore(target)
    calls = [Run(f"s{i}", [ids], 0) for i, ids in enumerate(prompts)]
    ref = [alone.run([c])[0] for c in calls]
    got = batched.run(calls)
    steps = [Run("s0", [[5, 6, 7]], len(prompts[0])), Run("s1", [[9]], len(prompts[1])),
             Run("s2:r", [[3], [4]], len(prompts[2]) - 1, fork="s2", last_only=True)]
    ref += [alone.run([c])[0] for c in steps]
    got += batched.run(steps)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-9)


def _requests(methods, d=3):
    reqs = []
    for i, prompt in enumerate(PROMPTS):
        method = methods[i % len(methods)]
        # sd drafting and not branching whatever the load, so that a request's calls are the same
        # in the engine as alone (the load-dependent defaults have a test of their own)
        cfg = DecodeConfig(method=method, max_new_tokens=20, draft_len=d, k=3, lookahead=2, draft_max_others=None,
                           draft_branches=1)
        reqs.append(Request(prompt, cfg, RewardSpec(concepts=CONCEPTS[i % len(CONCEPTS)])))
    return reqs


def _engine_matches_alone(pair, reqs: list[Request]) -> dict:
    """Run `reqs` together in a local engine, check each against a lone `generate`; the
    engine's utilisation."""
    target, draft = pair
    engine = local_engine(target, draft)
    try:
        outs = engine.generate_many(reqs, concurrency=len(reqs))
        use = engine.utilisation()
    finally:
        engine.close()
    for req, out in zip(reqs, outs):
        ref = generate(req.prompt, target, draft, Coverage(req.reward.concepts), req.config)
        assert out.token_ids == ref.token_ids, req.config
        assert out.stats.states == ref.stats.states
        assert out.stats.target_calls == ref.stats.target_calls
    return use


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_equals_one_at_a_time(pairs, family):
    use = _engine_matches_alone(pairs[family], _requests(["greedy", "sd", "cdlh", "cdlh-appx", "cdsl"]) * 2)
    assert use["target"]["mean_batch"] > 1.5  # calls of different requests really shared forwards
    assert set(use) == {"target", "draft", "reward"}


def test_sd_in_a_busy_engine_takes_plain_steps_and_writes_the_same_text(pairs):
    """With the defaults, concurrent sd requests stop drafting while they share the engine
    (their rows fill its batches), and each still writes what it writes alone."""
    target, draft = pairs["llama"]
    reqs = [Request(p, DecodeConfig(method="sd", max_new_tokens=20, branch_below=1.0)) for p in PROMPTS]
    engine = local_engine(target, draft)
    try:
        outs = engine.generate_many(reqs, concurrency=len(reqs))
    finally:
        engine.close()
    alone = [generate(r.prompt, target, draft, None, r.config) for r in reqs]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert sum(o.stats.drafted for o in outs) < sum(a.stats.drafted for a in alone)
    assert sum(o.stats.other_branches for o in outs) < sum(a.stats.other_branches for a in alone)


def test_cdsl_in_a_busy_engine_writes_the_same_text_with_fewer_drafts(pairs):
    target, _ = pairs["llama"]
    draft = target  # always right, with a light reward weight: settled stretches to speculate
    reqs = [Request(p, DecodeConfig(method="cdsl", max_new_tokens=20, k=3, lookahead=2, reward_weight=0.5),
                    RewardSpec(concepts=CONCEPTS[i % len(CONCEPTS)])) for i, p in enumerate(PROMPTS)]
    engine = local_engine(target, draft)
    try:
        outs = engine.generate_many(reqs, concurrency=len(reqs))
    finally:
        engine.close()
    alone = [generate(r.prompt, target, draft, Coverage(r.reward.concepts), r.config) for r in reqs]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert sum(o.stats.draft_calls for o in outs) < sum(a.stats.draft_calls for a in alone)


def test_engine_frees_caches(pairs):
    target, draft = pairs["llama"]
    t_store, d_store = SeqStore(target), SeqStore(draft)
    engine = Engine(target, t_store, d_store, RewardTable())
    try:
        engine.generate_many(_requests(["cdsl", "cdlh-appx"]), concurrency=4)
        deadline = time.monotonic() + 2  # releases travel with the next batch, or alone when idle
        while (len(t_store) or len(d_store)) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert len(t_store) == len(d_store) == 0


def test_stream_pieces_add_up(pairs):
    target, draft = pairs["llama"]
    engine = local_engine(target, draft)
    try:
        items = list(engine.stream(_requests(["cdsl"])[0]))
    finally:
        engine.close()
    *pieces, result = items
    assert len(pieces) > 1 and "".join(pieces) == result.text


class Flaky:
    """A store that loses all its caches once, mid-generation, like a restarted worker."""

    def __init__(self, lm, fail_after: int) -> None:
        self.store, self.left = SeqStore(lm), fail_after

    def execute(self, calls, released):
        self.left -= 1
        if self.left == 0:
            self.store.caches.clear()
            raise WorkerLost("draft worker restarted")
        return self.store.execute(calls, released)


def test_lost_worker_resumes_from_last_token(pairs):
    target, draft = pairs["llama"]
    reqs = _requests(["cdsl", "sd"])
    engine = Engine(target, SeqStore(target), Flaky(draft, fail_after=12), RewardTable())
    try:
        outs = engine.generate_many(reqs, concurrency=len(reqs))
    finally:
        engine.close()
    assert engine.retries >= 1
    for req, out in zip(reqs, outs):
        ref = generate(req.prompt, target, draft, Coverage(req.reward.concepts), req.config)
        assert out.token_ids == ref.token_ids


class Poisoned:
    """A target store that dies (losing every cache, like a restarted worker) whenever a batch
    holds a call of the request named `poison`."""

    def __init__(self, lm, poison: str) -> None:
        self.store, self.poison, self.deaths = SeqStore(lm), poison, 0

    def execute(self, calls, released):
        if any(call.key.startswith(self.poison + "#") for call in calls):
            self.deaths += 1
            self.store.caches.clear()
            raise WorkerLost("target worker died")
        return self.store.execute(calls, released)


def test_a_request_that_kills_workers_twice_is_quarantined(pairs):
    """It is refused after its second loss (the one while running alone) instead of using up
    every retry; the requests that shared its batches resume and finish with their lone answers."""
    target, draft = pairs["llama"]
    reqs = _requests(["greedy", "cdsl"])[:5]
    poison = Request(PROMPTS[5], DecodeConfig(method="greedy", max_new_tokens=20), None, id="poison")
    store = Poisoned(target, "poison")
    engine = Engine(target, store, SeqStore(draft), RewardTable(), max_retries=3)
    try:
        with ThreadPoolExecutor(len(reqs) + 1) as pool:
            bad = pool.submit(engine.generate, poison)
            outs = list(pool.map(engine.generate, reqs))
            with pytest.raises(Quarantined, match="request poison"):
                bad.result()
    finally:
        engine.close()
    assert store.deaths == 2 and engine.quarantined == 1  # before: max_retries + 1 = 4 deaths, then WorkerLost
    for req, out in zip(reqs, outs):
        ref = generate(req.prompt, target, draft, Coverage(req.reward.concepts), req.config)
        assert out.token_ids == ref.token_ids


def test_engine_refuses_missing_parts(pairs):
    target, _ = pairs["llama"]
    engine = local_engine(target)
    try:
        with pytest.raises(ValueError, match="needs a draft"):
            engine.generate(Request("x", DecodeConfig(method="sd")))
        with pytest.raises(ValueError, match="needs a reward"):
            engine.generate(Request("x", DecodeConfig(method="cdlh")))
    finally:
        engine.close()


def test_cancel_stops_a_request_and_frees_its_caches(pairs):
    """A cancelled request stops at its next call, raises Cancelled, and leaves no cache behind;
    the other requests in flight finish normally."""
    target, draft = pairs["llama"]
    t_store, d_store = SeqStore(target), SeqStore(draft)
    engine = Engine(target, t_store, d_store, RewardTable())
    long = Request(PROMPTS[0], DecodeConfig(method="cdlh", max_new_tokens=400, k=5, lookahead=6),
                   RewardSpec(concepts=CONCEPTS[0]))
    try:
        stream = engine.stream(long)
        first = next(stream)  # the request is running and has emitted text
        assert isinstance(first, str) and long.id in engine.running
        assert engine.cancel(long.id) and not engine.cancel("no-such-request")
        with pytest.raises(Cancelled):
            list(stream)
        other = engine.generate(_requests(["cdsl"])[0])
        assert other.stats.tokens > 0
        deadline = time.monotonic() + 2
        while (len(t_store) or len(d_store)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.cancelled == 1 and not engine.running
        assert len(t_store) == len(d_store) == 0
        # closing a stream early cancels its request too
        stream = engine.stream(Request(long.prompt, long.config, long.reward))
        next(stream)
        stream.close()
        deadline = time.monotonic() + 5
        while engine.cancelled < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.cancelled == 2
    finally:
        engine.close()


def test_engine_equals_one_at_a_time_for_every_cdsl_action(pairs):
    """Every CDSL action's calls (forked rows with several tokens each, adopted rollouts of both
    models) give in the engine what they give alone."""
    reqs = []
    for i, action in enumerate(["verified_prefix", "accept_draft", "cdlh_appx", "cdlh"] * 2):
        policy = {s: action for s in ("S1", "S2", "S3", "S4")}
        cfg = DecodeConfig(method="cdsl", max_new_tokens=16, draft_len=3, k=3, lookahead=2,
                           reward_weight=0.5 + i, accept_ratio=0.2, policy=policy, draft_max_others=None)
        reqs.append(Request(PROMPTS[i % len(PROMPTS)], cfg, RewardSpec(concepts=CONCEPTS[i % len(CONCEPTS)])))
    _engine_matches_alone(pairs["llama"], reqs)


def test_admission_bounds_the_cache_tokens_held(pairs):
    """With `max_tokens_held` room for about two requests, the requests in flight never reserve
    more than that, every request still gets its lone answer, and one that could never fit is
    refused by name."""
    from cdsl.engine import cache_tokens

    target, draft = pairs["llama"]
    reqs = _requests(["greedy", "cdlh", "cdsl"])
    needs = [cache_tokens(r, len(target.prompt_ids(r.prompt))) for r in reqs]
    budget = sorted(needs)[-1] + sorted(needs)[-2]
    engine = Engine(target, SeqStore(target), SeqStore(draft), RewardTable(), max_tokens_held=budget)
    try:
        outs = engine.generate_many(reqs, concurrency=len(reqs))
        assert 0 < engine.peak_tokens_held <= budget < sum(needs) and engine.tokens_held == 0
        with pytest.raises(ValueError, match=f"more than the engine's max_tokens_held of {budget}"):
            engine.generate(Request(reqs[0].prompt, DecodeConfig(method="greedy", max_new_tokens=budget),
                                    reqs[0].reward))
    finally:
        engine.close()
    for req, out in zip(reqs, outs):
        assert out.token_ids == generate(req.prompt, target, draft, Coverage(req.reward.concepts), req.config).token_ids


def test_long_lived_views_do_not_pin_whole_batches(pairs):
    """Each key keeps a view of its batch's output; once most of a batch's keys are gone, the
    rest get copies, so a short cache does not pin the long ones' memory."""
    target, _ = pairs["llama"]
    store = SeqStore(target)
    prompts = [target.encode(p) for p in PROMPTS[:4]] + [target.encode("A")]
    store.run([Run(f"s{i}", [ids], 0) for i, ids in enumerate(prompts)])
    short = _own_bytes(store.caches["s4"])
    assert store.held_bytes() > 10 * short  # one batch, viewed by all five
    for i in range(4):
        store.release(f"s{i}")
    assert store.held_bytes() == short  # before: the whole batch stayed alive behind s4's view
    ref = SeqStore(target)
    ref.run([Run("s4", [prompts[4]], 0)])
    step = Run("s4", [[7]], len(prompts[4]))
    assert torch.allclose(store.run([step])[0], ref.run([step])[0], atol=1e-9)  # the copy is the same cache


def _own_bytes(kv) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv or ())
