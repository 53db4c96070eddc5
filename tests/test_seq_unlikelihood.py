"""The sequence-level unlikelihood fine-tune: which tokens it marks, that its loss lowers them, and
that the job writes a loadable target."""

from __future__ import annotations

import csv
import random

import pytest
import torch
from typer.testing import CliRunner

from cdsl.config import BUNDLED
from cdsl.generate import load_pair
from jobs import seq_unlikelihood
from jobs.seq_unlikelihood import flaw_positions, sequence_unlikelihood, ul_prompts, word_spans
from jobs.train_tiny import DATA, make_model

VOCAB = {"a", "man", "is", "dance", "dancing", "in", "the", "room", "field", "of", "hay", "and", "grass"}
PREFIXES = {w[:i] for w in VOCAB for i in range(1, len(w) + 1)}


def test_word_spans_glue_bpe_pieces_into_words():
    pieces = [" A", " man", " is", " dance", "ing", ",", " k", "id", "."]
    assert word_spans(pieces) == [("a", [0]), ("man", [1]), ("is", [2]), ("danceing", [3, 4]), ("kid", [6, 7])]


def test_flaws_marked_where_the_text_first_goes_wrong():
    splice = [" A", " man", " is", " dance", "ing", " in", " the", " room", "."]
    assert flaw_positions(splice, VOCAB, PREFIXES) == [4]  # "dance" is a word; "ing" makes it none
    phrase = [" a", " field", " of", " hay", " and", " a", " field", "."]
    assert flaw_positions(phrase, VOCAB, PREFIXES) == [6]  # the second "a field", at "field"
    loop = [" grass", " and", " grass", " in", " grass"]
    assert flaw_positions(loop, VOCAB, PREFIXES) == [4]  # a content word the third time
    stop_repeat = [" a", " man", " in", " the", " room", " in", " the", " field"]
    assert flaw_positions(stop_repeat, VOCAB, PREFIXES) == []  # "in the" twice is ordinary English
    assert flaw_positions([" a", " man", " dancing", "."], VOCAB, PREFIXES) == []
    dashes = [" a", " man", " is", " dancing", "--", "-", "---", "-"]
    assert flaw_positions(dashes, VOCAB, PREFIXES) == [6]  # the fourth mark in a row, across tokens
    assert flaw_positions([" a", " man", "...", " dancing", "."], VOCAB, PREFIXES) == []  # an ellipsis is fine


def test_unlikelihood_step_lowers_the_marked_tokens_only():
    torch.manual_seed(0)
    model = make_model(64, 32, 1, 2, eos=0)
    ids = torch.randint(1, 64, (2, 10))
    marked = torch.zeros(ids.shape, dtype=torch.bool)
    marked[0, 6] = marked[1, 8] = True

    def prob_of_marked() -> torch.Tensor:
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[:, :-1], -1)
        return probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[marked[:, 1:]]

    before = prob_of_marked()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = sequence_unlikelihood(model(input_ids=ids).logits, ids, marked)
    assert loss.item() > 0
    loss.backward()
    opt.step()
    assert (prob_of_marked() < before).all()
    nothing = sequence_unlikelihood(model(input_ids=ids).logits, ids, torch.zeros_like(marked))
    assert nothing.item() == 0.0


def test_ul_prompts_swap_in_concepts_from_other_sets():
    pairs = [(["dog", "frisbee", "catch"], ""), (["girl", "ride", "horse"], ""), (["boat", "lake", "row"], "")]
    drawn = ul_prompts(pairs * 20, 60, 1.0, random.Random(0))
    own = [set(c) for c, _ in pairs]
    assert all(len(c) == 3 for c in drawn)
    assert any(set(c) not in own for c in drawn)  # some sets are new combinations
    kept = ul_prompts(pairs * 20, 60, 0.0, random.Random(0))
    assert all(set(c) in own for c in kept)


@pytest.mark.skipif(not DATA.exists(), reason=f"CommonGen data not at {DATA}")
def test_job_writes_a_loadable_target_and_a_log(tmp_path):
    out = tmp_path / "ul"
    result = CliRunner().invoke(seq_unlikelihood.app, [
        "--init", str(BUNDLED / "target"), "--out", str(out), "--steps", "4", "--eval-every", "2",
        "--eval-sets", "6", "--ul-batch", "4", "--batch-size", "8", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    target, draft = load_pair(str(out / "last"), str(BUNDLED / "draft"))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # saved as given, not left-padded
        assert (out / "last" / name).read_bytes() == (BUNDLED / "target" / name).read_bytes()
    assert target.vocab_size == draft.vocab_size
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "2", "4"]
    assert all(0.0 <= float(r["fluent"]) <= 1.0 for r in rows)
    assert (out / "last" / "unlikelihood_command.txt").read_text().startswith("python -m jobs.seq_unlikelihood")
    # A second stage from that checkpoint records both commands; a bad schedule is refused by name.
    stage2 = tmp_path / "ul2"
    args = ["--init", str(out / "last"), "--out", str(stage2), "--steps", "2", "--eval-every", "2",
            "--eval-sets", "4", "--ul-batch", "2", "--batch-size", "8", "--max-new-tokens", "8"]
    bad = CliRunner().invoke(seq_unlikelihood.app, [*args, "--schedule", "linear"])
    assert bad.exit_code != 0 and "--schedule" in bad.output
    result = CliRunner().invoke(seq_unlikelihood.app, [*args, "--schedule", "constant"])
    assert result.exit_code == 0, result.output
    lines = (stage2 / "last" / "unlikelihood_command.txt").read_text().splitlines()
    first = (out / "last" / "unlikelihood_command.txt").read_text().splitlines()
    assert lines[:-1] == first and lines[-1].startswith("python -m jobs.seq_unlikelihood")
