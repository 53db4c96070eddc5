import pytest
import torch

from cdsl.config import BUNDLED
from jobs.distill_draft import distill_loss
from jobs.train_tiny import DATA


def test_distill_loss_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    assert distill_loss(logits, logits, labels, alpha=1.0).item() < 1e-6  # same distribution: no KL
    other = torch.randn(2, 5, 11)
    assert distill_loss(logits, other, labels, alpha=1.0).item() > 0
    mask = labels[:, 1:] != -100
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask])
    assert torch.allclose(distill_loss(logits, other, labels, alpha=0.0), ce)


@pytest.mark.skipif(not DATA.exists(), reason=f"CommonGen data not at {DATA}")
def test_distill_job_writes_a_loadable_draft_and_keeps_the_earlier_stages(tmp_path):
    from typer.testing import CliRunner

    from cdsl.generate import load_pair
    from jobs import distill_draft

    bundled = BUNDLED
    out = tmp_path / "draft"
    result = CliRunner().invoke(distill_draft.app, [
        "--target", str(bundled / "target"), "--init", str(bundled / "draft"), "--out", str(out),
        "--steps", "2", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    target, draft = load_pair(str(bundled / "target"), str(out))
    assert draft.vocab_size == target.vocab_size
    earlier = (bundled / "draft" / "distill_command.txt").read_text().splitlines()
    lines = (out / "distill_command.txt").read_text().splitlines()
    assert lines[:-1] == earlier and lines[-1].startswith("python -m jobs.distill_draft")


def test_command_line_keeps_earlier_stages(tmp_path, monkeypatch):
    from jobs.recipe import command_line

    monkeypatch.setattr("sys.argv", ["ignored", "--out", "runs/b"])
    assert command_line("jobs.x") == "python -m jobs.x --out runs/b"
    monkeypatch.setattr("sys.argv", ["ignored"])
    assert command_line("jobs.x") == "python -m jobs.x"  # no trailing space from an empty argv
    earlier = tmp_path / "cmd.txt"
    assert command_line("jobs.x", earlier) == "python -m jobs.x"  # no earlier stage recorded
    earlier.write_text("python -m jobs.x --out runs/a\n")
    assert command_line("jobs.x", earlier) == "python -m jobs.x --out runs/a\npython -m jobs.x"
