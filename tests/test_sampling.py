"""Speculative sampling keeps the target's distribution: many seeded draws on a 4-token vocabulary."""

import itertools

import torch

from cdsl.sampling import Picker

TARGET = torch.tensor([[0.50, 0.30, 0.15, 0.05], [0.10, 0.20, 0.30, 0.40], [0.25, 0.25, 0.25, 0.25]])
DRAFT = torch.tensor([[0.10, 0.20, 0.30, 0.40], [0.70, 0.10, 0.10, 0.10]])  # far from the target on purpose


def two_tokens(picker: Picker, target: torch.Tensor, draft: torch.Tensor) -> tuple[int, int]:
    """The first two tokens one speculative round (plus, if it stops after one, the next plain
    sample) emits, with a draft of two tokens; the contexts do not change the distributions, so
    exact speculative sampling must give target[0] x target[1]."""
    d = [int(torch.multinomial(draft[i], 1, generator=picker.generator)) for i in range(2)]
    n, nxt = picker.verify(d, draft.log(), target.log())
    out = d[:n] + [nxt]
    if len(out) < 2:
        out.append(int(torch.multinomial(target[1], 1, generator=picker.generator)))
    return out[0], out[1]


def total_variation(counts: dict, want: torch.Tensor, draws: int) -> float:
    return 0.5 * sum(abs(counts.get(k, 0) / draws - float(want[k])) for k in itertools.product(range(4), repeat=2))


def test_sd_sampling_matches_the_target_distribution():
    picker, draws = Picker(temperature=1.0, seed=0), 20_000
    counts: dict = {}
    for _ in range(draws):
        key = two_tokens(picker, TARGET, DRAFT)
        counts[key] = counts.get(key, 0) + 1
    joint = TARGET[0][:, None] * TARGET[1][None, :]
    assert total_variation(counts, joint, draws) < 0.02  # sampling noise at 20,000 draws is ~0.01
    wrong = DRAFT[0][:, None] * DRAFT[1][None, :]  # what accepting every draft token would give
    assert total_variation(counts, wrong, draws) > 0.3
