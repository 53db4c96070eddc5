import pytest

from cdsl.constraints import RewardSpec
from cdsl.rewards import Combined, Coverage, Keywords, Regex, Reward, RewardInput, coverage, covered


@pytest.mark.parametrize("text,concept", [
    ("He threw the ball.", "throw"), ("She is throwing it", "throw"), ("It was thrown away", "throw"),
    ("He throws", "throw"), ("The children play.", "child"), ("A CHILD!", "child"),
    ("dogs, everywhere", "dog"), ("the frisbees", "frisbee"), ("Caught it.", "catch"),
    ("mice ran", "mouse"), ("She stood there", "stand"), ("(dog)", "dog"),
])
def test_inflections_case_punctuation(text, concept):
    assert covered(text, [concept]) == [True]


@pytest.mark.parametrize("text,concept", [
    ("concatenate", "cat"), ("A doghouse", "dog"), ("throwback", "throw"), ("childish", "child"),
    ("the scatter", "cat"), ("", "dog"),
])
def test_no_match_inside_other_words(text, concept):
    assert covered(text, [concept]) == [False]


def test_fraction():
    assert coverage("A dog catches a frisbee.", ["dog", "frisbee", "catch", "throw"]) == 0.75


def item(text, final=False, prefix=""):
    return RewardInput("p", prefix, text, final)


def test_coverage_judges_prefix_and_continuation_together():
    cov = Coverage(["dog", "frisbee", "catch", "throw"])
    assert cov.score([item(" A dog")]) == [0.25]
    assert cov.score([item(" catches it", prefix="A dog")]) == [0.5]


def test_keywords_regex_combined():
    kw = Keywords(["New York", "rain"])
    assert kw.score([item("Rain in new york")]) == [1.0]
    assert kw.score([item("rainy New Yorker")]) == [0.0]
    rx = Regex(r"\d{4}")
    assert rx.score([item("in 1999")]) == [1.0] and rx.score([item("in the 90s")]) == [0.0]
    both = Combined([(Coverage(["dog"]), 1.0), (rx, 3.0)], how="mean")
    assert both.score([item("a dog")]) == [0.25]
    assert Combined([(Coverage(["dog"]), 1.0), (rx, 1.0)], how="all").score([item("a dog")]) == [0.0]


def test_spec_builds_rewards():
    assert isinstance(RewardSpec(concepts=["dog"]).build(), Coverage)
    combined = RewardSpec(concepts=["dog"], regex="x").build()
    assert isinstance(combined, Combined) and isinstance(combined, Reward)
    with pytest.raises(ValueError, match="concepts, keywords, regex, reward_model"):
        RewardSpec().build()


def test_reward_model_reward(tmp_path):
    """A tiny random sequence classifier behind the protocol: batched, in [0, 1], label-aware."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from cdsl.reward_model import RewardModel

    from .conftest import make_tokenizer

    tok = make_tokenizer(tmp_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=tok.pad_token_id,
                      id2label={0: "harmful", 1: "harmless"}, label2id={"harmful": 0, "harmless": 1})
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    items = [item("The dog throws a frisbee."), item("A cat"), item("Children threw stones into the river")]
    rm = RewardModel(str(tmp_path), label="harmless", batch_size=2)
    scores = rm.score(items)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 3
    # batching does not change the scores
    assert rm.score(items[2:]) == pytest.approx(scores[2:], abs=1e-5)
    harmful = RewardModel(str(tmp_path), label="harmful").score(items)
    assert [a + b for a, b in zip(scores, harmful)] == pytest.approx([1.0] * 3, abs=1e-5)
    with pytest.raises(ValueError, match="not among the model's labels"):
        RewardModel(str(tmp_path), label="toxic")
    spec = RewardSpec(concepts=["dog"], reward_model=str(tmp_path), reward_model_label="harmless", combine="all")
    combined = spec.build()
    assert combined.score(items[:1])[0] == pytest.approx(min(1.0, scores[0]), abs=1e-5)
