import pytest
from pydantic import ValidationError

from cdsl.config import Action, DecodeConfig, ModelConfig, State


@pytest.mark.parametrize("field,value", [
    ("k", 0), ("lookahead", 0), ("lookahead", -3), ("draft_len", 0), ("max_new_tokens", -1),
    ("tau_accept", 1.5), ("tau_accept", -0.1), ("tau_reward", 2.0), ("tau_reward", -1.0),
    ("temperature", -0.5), ("reward_weight", -1.0), ("method", "beam"), ("policy", {"S5": "cdlh"}),
    ("policy", {"S1": "jump"}),
])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValidationError) as err:
        DecodeConfig(**{field: value})
    assert err.value.errors()[0]["loc"][0] == field
    assert field in str(err.value)


def test_unknown_field_and_model_dtype():
    with pytest.raises(ValidationError, match="draft_length"):
        DecodeConfig(draft_length=3)
    with pytest.raises(ValidationError, match="dtype"):
        ModelConfig(dtype="int3")


def test_policy_table_defaults_and_overrides():
    cfg = DecodeConfig(policy={"S2": "verified_prefix"})
    assert cfg.policy[State.S2] is Action.verified_prefix
    assert cfg.policy[State.S4] is Action.cdlh and cfg.policy[State.S1] is Action.verified_prefix


def test_every_field_documented():
    for cls in (DecodeConfig, ModelConfig):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
