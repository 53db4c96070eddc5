"""The Ray pipeline gives the in-process library's answers: TP = 1, TP = 2 (DeepSpeed AutoTP over
gloo), and after a worker is killed mid-request."""

import os
import time

import pytest
import ray
import torch

from actors.config import PipelineConfig
from actors.pipeline import Pipeline
from cdsl.config import DecodeConfig, ModelConfig
from cdsl.constraints import RewardSpec
from cdsl.generate import generate
from cdsl.methods import Generation
from cdsl.models import LM
from cdsl.request import Request
from cdsl.rewards import Coverage

pytestmark = pytest.mark.slow  # starts Ray (make test-fast skips it)

CONCEPTS = [["dog", "frisbee", "catch", "throw"], ["child", "river", "stone"], ["cook", "dinner", "kitchen"],
            ["cat", "sleep"]]
METHODS = ["greedy", "sd", "cdlh", "cdlh-appx", "cdsl"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(model_dirs, family="llama", **kw) -> PipelineConfig:
    target = ModelConfig(path=str(model_dirs[f"{family}-target"]), dtype=kw.pop("dtype", "float64"))
    return PipelineConfig(target=target,
                          draft=ModelConfig(path=str(model_dirs[f"{family}-draft"]), dtype="float64"),
                          cpus_per_worker=1, **kw)


def requests(n: int, max_new_tokens: int = 16) -> list[Request]:
    """n requests cycling over the methods, and over CDSL's speculative-search action too."""
    out = []
    for i in range(n):
        concepts = CONCEPTS[i % len(CONCEPTS)]
        method = METHODS[i % len(METHODS)]
        extra = {"policy": {"S2": "cdlh_appx", "S4": "cdlh_appx"}} if method == "cdsl" and i // len(METHODS) % 2 else {}
        cfg = DecodeConfig(method=method, max_new_tokens=max_new_tokens, draft_len=3, k=3, lookahead=2, **extra)
        out.append(Request(f"Concepts: {', '.join(concepts)}\nSentence:", cfg, RewardSpec(concepts=concepts)))
    return out


def reference(pair, reqs: list[Request]) -> list[list[int]]:
    target, draft = pair
    return [generate(r.prompt, target, draft, Coverage(r.reward.concepts), r.config).token_ids for r in reqs]


def test_pipeline_equals_in_process_tp1(local_ray, model_dirs, pairs, reward_model_dir):
    reqs = requests(10)
    # a reward model combined with concepts, scored by the Ray reward worker
    rm_spec = RewardSpec(concepts=CONCEPTS[0], reward_model=str(reward_model_dir))
    rm_req = Request(reqs[0].prompt, DecodeConfig(method="cdlh", max_new_tokens=8, k=3, lookahead=2), rm_spec)
    # CDSL scored by the reward model alone: by default the lone request searches ahead
    ahead_spec = RewardSpec(reward_model=str(reward_model_dir))
    ahead_req = Request(reqs[1].prompt, DecodeConfig(method="cdsl", max_new_tokens=8, k=3, lookahead=2), ahead_spec)
    pipe = Pipeline(config(model_dirs))
    try:
        rm_out = pipe.generate(rm_req)
        ahead_out = pipe.generate(ahead_req)
        outs = pipe.generate_many(reqs)
        *pieces, last = list(pipe.stream(reqs[4]))
        use = pipe.utilisation()
    finally:
        pipe.shutdown()
    assert [o.token_ids for o in outs] == reference(pairs["llama"], reqs)
    target, draft = pairs["llama"]
    assert rm_out.token_ids == generate(rm_req.prompt, target, draft, rm_spec.build(), rm_req.config).token_ids
    assert rm_out.stats.reward_calls > 0
    cdlh = ahead_req.config.model_copy(update={"method": "cdlh"})
    assert ahead_out.token_ids == generate(ahead_req.prompt, target, draft, ahead_spec.build(), cdlh).token_ids
    assert ahead_out.stats.ahead_rounds > 0
    assert isinstance(last, Generation) and "".join(pieces) == last.text == outs[4].text
    assert use["target"]["calls"] > use["target"]["batches"]  # requests shared forwards


def test_pipeline_equals_in_process_tp2(local_ray, model_dirs, pairs):
    """Two Ray actors form one gloo process group; DeepSpeed AutoTP splits the target over them."""
    reqs = requests(5)
    pipe = Pipeline(config(model_dirs, target_tp=2, dtype="float32"))  # DeepSpeed on CPU: no float64
    try:
        outs = pipe.generate_many(reqs)
        where = pipe.placement()
    finally:
        pipe.shutdown()
    target = LM.load(ModelConfig(path=str(model_dirs["llama-target"]), dtype="float32"))
    assert [o.token_ids for o in outs] == reference((target, pairs["llama"][1]), reqs)
    assert [w["rank"] for w in where["target"]] == [0, 1]
    assert len({w["pid"] for w in where["target"]}) == 2


def test_uneven_heads_split_over_two_ranks_give_the_in_process_answer(local_ray, model_dirs, tmp_path):
    """Like the default target (9 heads, 3 key/value heads), heads that TP = 2 does not divide."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dirs["llama-target"])
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=9, num_key_value_heads=3, initializer_range=0.5,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    target_cfg = ModelConfig(path=str(tmp_path), dtype="float32")
    reqs = [Request(r.prompt, DecodeConfig(method="greedy", max_new_tokens=12), None) for r in requests(3)]
    pipe = Pipeline(PipelineConfig(target=target_cfg, draft=None, target_tp=2, cpus_per_worker=1))
    try:
        outs = pipe.generate_many(reqs)
    finally:
        pipe.shutdown()
    target = LM.load(target_cfg)
    assert [o.token_ids for o in outs] == [generate(r.prompt, target, None, None, r.config).token_ids for r in reqs]


def test_float64_tensor_parallel_refused_by_name(model_dirs):
    with pytest.raises(ValueError, match="target.dtype"):
        config(model_dirs, target_tp=2)


def drained(pipe: Pipeline, within_s: float = 5.0) -> dict:
    """The caches each worker holds, once none does or `within_s` has passed (a release travels
    with the next batch, or alone after the batcher's idle wait)."""
    deadline = time.monotonic() + within_s
    while any((held := pipe.status()["caches"]).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def kill_after(actor, batches: int, timeout_s: float = 60.0) -> None:
    """Kill `actor` (Ray restarts it) once it has run `batches` batches."""
    deadline = time.monotonic() + timeout_s
    while ray.get(actor.where.remote())["batches"] < batches and time.monotonic() < deadline:
        time.sleep(0.01)
    ray.kill(actor, no_restart=False)


@pytest.mark.parametrize("victim", ["draft", "target"])
def test_killed_worker_is_restarted_and_requests_resume(local_ray, model_dirs, pairs, victim):
    reqs = [r for r in requests(15, max_new_tokens=40) if r.config.method in ("sd", "cdsl", "cdlh-appx")]
    pipe = Pipeline(config(model_dirs))
    try:
        handles = ray.get(pipe.coordinator.actor_handles.remote())
        actor = handles[victim][0] if victim == "target" else handles[victim]
        refs = [pipe.coordinator.generate.remote(r) for r in reqs]
        kill_after(actor, 3)
        outs = ray.get(refs)
        use = pipe.utilisation()
    finally:
        pipe.shutdown()
    assert use["retries"] >= 1  # some request really lost its caches
    assert len(outs) == len(reqs)  # each answered exactly once, in order
    assert [o.token_ids for o in outs] == reference(pairs["llama"], reqs)


def test_a_hung_worker_call_times_out_and_the_worker_is_restarted(local_ray, tmp_path):
    """A call that never returns (a hung forward or collective) becomes WorkerLost after
    `call_timeout_s`, the worker is replaced, and the next call is answered."""
    from ray.exceptions import GetTimeoutError

    from actors.pipeline import ActorExecutor, _wait_all
    from cdsl.engine import WorkerLost

    marker = tmp_path / "hung-once"

    @ray.remote(max_restarts=1, num_cpus=0)
    class Sleepy:
        def __init__(self) -> None:
            self.hang = not marker.exists()  # the first incarnation hangs, its replacement answers
            marker.touch()

        def execute(self, calls, released):
            if self.hang:
                time.sleep(600)
            return ["ok" for _ in calls]

        def where(self) -> int:
            return os.getpid()

    ex = ActorExecutor(Sleepy.remote(), call_timeout_s=2)
    pid = ray.get(ex.actor.where.remote())
    start = time.monotonic()
    with pytest.raises(WorkerLost):
        ex.execute(["call"], [])
    assert time.monotonic() - start < 60
    assert ex.execute(["call"], []) == ["ok"] and ray.get(ex.actor.where.remote()) != pid

    @ray.remote(num_cpus=0)
    def stuck():
        time.sleep(600)

    refs = [stuck.remote()]
    with pytest.raises(GetTimeoutError):  # what makes the target group rebuild instead of waiting forever
        _wait_all(refs, timeout_s=1)
    ray.cancel(refs[0], force=True)


def test_a_lone_sd_request_drafts_ahead_on_the_draft_worker_and_survives_its_loss(local_ray, model_dirs, pairs):
    """Overlap on: with the target's own weights as the draft every round is kept
    whole, so the draft worker drafts rounds while the target worker verifies; killing the draft
    worker mid-request resumes it. The text is greedy's, and the serial pipeline's."""
    target_dir = str(model_dirs["llama-target"])
    cfg = PipelineConfig(target=ModelConfig(path=target_dir, dtype="float64"),
                         draft=ModelConfig(path=target_dir, dtype="float64"), cpus_per_worker=1, overlap=True)
    target = pairs["llama"][0]
    req = Request("Concepts: dog, frisbee, catch, throw\nSentence:",
                  DecodeConfig(method="sd", max_new_tokens=40, draft_confidence=0.0, branch_below=0.0))
    want = generate(req.prompt, target, None, None, DecodeConfig(method="greedy", max_new_tokens=40)).token_ids
    serial = Pipeline(cfg.model_copy(update={"overlap": False}))
    try:
        plain = serial.generate(req)
    finally:
        serial.shutdown()
    pipe = Pipeline(cfg)
    try:
        first = pipe.generate(req)
        after_first = drained(pipe)
        draft = ray.get(pipe.coordinator.actor_handles.remote())["draft"]
        ref = pipe.coordinator.generate.remote(req)
        kill_after(draft, ray.get(draft.where.remote())["batches"] + 4)
        again = ray.get(ref)
        after_loss = drained(pipe)
        use = pipe.utilisation()
    finally:
        pipe.shutdown()
    assert plain.token_ids == first.token_ids == again.token_ids == want
    assert plain.stats.ahead_rounds == 0 and first.stats.ahead_rounds >= 2
    assert use["retries"] == 1
    # the forks a dropped guess leaves on the draft worker are freed, before and after its loss
    assert after_first == after_loss == {"target": 0, "draft": 0}
