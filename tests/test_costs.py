"""Forward-call counts follow each method's cost formula; CDSL with draft == target."""

import time

import pytest

from cdsl.config import DecodeConfig
from cdsl.generate import generate
from cdsl.rewards import Coverage

PROMPT = "Concepts: dog, frisbee, catch, throw\nSentence:"
REWARD = Coverage(["dog", "frisbee", "catch", "throw"])


def run(target, draft, method, **cfg):
    return generate(PROMPT, target, draft, REWARD, DecodeConfig(method=method, max_new_tokens=20, **cfg))


def steps(out) -> int:
    """Tokens chosen, counting a final EOS (chosen but not emitted)."""
    return out.stats.tokens + (out.finish_reason == "eos")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_one_target_call_per_token(pairs, family):
    out = run(*pairs[family], "greedy")
    assert out.stats.target_calls == steps(out)
    assert out.stats.draft_calls == out.stats.reward_calls == 0


@pytest.mark.parametrize("k,L", [(1, 1), (3, 2), (5, 4)])
def test_cdlh_costs(pairs, k, L):
    """1 prefill + L batched rollout calls per token (the winner's cache is reused), k scores."""
    out = run(*pairs["llama"], "cdlh", k=k, lookahead=L)
    assert out.stats.target_calls == 1 + steps(out) * L
    assert out.stats.reward_calls == steps(out) * k
    assert out.stats.draft_calls == 0


def test_cdlh_appx_costs(pairs):
    out = run(*pairs["llama"], "cdlh-appx", k=4, lookahead=3)
    assert out.stats.target_calls == steps(out)
    assert out.stats.draft_calls == 1 + steps(out) * 3  # the draft prefill, then L per token
    assert out.stats.reward_calls == steps(out) * 4


@pytest.mark.parametrize("d", [1, 2, 4])
def test_sd_costs(pairs, d):
    """One target call per round, one draft call per drafted token, n + 1 tokens per round."""
    out = run(*pairs["llama"], "sd", draft_len=d, draft_confidence=0.0)
    s = out.stats
    assert s.target_calls == s.rounds
    assert s.draft_calls == s.drafted
    assert s.drafted <= s.rounds * d
    # every round emits its accepted tokens plus one target token, bar the budget/EOS cut at the end
    assert steps(out) <= s.accepted + s.rounds
    assert steps(out) >= s.accepted + s.rounds - d


@pytest.mark.parametrize("method", ["sd", "cdsl"])
def test_draft_confidence_ends_proposals_early_and_stays_lossless(pairs, method):
    """A random-weight draft is never sure of a token, so at draft_confidence 0.99 each round
    proposes exactly one; the text stays the one without the stop (greedy's, for sd)."""
    target, draft = pairs["llama"]
    full = run(target, draft, method, draft_len=4, gain_share=0.0, draft_confidence=0.0)
    short = run(target, draft, method, draft_len=4, gain_share=0.0, draft_confidence=0.99)
    assert short.token_ids == full.token_ids
    assert full.stats.drafted > full.stats.rounds  # without the stop, rounds propose several tokens
    assert short.stats.drafted == short.stats.rounds
    assert short.stats.draft_calls < full.stats.draft_calls
    never = run(target, draft, method, draft_len=4, gain_share=0.0, draft_confidence=1e-9)
    assert never.stats.drafted == full.stats.drafted  # a stop no token falls below changes nothing


def test_cdsl_identical_draft_always_accepts(pairs):
    target, _ = pairs["llama"]
    out = run(target, target, "cdsl", draft_len=4)
    assert out.stats.accepted == out.stats.drafted
    assert set(out.stats.state_trace) <= {"S1", "S2"}
    assert len(out.stats.state_trace) == out.stats.rounds > 0


def test_cdsl_identical_draft_never_runs_cdlh_and_gets_cheaper_with_d(pairs):
    target, _ = pairs["llama"]
    per_token = []
    for d in (1, 2, 4, 8):
        out = run(target, target, "cdsl", draft_len=d, tau_reward=0.0)
        assert set(out.stats.state_trace) == {"S1"}
        assert out.stats.reward_calls == out.stats.rounds  # one gate score per round, no CDLH scoring
        per_token.append(out.stats.target_calls_per_token)
    assert per_token == sorted(per_token, reverse=True) and per_token[0] > per_token[-1]


def test_stats_time_split(pairs):
    out = run(*pairs["llama"], "cdsl", tau_reward=0.0)  # speculative rounds: the draft works too
    s = out.stats
    assert s.time_total > 0 and s.time_target > 0 and s.time_draft > 0 and s.time_reward > 0
    assert abs(s.time_draft + s.time_target + s.time_reward + s.time_other - s.time_total) < 1e-6
    d = s.to_dict()
    for key in ("target_calls", "draft_calls", "reward_calls", "tokens", "drafted", "accepted", "states",
                "time_draft", "time_target", "time_reward", "time_other"):
        assert key in d


def test_stats_time_split_counts_every_forward(pairs, monkeypatch):
    """Each target forward made 5 ms slower: the target's time holds at least 5 ms per call
    (an in-process call is answered inside its submit, and must still be timed)."""
    target, draft = pairs["llama"]
    forward = target.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(target.model, "forward", slow)
    for method in ("greedy", "sd"):
        s = run(target, draft, method).stats
        assert s.time_target >= 0.005 * s.target_calls > 0
        assert s.time_target + s.time_draft <= s.time_total


def test_sampling_is_seeded(pairs):
    target, draft = pairs["qwen2"]
    a = run(target, draft, "cdsl", temperature=1.0, seed=3)
    b = run(target, draft, "cdsl", temperature=1.0, seed=3)
    c = run(target, draft, "sd", temperature=1.0, seed=4)
    assert a.token_ids == b.token_ids
    assert c.stats.tokens > 0
    # speculative sampling with draft == target accepts every draft token
    same = run(target, target, "sd", temperature=1.0, seed=5, draft_len=3)
    assert same.stats.accepted == same.stats.drafted


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tau_accept", [0.0, 0.25, 0.5, 0.75])
def test_cdsl_partial_acceptance_policies(pairs, family, tau_accept):
    """S1 with tau_a < 1 appends unverified draft tokens; the next round must still verify right."""
    target, draft = pairs[family]
    for tau_reward in (0.0, 1.0):
        out = run(target, draft, "cdsl", tau_accept=tau_accept, tau_reward=tau_reward, draft_len=3)
        s = out.stats
        assert sum(s.states.values()) == s.rounds == len(s.state_trace) > 0
        assert s.tokens > 0 and s.target_calls >= s.rounds
        if tau_accept == 0.0:
            assert s.states["S3"] == s.states["S4"] == 0


@pytest.mark.parametrize("action,confidence", [("verified_prefix", 0.0), ("verified_prefix", 0.99),
                                               ("accept_draft", 0.0), ("cdlh_appx", 0.0), ("cdlh", 0.0)])
def test_cdsl_actions_leave_both_caches_consistent(pairs, action, confidence):
    """After rounds of each action, each model's next logits equal a fresh prefill of its ids."""
    import torch

    from cdsl.decoder import Decoder
    from cdsl.methods.cdsl import cdsl
    from cdsl.methods.context import Context
    from cdsl.stats import Stats

    target, draft = pairs["llama"]
    policy = {s: action for s in ("S1", "S2", "S3", "S4")}
    ctx = Context(PROMPT, target, draft, REWARD, DecodeConfig(method="cdsl", max_new_tokens=14, policy=policy,
                                                             accept_ratio=0.2, k=3, lookahead=3, draft_len=3,
                                                             draft_confidence=confidence))
    cdsl(ctx)
    assert ctx.stats.rounds > 1 and ctx.stats.tokens > 0
    for dec, lm in ((ctx.target, target), (ctx.draft, draft)):
        fresh = Decoder(lm, dec.ids, Stats(), "target").next_logits()
        assert torch.allclose(dec.next_logits(), fresh, atol=1e-5)
    assert ctx.target.ids[ctx.n_prompt:] == ctx.out == ctx.draft.ids[ctx.n_prompt:][: len(ctx.out)]


@pytest.mark.parametrize("room,kept", [(0.0, 3), (1e9, 0)])
def test_cdsl_search_keeps_the_settled_part_of_the_winning_lookahead(pairs, room, kept):
    """A `cdlh` round costs L batched target calls; it keeps the winner's rolled tokens where no
    reward could change the target's choice (all of them bar the last when nothing is left to
    gain, none when anything could still win)."""
    import torch

    from cdsl.methods.cdsl import search_on_target
    from cdsl.methods.context import Context

    target, draft = pairs["llama"]
    ctx = Context(PROMPT, target, draft, REWARD, DecodeConfig(method="cdsl", k=3, lookahead=4))
    logp = torch.log_softmax(ctx.target.next_logits(), dim=-1)
    calls = ctx.stats.target_calls
    search_on_target(ctx, logp.topk(3).indices.tolist(), logp, room)
    assert ctx.stats.target_calls - calls == 4
    assert len(ctx.out) == 1 + kept and ctx.target.ids[ctx.n_prompt:] == ctx.out


def test_cdsl_skips_the_search_when_no_candidate_can_win(pairs):
    """With lambda = 0 no reward can change the target's choice: every round speculates."""
    target, draft = pairs["llama"]
    out = run(target, draft, "cdsl", reward_weight=0.0)
    assert out.stats.states["S2"] == out.stats.states["S4"] == 0 and out.stats.drafted > 0


@pytest.mark.parametrize("confidence", [0.0, 0.99])
def test_sd_leaves_both_caches_consistent(pairs, confidence):
    """Whether a round ends at d, at EOS or at the confidence stop (its last token then already
    fed), each model's next logits equal a fresh prefill of its ids."""
    import torch

    from cdsl.decoder import Decoder
    from cdsl.methods.context import Context
    from cdsl.methods.sd import sd
    from cdsl.stats import Stats

    target, draft = pairs["llama"]
    ctx = Context(PROMPT, target, draft, None, DecodeConfig(method="sd", max_new_tokens=14, draft_len=3,
                                                           draft_confidence=confidence))
    sd(ctx)
    assert ctx.stats.rounds > 1
    for dec, lm in ((ctx.target, target), (ctx.draft, draft)):
        fresh = Decoder(lm, dec.ids, Stats(), "target").next_logits()
        assert torch.allclose(dec.next_logits(), fresh, atol=1e-5)
