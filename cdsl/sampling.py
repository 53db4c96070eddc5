"""Token choice: argmax at temperature 0, sampling above it, and the speculative accept test."""

from __future__ import annotations

import torch


class Picker:
    """Chooses tokens from logits with one seeded generator per generation."""

    def __init__(self, temperature: float, seed: int) -> None:
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [...] token ids."""
        if self.temperature == 0.0:
            return logits.argmax(-1)
        p = self.probs(logits)
        flat = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=self.generator)
        return flat.reshape(p.shape[:-1])

    def one(self, logits: torch.Tensor) -> int:
        return int(self(logits))

    def verify(self, draft: list[int], draft_logits: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
        """How many leading draft tokens the target accepts, and the token that follows them.

        `target_logits` [d+1, V] holds the target's predictions for every draft position plus
        the bonus position. Greedy: accept while the draft equals the target's argmax. Sampling:
        the speculative-sampling test (accept with prob min(1, p/q), else resample from
        max(0, p - q)), which keeps the target's distribution exactly.
        """
        if self.temperature == 0.0:
            want = target_logits.argmax(-1).tolist()
            n = 0
            while n < len(draft) and draft[n] == want[n]:
                n += 1
            return n, want[n]
        p, q = self.probs(target_logits), self.probs(draft_logits)
        for i, tok in enumerate(draft):
            u = torch.rand((), generator=self.generator)
            if u * q[i, tok] <= p[i, tok]:
                continue
            residual = (p[i] - q[i]).clamp(min=0)
            if residual.sum() <= 0:
                residual = p[i]
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=self.generator))
        return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=self.generator))
