"""Drafting ahead (`Engine(overlap=True)`): the draft writes the next sd round while the target
verifies this one, the text is greedy decoding's, and a worker lost mid-round loses nothing."""

import threading
import time

import pytest

from cdsl.config import DecodeConfig
from cdsl.engine import Engine, RewardTable, WorkerLost
from cdsl.generate import generate
from cdsl.request import Request
from cdsl.store import SeqStore

PROMPTS = ["Concepts: dog, frisbee, catch, throw\nSentence:", "The child", "A man is cooking"]


class Slow:
    """A target store whose every call takes `delay_s` longer (a large model on its own worker),
    and which says while it is busy."""

    def __init__(self, lm, delay_s: float = 0.01) -> None:
        self.store, self.delay_s, self.busy = SeqStore(lm), delay_s, threading.Event()

    def execute(self, calls, released):
        self.busy.set()
        try:
            time.sleep(self.delay_s)
            return self.store.execute(calls, released)
        finally:
            self.busy.clear()


class LostWhileTargetBusy:
    """A draft store that loses every cache once, on its `nth` call made while the target is busy."""

    def __init__(self, lm, target: Slow, nth: int = 3) -> None:
        self.store, self.target, self.left, self.deaths = SeqStore(lm), target, nth, 0

    def execute(self, calls, released):
        if calls and self.target.busy.is_set():
            self.left -= 1
            if self.left == 0:
                self.store.caches.clear()
                self.deaths += 1
                raise WorkerLost("draft worker restarted")
        return self.store.execute(calls, released)


def greedy(target, prompt: str, max_new_tokens: int) -> list[int]:
    return generate(prompt, target, None, None, DecodeConfig(method="greedy", max_new_tokens=max_new_tokens)).token_ids


def run(engine: Engine, reqs: list[Request]) -> list:
    try:
        return [engine.generate(r) for r in reqs]
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("same_weights", [True, False])
def test_drafting_ahead_writes_greedy_text(pairs, family, same_weights):
    """With a draft that is the target itself (drafting its full length, never branching) every
    round is kept whole and every guess holds, so all rounds after the first two are drafted
    ahead; with the smaller draft at the defaults most guesses fail. Greedy's text either way,
    and the serial engine (overlap off) never drafts ahead."""
    target, draft = pairs[family]
    draft = target if same_weights else draft
    sure = {"draft_confidence": 0.0, "branch_below": 0.0} if same_weights else {}
    reqs = [Request(p, DecodeConfig(method="sd", max_new_tokens=24, **sure)) for p in PROMPTS]
    ahead = run(Engine(target, Slow(target), SeqStore(draft), RewardTable(), overlap=True), reqs)
    serial = run(Engine(target, Slow(target), SeqStore(draft), RewardTable()), reqs)
    for req, a, s in zip(reqs, ahead, serial):
        assert a.token_ids == s.token_ids == greedy(target, req.prompt, 24)
        assert s.stats.ahead_rounds == 0
    if same_weights:
        for a in ahead:
            assert a.stats.ahead_rounds >= a.stats.rounds - 2 > 0


def test_requests_sharing_the_engine_do_not_draft_ahead(pairs):
    """Drafting ahead would take draft time from the other requests: only a request alone does."""
    target, _ = pairs["llama"]
    reqs = [Request(p, DecodeConfig(method="sd", max_new_tokens=24, draft_max_others=None)) for p in PROMPTS]
    engine = Engine(target, Slow(target), SeqStore(target), RewardTable(), overlap=True)
    try:
        outs = engine.generate_many(reqs, concurrency=len(reqs))
    finally:
        engine.close()
    assert [o.token_ids for o in outs] == [greedy(target, r.prompt, 24) for r in reqs]
    assert sum(o.stats.ahead_rounds for o in outs) < sum(o.stats.rounds for o in outs) // 2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_draft_lost_while_the_target_verifies_resumes_the_request_once(pairs, family):
    """The draft dies while it drafts ahead (a target call in flight): the request resumes from
    its last token and is answered once, with greedy's text, and no cache is left behind."""
    target, _ = pairs[family]
    slow = Slow(target)
    draft = LostWhileTargetBusy(target, slow)
    engine = Engine(target, slow, draft, RewardTable(), overlap=True)
    req = Request(PROMPTS[0], DecodeConfig(method="sd", max_new_tokens=32, draft_confidence=0.0, branch_below=0.0))
    try:
        out = engine.generate(req)
        time.sleep(0.3)  # releases travel with the next batch, or alone after 50 ms idle
        held = len(slow.store), len(draft.store)
    finally:
        engine.close()
    assert draft.deaths == 1 and engine.retries == 1
    assert out.token_ids == greedy(target, req.prompt, 32)
    assert held == (0, 0)
