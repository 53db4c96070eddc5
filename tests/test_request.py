"""`cdsl.request`: the one prompt rule, the one set of limits and the one error format that the
command line, the HTTP server and the dataset job share."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from actors.config import ServerConfig
from cdsl.config import DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.errors import RequestError
from cdsl.models import Codec
from cdsl.request import Limits, RequestInput
from cdsl.stats import Role, Stats

from .conftest import make_tokenizer

DIALOGUE = "\n\nHuman: How do I bake bread?\n\nAssistant:"


@functools.cache
def codec(window: int | None = None) -> Codec:
    folder = Path(tempfile.mkdtemp(prefix="codec-"))
    make_tokenizer(folder)
    loaded = Codec.load(str(folder))
    return Codec(loaded.tokenizer, window=window)


def build(limits: Limits | None = None, has_draft: bool = True, **fields):
    return RequestInput(**fields).build(codec(), limits or Limits(), has_draft)


def test_one_prompt_rule():
    concepts = RewardSpec(concepts=["dog", "frisbee"])
    assert build(constraints=concepts).prompt == "Concepts: dog, frisbee\nSentence:"  # no chat template here
    assert build(prompt="  ", constraints=concepts).prompt == "Concepts: dog, frisbee\nSentence:"
    assert build(prompt="The dog", constraints=concepts).prompt == "The dog"
    assert build(dialogue=DIALOGUE, decode=DecodeConfig(method="greedy")).prompt.endswith("Assistant:")
    chat = build(messages=[{"role": "user", "content": "hi"}], decode=DecodeConfig(method="greedy"))
    assert "hi" in chat.prompt and chat.reward is None
    with pytest.raises(RequestError, match="^prompt: must not be empty unless constraints.concepts"):
        build(prompt="", decode=DecodeConfig(method="greedy"))
    with pytest.raises(RequestError, match="^dialogue: no '.*Assistant:' turn"):
        build(dialogue="Human: hi", decode=DecodeConfig(method="greedy"))
    with pytest.raises(ValidationError, match="give one of prompt, messages, dialogue"):
        RequestInput(prompt="x", dialogue=DIALOGUE)


@pytest.mark.parametrize("fields,message", [
    ({"decode": DecodeConfig(k=17)}, "decode.k: 17 is above the limit of 16"),
    ({"decode": DecodeConfig(lookahead=20)}, "decode.lookahead: 20 is above the limit of 16"),
    ({"decode": DecodeConfig(draft_len=30)}, "decode.draft_len: 30 is above the limit of 16"),
    ({"decode": DecodeConfig(max_new_tokens=2000)}, "decode.max_new_tokens: 2000 is above the limit of 1024"),
    ({"constraints": RewardSpec(concepts=["w"] * 33)}, "constraints.concepts: 33 concepts is above the limit of 32"),
    ({"constraints": RewardSpec(concepts=["a"], keywords=["k"] * 40)}, "constraints.keywords: 40 keywords"),
    ({"prompt": "x" * 8001, "constraints": RewardSpec(concepts=["a"])}, "prompt: 8001 characters is above"),
    ({"dialogue": "x" * 9000 + DIALOGUE, "decode": DecodeConfig(method="greedy")}, "dialogue: 9041 characters"),
    ({"prompt": "x", "decode": DecodeConfig(method="cdlh")}, "constraints: method 'cdlh' needs a reward"),
])
def test_limits_and_requirements_name_the_field(fields, message):
    with pytest.raises(RequestError, match=f"^{message}"):
        build(**fields)


def test_a_missing_draft_and_a_full_window_name_their_fields():
    with pytest.raises(RequestError, match="^decode.method: 'sd' needs a draft model"):
        build(has_draft=False, prompt="x", decode=DecodeConfig(method="sd"))
    small = RequestInput(prompt="dog " * 80, decode=DecodeConfig(method="greedy", max_new_tokens=8))
    with pytest.raises(RequestError, match="^prompt: .* tokens \\+ max_tokens 8 exceed the model's context window"):
        small.build(codec(window=64), Limits(), True, budget_field="max_tokens")


def test_limits_come_from_one_config_section():
    limits = Limits(max_k=4)
    assert build(limits, prompt="x", constraints=RewardSpec(concepts=["a"]), decode=DecodeConfig(k=4)).config.k == 4
    with pytest.raises(RequestError, match="decode.k: 5 is above the limit of 4"):
        build(limits, prompt="x", constraints=RewardSpec(concepts=["a"]), decode=DecodeConfig(k=5))
    with pytest.raises(ValidationError, match="request limits now live in the pipeline's `limits` section"):
        ServerConfig(max_tokens=256)
    assert ServerConfig(pipeline={"limits": {"max_k": 4}}).pipeline.limits.max_k == 4


def test_unknown_method_lists_the_registry():
    names = "'greedy', 'sd', 'cdlh', 'cdlh-appx' or 'cdsl'"
    with pytest.raises(ValidationError, match=f"method\n  Input should be {names}"):
        DecodeConfig(method="beam")


def test_stats_are_typed_and_add_up():
    a, b = Stats(tokens=3, drafted=4, accepted=2), Stats(tokens=2, rounds=1)
    with a.model_call(Role.target):
        pass
    with b.model_call(Role.draft), b.reward_call(5):
        pass
    b.record_state("S2")
    a.add(b)
    assert (a.tokens, a.target_calls, a.draft_calls, a.reward_calls, a.rounds) == (5, 1, 1, 5, 1)
    assert a.states["S2"] == 1 and a.state_trace == ["S2"] and a.time_draft > 0 and a.acceptance == 0.5


def test_an_empty_prompt_is_named_before_the_missing_constraint():
    """With neither a prompt nor concepts the prompt is what is missing (the HTTP test's order)."""
    with pytest.raises(RequestError, match="^prompt: must not be empty unless constraints.concepts"):
        build(prompt="", decode=DecodeConfig(method="cdsl"))
