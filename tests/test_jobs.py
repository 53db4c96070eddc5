import torch

from jobs.distill_draft import distill_loss


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
