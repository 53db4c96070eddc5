"""The reward phase's executor: scores the reward calls of many requests, building each
request's reward once and batching calls that share one reward model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from cdsl.constraints import RewardSpec
from cdsl.reward_model import RewardModel
from cdsl.rewards import Reward, RewardInput


@dataclass(frozen=True)
class RewardCall:
    spec: RewardSpec
    items: tuple[RewardInput, ...]


@lru_cache(maxsize=1024)
def _built(spec_json: str, device: str) -> Reward:
    return RewardSpec.model_validate_json(spec_json).build(device)


class RewardTable:
    """Scores reward calls of many requests, building each request's reward once. Calls whose
    reward is the same reward model (one per path, label and device) are scored in one batch."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def execute(self, calls: list[RewardCall], released: list[str]) -> list[list[float]]:
        rewards = [_built(call.spec.model_dump_json(), self.device) for call in calls]
        out: list = [None] * len(calls)
        shared: dict[int, list[int]] = {}
        for i, (call, reward) in enumerate(zip(calls, rewards)):
            if isinstance(reward, RewardModel):
                shared.setdefault(id(reward), []).append(i)
            else:
                out[i] = reward.score(call.items)
        for group in shared.values():
            scores = rewards[group[0]].score([item for i in group for item in calls[i].items])
            for i in group:
                out[i], scores = scores[: len(calls[i].items)], scores[len(calls[i].items):]
        return out
