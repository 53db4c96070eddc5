"""The bundled draft/target pair (#3): its training job's data handling, and the shipped models
meeting the bar their card states."""

import csv
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from cdsl.config import BUNDLED, DecodeConfig
from cdsl.evaluate import load_samples, run_methods
from cdsl.generate import load_pair
from jobs import train_tiny
from jobs.eval_tiny import fluency, fluency_flaws

DATA = train_tiny.DATA
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"CommonGen data not at {DATA}")

PAIRS = [(["dog", "frisbee", "catch"], "A dog catches a frisbee thrown by its owner."),
         (["dog", "frisbee", "catch"], "The dog jumps to catch the frisbee."),
         (["girl", "ride", "horse"], "A young girl rides a brown horse across the field."),
         (["cook", "kitchen", "pan"], "A man cooks eggs in a pan in the kitchen by the lake."),
         (["boat", "lake", "row"], "Two friends row a small boat on the lake.")]


def test_heldout_split_holds_out_whole_concept_sets():
    pairs = [([f"w{i}", "dog", "run"], f"sentence {i} {j}") for i in range(30) for j in range(2)]
    train, held = train_tiny.split_heldout(pairs, n_sets=2, rng=random.Random(0))
    assert len(held) == 4 and len(train) + len(held) == len(pairs)
    assert {" ".join(c) for c, _ in train}.isdisjoint({" ".join(c) for c, _ in held})


def test_prompts_are_redrawn_from_the_sentence_words():
    words = train_tiny.content_words(PAIRS)
    assert set(words[2]) == {"girl", "ride", "horse"}  # lemmas: "rides" -> ride
    assert set(words[3]) == {"cook", "kitchen", "pan", "lake"}  # "eggs", "man": not concepts anywhere here
    rng = random.Random(0)
    plain = train_tiny.draw_prompts(PAIRS, words, augment=0.0, rng=rng)
    assert [sorted(p) for p in plain] == [sorted(c) for c, _ in PAIRS]
    redrawn = [train_tiny.draw_prompts(PAIRS, words, augment=1.0, rng=rng) for _ in range(10)]
    for epoch in redrawn:
        for prompt, found in zip(epoch, words):
            assert 3 <= len(prompt) <= 5 and set(prompt) <= set(found)
    assert len({tuple(sorted(e[3])) for e in redrawn}) > 1  # a prompt is not a fixed key


def test_a_distractor_is_a_concept_the_sentence_does_not_use():
    words = train_tiny.content_words(PAIRS)
    extra = 0
    for seed in range(20):
        for prompt, (concepts, _), found in zip(
                train_tiny.draw_prompts(PAIRS, words, augment=0.0, rng=random.Random(seed), distract=1.0),
                PAIRS, words):
            added = set(prompt) - set(concepts)
            assert set(concepts) <= set(prompt) and len(added) <= 1 and not added & set(found)
            extra += len(added)
    assert extra > 50  # most of the 100 rows got one (a draw that hits a used word is skipped)


def test_caption_style_rows_get_the_caption_cue_and_plain_rows_are_repeated():
    assert train_tiny.is_caption("actor attends the premiere of film .")
    assert train_tiny.is_caption("businessperson attends the opening of the exhibition")
    assert not train_tiny.is_caption("A dog catches a frisbee.")
    assert train_tiny.style_prompt(["dog", "cat"], "A dog runs.") == "Concepts: dog, cat\nSentence:"
    assert train_tiny.style_prompt(["dog", "cat"], "a dog runs .") == "Concepts: dog, cat\nCaption:"
    assert train_tiny.style_prompt(["dog", "cat"], "a dog runs .", tags=False) == "Concepts: dog, cat\nSentence:"
    pairs = PAIRS + [(["dog", "run"], "dog runs on the beach .")]
    words = train_tiny.content_words(pairs)
    more, more_words = train_tiny.oversample_plain(pairs, words, 3)
    assert len(more) == 3 * len(PAIRS) + 1 and more.count(pairs[-1]) == 1
    assert all(words[pairs.index(p)] == w for p, w in zip(more, more_words))  # still aligned


def test_weights_stored_in_float16_load_as_float32_with_tied_embeddings(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = train_tiny.make_model(64, 32, 2, 2, eos=0).eval()
    train_tiny.save(model, tmp_path, torch.float16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # written once, re-tied on load
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.float32
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-3, rtol=0)


def test_residual_dropout_acts_only_in_training_and_saves_a_plain_llama(tmp_path):
    torch.manual_seed(0)
    model = train_tiny.make_model(64, 32, 2, 2, eos=0, dropout=0.5)
    ids = torch.randint(0, 64, (1, 6))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_length_bucketed_batches_cover_every_row_once():
    rows = [(list(range(n)), 1) for n in range(3, 40)]
    seen = []
    for _ids, labels, mask in train_tiny.batches(rows, 4, pad=0, rng=random.Random(0), shuffle=False):
        seen += mask.sum(1).tolist()
        assert (labels[:, :1] == -100).all()
    assert sorted(seen) == [len(r) for r, _ in rows]


@needs_data
def test_train_tiny_job_writes_loadable_models_and_heldout_curve(tmp_path):
    out = tmp_path / "tiny"
    result = CliRunner().invoke(train_tiny.app, [
        "--out", str(out), "--limit", "400", "--epochs", "1", "--vocab-size", "300", "--heldout-sets", "20",
        "--eval-every", "2", "--target-hidden", "32", "--target-layers", "1", "--target-heads", "2",
        "--draft-hidden", "16", "--draft-layers", "1", "--draft-heads", "1", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    target, draft = load_pair(str(out / "target"), str(out / "draft"))
    assert target.vocab_size == draft.vocab_size
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    held = [float(r["target_heldout"]) for r in rows if r["target_heldout"]]
    assert len(held) >= 5 and min(held) < held[0]
    assert "best held-out loss" in result.output
    # A second stage continues from the first (same tokenizer) with the unlikelihood term.
    stage2 = tmp_path / "ul"
    result = CliRunner().invoke(train_tiny.app, [
        "--out", str(stage2), "--init", str(out), "--limit", "400", "--epochs", "0.5", "--heldout-sets", "20",
        "--eval-every", "2", "--batch-size", "16", "--unlikelihood", "1.0"])
    assert result.exit_code == 0, result.output
    assert (stage2 / "target" / "tokenizer.json").read_text() == (out / "target" / "tokenizer.json").read_text()
    load_pair(str(stage2 / "target"), str(stage2 / "draft"))


@needs_data
def test_train_tiny_job_style_tags_and_float16_storage(tmp_path):
    from safetensors import safe_open

    args = ["--limit", "400", "--epochs", "0.5", "--vocab-size", "300", "--heldout-sets", "20",
            "--target-hidden", "32", "--target-layers", "1", "--target-heads", "2",
            "--draft-hidden", "16", "--draft-layers", "1", "--draft-heads", "1", "--batch-size", "16"]
    result = CliRunner().invoke(train_tiny.app, ["--out", str(tmp_path / "bad"), *args, "--save-dtype", "bf16"])
    assert result.exit_code == 2 and "--save-dtype" in result.output
    result = CliRunner().invoke(train_tiny.app, ["--out", str(tmp_path / "tags"), *args, "--style-tags",
                                                 "--plain-repeat", "2", "--save-dtype", "float16"])
    assert result.exit_code == 0, result.output
    train, _ = train_tiny.split_heldout(train_tiny.load_pairs(DATA)[:400], 20, random.Random(0))
    plain = sum(not train_tiny.is_caption(s) for _, s in train)
    assert f"{len(train) + plain} training rows per epoch ({2 * plain} plain)" in result.output
    with safe_open(str(tmp_path / "tags" / "target" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    load_pair(str(tmp_path / "tags" / "target"), str(tmp_path / "tags" / "draft"))


def test_unlikelihood_penalises_only_repeats_of_non_exempt_sentence_tokens():
    labels = torch.tensor([[-100, 5, 6, 5, 7]])  # prompt, then the sentence 5 6 5 7
    none = torch.tensor([], dtype=torch.long)
    flat = torch.zeros(1, 5, 10)
    base = train_tiny.unlikelihood_loss(flat, labels, none)

    def bumped(position: int, token: int) -> torch.Tensor:
        logits = flat.clone()
        logits[0, position, token] = 5.0
        return logits

    assert train_tiny.unlikelihood_loss(bumped(3, 6), labels, none) > base  # 6 already used
    assert train_tiny.unlikelihood_loss(bumped(3, 7), labels, none) < base  # the gold token
    assert train_tiny.unlikelihood_loss(bumped(3, 6), labels, torch.tensor([6])) < base  # exempt
    assert train_tiny.unlikelihood_loss(bumped(0, 6), labels, none) == base  # nothing used yet


def test_fluency_rules():
    vocab = {"a", "dog", "man", "is", "using", "with", "catches", "frisbee", "the", "of", "side", "car", "on"}
    assert fluency_flaws("A dog catches a frisbee.", vocab) == []
    assert fluency_flaws("A man is using a dog with a dog.", vocab) == ["repeated phrase"]
    assert fluency_flaws("the side of the side of the side", vocab) == ["repeated phrase", "looping word"]
    assert fluency_flaws("A man on a carcycle.", vocab) == ["unknown word"]
    assert fluency_flaws("A dog catches a frisbee ----", vocab) == ["punctuation run"]
    assert fluency_flaws("A dog ... catches a frisbee.", vocab) == []
    assert fluency(["A dog catches a frisbee.", "a dog a dog"], vocab)["fluent"] == 0.5


def test_bundled_pair_cdlh_covers_more_than_greedy_on_the_samples():
    target, draft = load_pair(str(BUNDLED / "target"), str(BUNDLED / "draft"))
    samples = load_samples()
    results = run_methods(samples, ["greedy", "cdlh"], target, draft, DecodeConfig(k=5, lookahead=4))
    greedy, cdlh = results["greedy"].to_dict(), results["cdlh"].to_dict()
    assert cdlh["coverage_mean"] > greedy["coverage_mean"]
    assert cdlh["coverage_all"] > greedy["coverage_all"]


@needs_data
def test_bundled_card_figures_match_eval_json():
    card = (BUNDLED / "README.md").read_text()
    figures = json.loads((BUNDLED / "eval.json").read_text())
    fl = figures["fluency"]
    assert f"{figures['reference_perplexity']:.1f}" in card
    assert f"{fl['greedy']['fluent']:.1%}" in card and f"{figures['agreement_teacher_forced']:.1%}" in card
    every = figures["fluency_all"]
    assert f"all {figures['all_dev_rows']} dev sets" in card
    assert f"{every['greedy']['fluent']:.1%} / {every['references']['fluent']:.1%}" in card
    # Every recorded stage after the joint run (target fine-tunes, draft distillations) is on the card.
    for recorded in (BUNDLED / "target" / "unlikelihood_command.txt", BUNDLED / "draft" / "distill_command.txt"):
        if recorded.exists():
            assert all(line in card for line in recorded.read_text().splitlines())


def test_bundled_folder_fits_60_mb():
    size = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert size <= 60e6, f"cdsl/bundled is {size / 1e6:.1f} MB, over the 60 MB the issue allows"
