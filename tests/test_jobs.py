"""The draft-making job (`jobs.distill_draft`) and the draft architecture, on tiny random models."""

import pytest
import torch

from cdsl.config import ModelConfig
from cdsl.draft_model import DraftForCausalLM, draft_from_target
from cdsl.kernels import PackedLinear, _bf16_supported
from cdsl.models import LM, check_same_vocab
from jobs.distill_draft import DATA, distill_loss, frequent_tokens


def _slot(vocab: int, head: list[int]) -> torch.Tensor:
    slot = torch.full((vocab,), -1)
    slot[torch.tensor(head)] = torch.arange(len(head))
    return slot


def test_distill_cross_entropy_only_counts_greedy_tokens_the_head_can_write():
    torch.manual_seed(0)
    head = [0, 2, 4, 6]
    slot = _slot(10, head)
    scores = torch.randn(3, 4)
    t_ids = torch.tensor([[2, 4, 9], [6, 1, 0], [9, 0, 2]])  # 9 and 1 are outside the head
    t_logp = torch.randn(3, 3)
    ce, agree = distill_loss(scores, t_ids, t_logp, slot, alpha=0.0)
    logp = torch.log_softmax(scores, -1)
    assert ce.item() == pytest.approx((-(logp[0, 1] + logp[1, 3]) / 2).item(), rel=1e-5)  # row 2's 9 is skipped
    assert agree == pytest.approx((scores.argmax(-1) == slot[t_ids[:, 0]]).float().mean().item())
    kl, _ = distill_loss(scores, t_ids, t_logp, slot, alpha=1.0)
    assert torch.isfinite(kl) and kl.item() >= 0


def test_distill_kl_is_zero_when_the_draft_matches_the_teacher_in_its_head():
    torch.manual_seed(1)
    head = [1, 3, 5, 7, 8]
    slot = _slot(10, head)
    scores = torch.randn(2, 5)
    t_ids = torch.tensor([[1, 3, 5, 7, 8], [8, 7, 5, 3, 1]])
    t_logp = torch.log_softmax(scores, -1).gather(1, slot[t_ids])
    loss, _ = distill_loss(scores, t_ids, t_logp, slot, alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    other, _ = distill_loss(torch.randn(2, 5), t_ids, t_logp, slot, alpha=1.0)
    assert other.item() > 0.01


def test_frequent_tokens_keeps_special_ids_then_answer_tokens_then_human_text():
    rows = [{"answer": [5, 5, 6]}, {"answer": [5, 7]}]
    assert frequent_tokens(rows, 3, always=[0]) == [0, 5, 6]  # 0 always; 5 then 6 (7 ties, later)
    assert frequent_tokens(rows, 5, always=[0], texts=[[9, 9, 8]]) == [0, 5, 6, 7, 9]


def test_draft_scores_only_its_head_and_loads_like_any_model(model_dirs, tmp_path):
    target = LM.load(str(model_dirs["llama-target"]))
    head = list(range(0, target.vocab_size, 3))
    draft = draft_from_target(str(model_dirs["llama-target"]), 1, head).eval()
    ids = torch.tensor([target.encode("The dog throws a frisbee")])
    logits = draft(input_ids=ids).logits
    outside = torch.ones(target.vocab_size, dtype=torch.bool)
    outside[head] = False
    assert (logits[..., outside] == torch.finfo(logits.dtype).min).all()
    assert logits[..., ~outside].max() > -100  # real scores in the head
    # at init the head's rows are the target's output rows
    assert torch.equal(draft.lm_head.weight, target.model.get_output_embeddings().weight[head])
    draft.save_pretrained(tmp_path / "draft")
    target.tokenizer.save_pretrained(tmp_path / "draft")
    loaded = LM.load(ModelConfig(path=str(tmp_path / "draft"), packed_dtype="float32"))
    assert isinstance(loaded.model, DraftForCausalLM)
    assert torch.allclose(loaded.model(input_ids=ids).logits, logits, atol=1e-4)  # oneDNN rounds differently
    check_same_vocab(loaded, target)
    # by default this architecture's packed weights are bfloat16 where oneDNN runs them
    auto = LM.load(str(tmp_path / "draft"))
    dtypes = {m.dtype for m in auto.model.modules() if isinstance(m, PackedLinear)}
    assert dtypes == ({torch.bfloat16} if _bf16_supported() else {torch.float32})


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason=f"CommonGen data not at {DATA}")
def test_teacher_train_export_assemble_make_a_draft_that_sd_can_use(model_dirs, tmp_path):
    from typer.testing import CliRunner

    from cdsl.config import DecodeConfig
    from cdsl.generate import generate
    from cdsl.pretrained import assemble_draft
    from jobs import distill_draft

    target_dir, run = str(model_dirs["llama-target"]), tmp_path / "run"
    cli = CliRunner()
    out = cli.invoke(distill_draft.app, ["teacher", "--target", target_dir, "--out", str(run), "--commongen", "6",
                                         "--harmless", "2", "--batch", "4", "--shard", "4", "--max-new-tokens", "6"])
    assert out.exit_code == 0, out.output
    assert len(list((run / "teacher").glob("shard-*.pt"))) == 2  # 8 prompts in shards of 4
    rows = distill_draft.load_teacher(run)
    assert all(r["top_ids"].shape[0] == len(r["answer"]) > 0 for r in rows)
    out = cli.invoke(distill_draft.app, ["references", "--target", target_dir, "--out", str(run), "--sets", "4",
                                         "--shard", "4"])
    assert out.exit_code == 0, out.output
    human = distill_draft.load_teacher(run, "references")
    assert len(human) == 4 and all(r["top_ids"].shape[0] == len(r["answer"]) for r in human)
    args = ["train", "--target", target_dir, "--out", str(run), "--layers", "1", "--head", "64",
            "--held-out", "2", "--epochs", "2", "--batch-size", "4", "--own-weight", "2"]
    out = cli.invoke(distill_draft.app, args)
    assert out.exit_code == 0, out.output
    assert torch.load(run / "ckpt.pt")["step"] == 8  # 2 epochs x (6 own rows x 2 + 4 human rows) / 4 per batch
    out = cli.invoke(distill_draft.app, [*args, "--epochs", "3"])  # a later stage resumes the checkpoint
    assert torch.load(run / "ckpt.pt")["step"] == 12
    out = cli.invoke(distill_draft.app, ["export", "--target", target_dir, "--out", str(run), "--to",
                                         str(tmp_path / "shipped")])
    assert out.exit_code == 0, out.output
    assert not any("embed_tokens" in k for k in _keys(tmp_path / "shipped" / "model.safetensors"))
    folder = assemble_draft(model_dirs["llama-target"], tmp_path / "shipped", tmp_path / "assembled")
    target, draft = LM.load(target_dir), LM.load(str(folder))
    check_same_vocab(draft, target)
    prompt = "Concepts: dog, frisbee\nSentence:"
    greedy = generate(prompt, target, None, None, DecodeConfig(method="greedy", max_new_tokens=12))
    sd = generate(prompt, target, draft, None, DecodeConfig(method="sd", max_new_tokens=12))
    assert sd.token_ids == greedy.token_ids


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_bench_draft_measures_sd_variants_side_by_side(model_dirs, tmp_path):
    """`jobs.bench_draft` runs greedy and each SD variant on the same sets, every variant
    lossless, and writes the variants into the card's figure table."""
    import json

    from typer.testing import CliRunner

    from jobs.bench_draft import app

    data = tmp_path / "dev.jsonl"
    data.write_text('{"concept_set": "dog_N#frisbee_N#catch_V"}\n{"concept_set": "child_N#play_V"}\n')
    card = tmp_path / "README.md"
    card.write_text("# draft\n<!-- figures:start -->\nold\n<!-- figures:end -->\nrest\n")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]),
        "--dataset", str(data), "--limit", "2", "--confidence", "0,0.99", "--branches", "1,3", "--max-new-tokens", "10",
        "--threads", "1", "--out", str(out), "--card", str(card)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    plain, (stopped, branched) = figures["sd"], figures["sd_variants"]
    assert plain["outputs_equal_to_greedy"] == stopped["outputs_equal_to_greedy"] == 2
    assert branched["outputs_equal_to_greedy"] == 2
    assert stopped["draft_confidence"] == 0.99 and 0 < stopped["drafted"] < plain["drafted"]
    assert plain["other_branches"] == 0 < branched["other_branches"] and branched["draft_branches"] == 3
    assert branched["acceptance_every_branch"] < branched["acceptance"] or branched["accepted"] == 0
    assert plain["greedy_wall_s"] == stopped["greedy_wall_s"] == branched["greedy_wall_s"] > 0
    text = card.read_text()
    assert "old" not in text and "draft_confidence 0.99" in text and "draft_branches 3" in text
    assert text.endswith("rest\n")


def test_bench_kernels_prints_both_layer_kinds_for_both_models(model_dirs):
    from typer.testing import CliRunner

    from jobs.bench_kernels import app

    result = CliRunner().invoke(app, ["--target", str(model_dirs["llama-target"]), "--draft",
                                      str(model_dirs["llama-draft"]), "--widths", "1,3", "--reps", "1",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    import re

    # (stderr's loading bars share the output: find the rows rather than split lines)
    rows = re.findall(r"(target|draft) +(mkl|onednn) +([\d.]+) +([\d.]+)(?: +(\S+))?", result.output)
    assert [r[:2] for r in rows] == [("target", "mkl"), ("target", "onednn"), ("draft", "mkl"), ("draft", "onednn")]
    assert all(float(x) > 0 for r in rows for x in r[2:4])
    assert float(rows[1][4]) < 1e-3 and float(rows[3][4]) < 1e-3  # the same logits, to rounding
