"""The shared decoding rules (no repeated word n-gram, one sentence) and the quality figures that
judge them; the lossless relations hold with the rules on (tests/test_equivalence.py runs at the
defaults, where both are on)."""

import pytest
from transformers import PreTrainedTokenizerFast

from cdsl.config import DecodeConfig
from cdsl.generate import generate
from cdsl.rewards import Coverage
from cdsl.rules import NoRepeat, WordKeys, sentence_ends
from jobs.quality import one_sentence, quality, repeats_trigram

from .conftest import FAMILIES

CONCEPTS = ["dog", "frisbee", "catch", "throw"]
PROMPT = "Concepts: dog, frisbee, catch, throw\nSentence:"


def test_no_repeat_bans_the_token_that_would_close_a_repeated_ngram():
    rule = NoRepeat(3, start=2)
    assert rule.banned([9, 9, 1, 2, 3, 1, 2]) == [3]
    assert rule.banned([1, 2, 3, 1, 2]) == []  # the first two ids are the prompt
    assert NoRepeat(2, start=0).banned([5, 6, 5]) == [6]


def test_word_keys_compare_words_not_token_ids(model_dirs):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dirs["llama-target"])
    words = WordKeys(tok)
    ids = {t: tok.convert_tokens_to_ids(tok.tokenize(t))[0] for t in ("The", " the", ",")}
    assert words.keys[ids["The"]] == words.keys[ids[" the"]] >= 0
    assert words.keys[ids[","]] == -1
    rule = NoRepeat(2, start=0, words=words)
    # "The dog, the" -> " dog" (and every token spelled "dog") is banned: "the dog" would repeat
    dog = tok(" dog")["input_ids"]
    banned = rule.banned([ids["The"], *dog, ids[","], ids[" the"]])
    assert dog[0] in banned and all(words.keys[t] == words.keys[dog[0]] for t in banned)


def test_sentence_ends_are_final_marks(model_dirs):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dirs["llama-target"])
    ends = {tok.decode([i]) for i in sentence_ends(tok)}
    assert "." in ends and "," not in ends and tok.eos_token not in ends


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 3])
def test_every_method_writes_no_repeated_trigram_and_stops_after_a_sentence(pairs, family, n):
    cfg = dict(max_new_tokens=40, no_repeat_ngram=n)
    outs = {m: generate(PROMPT, *pairs[family], Coverage(CONCEPTS), DecodeConfig(method=m, **cfg))
            for m in ("greedy", "sd", "cdlh", "cdsl")}
    for out in outs.values():
        assert not repeats_trigram(out.text)
        assert out.finish_reason in ("stop", "eos", "length")
        if out.finish_reason == "stop":
            assert out.text.rstrip().endswith((".", "!", "?"))
    assert outs["sd"].token_ids == outs["greedy"].token_ids
    assert outs["cdsl"].token_ids == outs["cdlh"].token_ids


def test_the_rules_change_the_text(pairs):
    """Guards the test above: the random tiny models seldom repeat a trigram, but no_repeat_ngram=1
    (no word twice) changes the text of two families of three."""
    def text(pair, n):
        cfg = DecodeConfig(method="greedy", max_new_tokens=40, no_repeat_ngram=n)
        return generate(PROMPT, *pair, Coverage(CONCEPTS), cfg).token_ids
    assert sum(text(p, 1) != text(p, 0) for p in pairs.values()) >= 2


def test_stop_eos_keeps_writing_past_a_sentence(pairs):
    stopped = 0
    for pair in pairs.values():
        for method in ("greedy", "cdlh"):
            one = generate(PROMPT, *pair, Coverage(CONCEPTS), DecodeConfig(method=method, max_new_tokens=40))
            on = generate(PROMPT, *pair, Coverage(CONCEPTS), DecodeConfig(method=method, max_new_tokens=40, stop="eos"))
            if method == "greedy":  # (a lookahead's reward sees the stop, so cdlh's choices may differ)
                assert on.token_ids[: len(one.token_ids)] == one.token_ids
            assert on.finish_reason != "stop"
            if one.finish_reason == "stop":
                stopped += 1
    assert stopped  # guard: some text did end at its first sentence


def test_quality_figures():
    texts = ["A dog catches a frisbee.", "A drill, a field, a drill, a field.", "The cat sleeps. It wakes"]
    q = quality(texts, [["A dog catches the frisbee."], [], ["A cat sleeps on a sofa."]])
    assert q["repeated_trigram_share"] == pytest.approx(1 / 3)
    assert q["one_sentence_share"] == pytest.approx(2 / 3)
    assert q["mean_words"] == pytest.approx((5 + 8 + 5) / 3)
    assert 0 < q["bleu4"] <= 100 and 0 < q["rouge_l"] <= 100
    assert quality(texts)["mean_words"] == q["mean_words"] and "bleu4" not in quality(texts)
    assert one_sentence('He said "hi."') and not one_sentence("No mark") and not one_sentence("One. Two.")
    perfect = quality(["A dog catches the frisbee."], [["A dog catches the frisbee."]])
    assert perfect["rouge_l"] == pytest.approx(100) and perfect["bleu4"] == pytest.approx(100)
