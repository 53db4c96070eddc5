"""Searching ahead (`Engine(search_ahead=True)` with a reward model): while the reward scores a CDSL
search, the target already searches the next round after the top row; the text is exact CDSL's
(= CDLH's), only confirmed tokens stream, and a reward worker lost mid-search loses nothing."""

import time

import pytest

from cdsl.config import DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.engine import Engine, RewardTable, WorkerLost
from cdsl.generate import generate
from cdsl.request import Request
from cdsl.store import SeqStore
from tests.test_overlap import Slow

PROMPTS = ["The child", "A man is cooking", "Concepts: dog, frisbee, catch, throw\nSentence:"]


class LosesOnce(RewardTable):
    """A reward worker that dies on its `nth` call."""

    def __init__(self, nth: int = 3) -> None:
        super().__init__()
        self.left = nth

    def execute(self, calls, released):
        self.left -= 1
        if self.left == 0:
            raise WorkerLost("reward worker restarted")
        return super().execute(calls, released)


def engine(target, draft, reward: RewardTable, overlap: bool = True) -> Engine:
    return Engine(target, Slow(target), SeqStore(draft), reward, search_ahead=overlap)


def held(eng: Engine) -> tuple[int, int]:
    """Caches left in the target and draft stores, once releases have travelled (50 ms idle)."""
    time.sleep(0.3)
    return len(eng.phases["target"].executor.store), len(eng.phases["draft"].executor)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("weight", [5.0, 1000.0])
def test_searching_ahead_writes_exact_cdsl_text(pairs, reward_model_dir, family, weight):
    """lambda 5 (the default: the top row mostly wins) and 1000 (the reward decides: the top row
    often loses and the round searched ahead is redone): CDLH's text either way, the serial
    engine's and the library's; every token streamed was kept, in order."""
    target, draft = pairs[family]
    spec = RewardSpec(reward_model=str(reward_model_dir))
    cfg = DecodeConfig(method="cdsl", max_new_tokens=16, k=3, lookahead=3, reward_weight=weight)
    eng, serial = engine(target, draft, RewardTable()), engine(target, draft, RewardTable(), overlap=False)
    ahead = redone = 0
    try:
        for prompt in PROMPTS:
            streamed: list[int] = []
            got = eng.generate(Request(prompt, cfg, spec), streamed.extend)
            plain = serial.generate(Request(prompt, cfg, spec))
            rm = spec.build()
            cdlh = generate(prompt, target, draft, rm, cfg.model_copy(update={"method": "cdlh"}))
            assert got.token_ids == plain.token_ids == cdlh.token_ids
            assert streamed == got.token_ids
            assert plain.stats.ahead_rounds == 0
            ahead += got.stats.ahead_rounds
            redone += got.stats.ahead_redone
            assert got.stats.state_trace == plain.stats.state_trace  # redone rounds are not counted twice
        assert held(eng) == (0, 0)  # a redone round's forks are freed too
    finally:
        eng.close()
        serial.close()
    assert ahead > 0
    if weight > 100:
        assert redone > 0


def test_a_lost_guess_costs_at_most_one_target_call(pairs, reward_model_dir):
    """Where the reward answers while the target searches ahead on a guess that lost, the
    rollout stops after its first call, and the winner's logits come from its own search: no
    call re-feeds it (the serial engine's calls + at most one per redone round; 4 before)."""
    target, draft = pairs["llama"]
    spec = RewardSpec(reward_model=str(reward_model_dir))
    cfg = DecodeConfig(method="cdsl", max_new_tokens=16, k=3, lookahead=3, reward_weight=1000.0)
    slow = lambda: Engine(target, Slow(target, delay_s=0.05), SeqStore(draft), RewardTable(),  # noqa: E731
                          search_ahead=True)
    eng, serial = slow(), engine(target, draft, RewardTable(), overlap=False)
    try:
        got = eng.generate(Request(PROMPTS[1], cfg, spec))
        plain = serial.generate(Request(PROMPTS[1], cfg, spec))
    finally:
        eng.close()
        serial.close()
    assert got.token_ids == plain.token_ids
    assert got.stats.ahead_redone > 0
    assert got.stats.target_calls - plain.stats.target_calls <= got.stats.ahead_redone


def test_a_reward_worker_lost_while_searching_ahead_resumes_from_confirmed_text(pairs, reward_model_dir):
    target, draft = pairs["llama"]
    spec = RewardSpec(reward_model=str(reward_model_dir))
    cfg = DecodeConfig(method="cdsl", max_new_tokens=16, k=3, lookahead=3, reward_weight=1000.0)
    want = generate(PROMPTS[0], target, draft, spec.build(), cfg).token_ids
    eng = engine(target, draft, LosesOnce(nth=3))
    try:
        streamed: list[int] = []
        got = eng.generate(Request(PROMPTS[0], cfg, spec), streamed.extend)
        assert eng.retries == 1
        assert held(eng) == (0, 0)
    finally:
        eng.close()
    assert got.token_ids == want and streamed == want
