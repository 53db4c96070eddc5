"""Methods that must reduce to greedy decoding do so token for token, on three model families."""

import pytest
import torch

from cdsl.config import DecodeConfig
from cdsl.decoder import LocalRunner
from cdsl.generate import generate
from cdsl.methods import METHODS, Context
from cdsl.models import LM
from cdsl.rewards import Coverage, RewardInput
from cdsl.store import SeqStore

from .conftest import FAMILIES

PROMPTS = ["Concepts: dog, frisbee, catch, throw\nSentence:", "The child"]


def run(pair, method, prompt, **cfg):
    target, draft = pair
    reward = Coverage(["dog", "frisbee", "catch", "throw"])
    return generate(prompt, target, draft, reward, DecodeConfig(method=method, max_new_tokens=24, **cfg))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_reductions_to_greedy(pairs, family, prompt):
    pair = pairs[family]
    ref = run(pair, "greedy", prompt)
    assert ref.stats.tokens > 0
    for d, stop in ((1, 0.0), (3, 0.0), (5, 0.0), (5, 0.4)):  # 0: whole proposals; 0.4 (default): cut short
        assert run(pair, "sd", prompt, draft_len=d, draft_confidence=stop).token_ids == ref.token_ids
        same = run(pair, "cdsl", prompt, draft_len=d, draft_confidence=stop, tau_accept=1.0, tau_reward=0.0)
        assert same.token_ids == ref.token_ids
        assert same.stats.states["S2"] == same.stats.states["S4"] == 0
        assert run(pair, "cdsl", prompt, draft_len=d, draft_confidence=stop, gain_share=0.0).token_ids == ref.token_ids
    for method in ("cdlh", "cdlh-appx"):
        assert run(pair, method, prompt, k=1, lookahead=3).token_ids == ref.token_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k,L,weight", [(5, 4, 5.0), (3, 2, 1.0), (4, 3, 20.0)])
def test_cdsl_gives_cdlh_output_at_fewer_target_calls(pairs, family, prompt, k, L, weight):
    """With gain_share = 1 and a monotone reward, CDSL only skips searches whose outcome is
    already decided, so its text is CDLH's, token for token."""
    pair = pairs[family]
    ref = run(pair, "cdlh", prompt, k=k, lookahead=L, reward_weight=weight)
    out = run(pair, "cdsl", prompt, k=k, lookahead=L, reward_weight=weight)
    assert out.token_ids == ref.token_ids
    assert out.stats.target_calls <= ref.stats.target_calls


def test_cdsl_speculates_through_settled_text(pairs):
    """Guards the test above: the draft does take part, and the search is skipped somewhere."""
    target, _ = pairs["llama"]
    pair = (target, target)  # a draft that is always right: every settled stretch is accepted
    out = run(pair, "cdsl", PROMPTS[0], reward_weight=0.5)
    ref = run(pair, "cdlh", PROMPTS[0], reward_weight=0.5)
    assert out.token_ids == ref.token_ids
    assert out.stats.accepted > 0 and out.stats.target_calls < ref.stats.target_calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_branched_sd_is_greedy_decoding(pairs, family, prompt):
    """Several first tokens checked in one target call: the branch kept is always greedy's."""
    pair = pairs[family]
    ref = run(pair, "greedy", prompt)
    for branches, d, stop in ((2, 4, 0.4), (3, 3, 0.0), (2, 2, 0.4)):
        out = run(pair, "sd", prompt, draft_branches=branches, branch_below=1.0, draft_len=d, draft_confidence=stop)
        assert out.token_ids == ref.token_ids
        assert out.stats.other_branches > 0 and out.stats.drafted > 0  # rounds did branch
        assert out.stats.target_calls < ref.stats.target_calls + 1
    one = run(pair, "sd", prompt, draft_branches=1, draft_len=4)
    assert one.stats.other_branches == 0 and one.token_ids == ref.token_ids


class SecondBest(torch.nn.Module):
    """The target with its top two logits swapped everywhere: a draft whose first choice is
    always wrong and whose second is always right."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        top = out.logits.topk(2, dim=-1).indices
        out.logits.scatter_(-1, top, out.logits.gather(-1, top).flip(-1))
        return out


def test_a_second_branch_is_kept_where_the_first_fails(pairs):
    """Guards the test above: only second branches can pass, so branching emits two tokens per
    round where a single proposal emits one."""
    target, _ = pairs["llama"]
    draft = LM(SecondBest(target.model), target.tokenizer, "second-best", target.eos_ids)
    ref = run((target, target), "greedy", PROMPTS[0])
    one = run((target, draft), "sd", PROMPTS[0], draft_branches=1, draft_len=3, draft_confidence=0.0)
    two = run((target, draft), "sd", PROMPTS[0], draft_branches=2, branch_below=1.0, draft_len=3,
              draft_confidence=0.0)
    assert one.token_ids == two.token_ids == ref.token_ids
    assert one.stats.accepted == 0 < two.stats.accepted
    assert two.stats.rounds < one.stats.rounds


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_lookup_keeps_greedy_and_cdlh_output(pairs, family, prompt):
    """Prompt lookup's row beside the draft's (one proposal, or branches) never changes a text."""
    pair = pairs[family]
    ref, cdlh = run(pair, "greedy", prompt), run(pair, "cdlh", prompt)
    for length, shortest, branches in ((4, 1, 1), (8, 2, 2), (3, 1, 3)):
        cfg = dict(lookup_len=length, lookup_shortest=shortest, draft_branches=branches, branch_below=0.9)
        assert run(pair, "sd", prompt, **cfg).token_ids == ref.token_ids
        assert run(pair, "cdsl", prompt, **cfg).token_ids == cdlh.token_ids


def test_prompt_lookup_is_kept_where_the_draft_fails(pairs):
    """Guards the test above: with a draft that is always wrong, only lookup's rows can pass; on
    a text that repeats itself they do, and fewer target calls write greedy's text."""
    target, _ = pairs["llama"]
    draft = LM(SecondBest(target.model), target.tokenizer, "second-best", target.eos_ids)
    prompt = "one two three four five one two three four five one two three four five one two"
    ref = run((target, target), "greedy", prompt, no_repeat_ngram=0)
    cfg = dict(draft_branches=1, draft_len=3, draft_confidence=0.0, no_repeat_ngram=0)
    plain = run((target, draft), "sd", prompt, **cfg)
    looked = run((target, draft), "sd", prompt, lookup_len=6, lookup_shortest=1, **cfg)
    assert plain.token_ids == looked.token_ids == ref.token_ids
    assert plain.stats.accepted == 0 < looked.stats.looked_up
    assert looked.stats.target_calls < plain.stats.target_calls


class Busy(LocalRunner):
    """A runner whose batches `others` other generations share."""

    def __init__(self, lm, others: int) -> None:
        super().__init__(SeqStore(lm))
        self.n = others

    def others(self) -> int:
        return self.n


@pytest.mark.parametrize("others,most,drafts", [(0, 0, True), (1, 0, False), (3, 4, True), (9, None, True)])
def test_sd_drafts_only_while_few_requests_share_the_batches(pairs, others, most, drafts):
    """Beyond `draft_max_others` other requests, sd takes plain target steps: the same text, no drafts."""
    target, draft = pairs["llama"]
    ref = run(pairs["llama"], "greedy", PROMPTS[0])
    cfg = DecodeConfig(method="sd", max_new_tokens=24, draft_max_others=most, branch_below=1.0)
    ctx = Context(PROMPTS[0], Busy(target, others), Busy(draft, others), None, cfg, codec=target)
    METHODS["sd"].run(ctx)
    assert ctx.out == ref.token_ids
    assert (ctx.stats.drafted > 0) == drafts and (ctx.stats.draft_calls > 0) == drafts
    assert (ctx.stats.other_branches > 0) == (drafts and not others)  # branches only alone
    assert ctx.stats.target_calls <= ref.stats.target_calls + 1


def test_crowded_cdsl_takes_the_argmax_where_it_would_speculate_and_still_writes_cdlhs_text(pairs):
    target, _ = pairs["llama"]
    pair = (target, target)  # an always-right draft and a light reward weight: settled stretches to speculate
    ref = run(pair, "cdlh", PROMPTS[0], reward_weight=0.5)
    alone = run(pair, "cdsl", PROMPTS[0], reward_weight=0.5)
    cfg = DecodeConfig(method="cdsl", max_new_tokens=24, reward_weight=0.5)
    ctx = Context(PROMPTS[0], Busy(target, 1), Busy(target, 1), Coverage(["dog", "frisbee", "catch", "throw"]), cfg,
                  codec=target)
    METHODS["cdsl"].run(ctx)
    assert ctx.out == alone.token_ids == ref.token_ids
    assert alone.stats.draft_calls > 0 and ctx.stats.draft_calls == 0  # speculation stopped, not searches


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_and_target_differ(pairs, family):
    """Guards the tests above: the draft really is another model, so SD had rejections to fix."""
    out = run(pairs[family], "sd", PROMPTS[0], draft_len=4)
    assert out.stats.accepted < out.stats.drafted


def test_lookahead_changes_the_choice(pairs):
    """With a heavy reward weight CDLH is steered away from greedy (the reward is not ignored)."""
    target, draft = pairs["llama"]
    prompt = "Concepts: cat, dog\nSentence:"
    reward = Coverage(["park", "dog", "cat", "child", "stone", "river"])
    cfg = dict(max_new_tokens=16, k=8, lookahead=4)
    plain = generate(prompt, target, None, None, DecodeConfig(method="greedy", max_new_tokens=16))
    steered = generate(prompt, target, None, reward, DecodeConfig(method="cdlh", reward_weight=100.0, **cfg))
    r_plain, r_steered = reward.score([RewardInput(prompt, plain.text, final=True),
                                       RewardInput(prompt, steered.text, final=True)])
    assert r_steered >= r_plain
    assert steered.token_ids != plain.token_ids



@pytest.fixture(scope="module")
def shipped_pairs(model_dirs) -> dict[str, tuple[LM, LM]]:
    """The CPU path the defaults ship: float32 models whose linear layers are oneDNN-packed, the
    draft's in bfloat16 where this CPU runs it (`packed_dtype="auto"` for the project's draft)."""
    from cdsl.config import ModelConfig
    from cdsl.kernels import _bf16_supported

    draft_dtype = "bfloat16" if _bf16_supported() else "float32"
    return {f: (LM.load(ModelConfig(path=str(model_dirs[f"{f}-target"]), onednn=True, packed_dtype="float32")),
                LM.load(ModelConfig(path=str(model_dirs[f"{f}-draft"]), onednn=True, packed_dtype=draft_dtype)))
            for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_lossless_relations_hold_on_the_shipped_packed_path(shipped_pairs, family, prompt):
    pair = shipped_pairs[family]
    greedy = run(pair, "greedy", prompt)
    assert run(pair, "sd", prompt).token_ids == greedy.token_ids
    assert run(pair, "sd", prompt, draft_branches=1).token_ids == greedy.token_ids
    assert run(pair, "cdsl", prompt).token_ids == run(pair, "cdlh", prompt).token_ids
    assert run(pair, "sd", prompt, lookup_len=6, lookup_shortest=1).token_ids == greedy.token_ids
    assert run(pair, "cdsl", prompt, lookup_len=6, lookup_shortest=1).token_ids == run(pair, "cdlh", prompt).token_ids


def test_the_shipped_path_really_runs_packed_layers(shipped_pairs):
    """Guards the test above: the models run `PackedLinear`, not the float64 `nn.Linear` of the others."""
    from cdsl.kernels import PackedLinear, _has_fused_linear

    if not _has_fused_linear():
        pytest.skip("this torch build has no oneDNN linear ops")
    for target, draft in shipped_pairs.values():
        assert any(isinstance(m, PackedLinear) for m in target.model.modules())
        assert any(isinstance(m, PackedLinear) for m in draft.model.modules())
