"""Counters and timers for one generation, as the spec lists them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from enum import Enum


class Role(str, Enum):
    """Which model a forward pass ran on."""

    target = "target"
    draft = "draft"


@dataclass
class Stats:
    """What one generation cost. Calls are forward passes (a batched call counts once)."""

    target_calls: int = 0
    draft_calls: int = 0
    reward_calls: int = 0
    """Texts scored by the reward (a batch of k candidates counts k)."""
    tokens: int = 0
    """Tokens emitted (after the prompt, EOS excluded)."""
    drafted: int = 0
    """Draft tokens proposed in SD / CDSL rounds."""
    accepted: int = 0
    """Draft tokens the target verified."""
    other_branches: int = 0
    """Draft tokens of the branches a branched SD round did not keep (`drafted` counts the kept one)."""
    looked_up: int = 0
    """Tokens of prompt lookup's proposals the target accepted (in `accepted` too)."""
    rounds: int = 0
    ahead_rounds: int = 0
    """Rounds begun before the round before them was settled (overlap): `sd`'s drafted while the
    target verified, CDSL's searches whose top candidate was kept while the reward scored them."""
    ahead_redone: int = 0
    """CDSL searches whose reward chose another row than the top one kept ahead: the rounds after
    it were dropped and done again."""
    ahead_dropped: int = 0
    """Draft tokens written ahead and dropped: the target did not keep the whole round before them."""
    states: dict[str, int] = field(default_factory=lambda: {"S1": 0, "S2": 0, "S3": 0, "S4": 0})
    state_trace: list[str] = field(default_factory=list)
    """The state of every CDSL round, in order."""
    time_draft: float = 0.0
    time_target: float = 0.0
    time_reward: float = 0.0
    time_total: float = 0.0

    @property
    def time_other(self) -> float:
        return max(0.0, self.time_total - self.time_draft - self.time_target - self.time_reward)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def target_calls_per_token(self) -> float:
        return self.target_calls / self.tokens if self.tokens else 0.0

    @contextmanager
    def model_call(self, role: Role) -> Iterator[None]:
        """Count one forward pass of `role`'s model and add the block's wall time to it."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.count_call(role, time.perf_counter() - start)

    def count_call(self, role: Role, seconds: float) -> None:
        """Count one forward pass of `role`'s model that took `seconds` from issue to answer."""
        if role is Role.target:
            self.target_calls += 1
            self.time_target += seconds
        else:
            self.draft_calls += 1
            self.time_draft += seconds

    @contextmanager
    def reward_call(self, texts: int) -> Iterator[None]:
        """Count `texts` scored by the reward and add the block's wall time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.count_reward(texts, time.perf_counter() - start)

    def count_reward(self, texts: int, seconds: float) -> None:
        """Count `texts` scored by the reward in a call that took `seconds` from issue to answer."""
        self.reward_calls += texts
        self.time_reward += seconds

    def record_state(self, state: str) -> None:
        self.states[state] += 1
        self.state_trace.append(state)

    def add(self, other: Stats) -> None:
        """Add another generation's counts and times to these (totals over a benchmark)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, f.name, mine + theirs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(time_other=self.time_other, acceptance=self.acceptance,
                 target_calls_per_token=self.target_calls_per_token)
        return d
