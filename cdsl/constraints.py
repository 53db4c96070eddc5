"""What a request asks its text to satisfy (`RewardSpec`), and the reward built from it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cdsl.reward_model import load_reward_model
from cdsl.rewards import Combined, Coverage, Keywords, Regex, Reward


class RewardSpec(BaseModel):
    """The constraints of one request; every given field adds a reward."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    concepts: list[str] = Field(default_factory=list, max_length=64)
    """CommonGen concepts, matched in any inflection."""
    keywords: list[str] = Field(default_factory=list, max_length=64)
    """Words or phrases that must appear verbatim."""
    regex: str | None = Field(None, max_length=1000)
    """A pattern the text must match (re.search)."""
    reward_model: str | None = Field(None, min_length=1)
    """Local folder, hub id or builtin name of a sequence-classification reward model."""
    reward_model_label: str | None = None
    """Label whose softmax probability is the reward; None: sigmoid of the first logit."""
    combine: Literal["mean", "all"] = "mean"
    """How several constraints combine: weighted mean, or the weakest one."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return pattern

    @property
    def given(self) -> bool:
        """Whether any constraint is set (a request without one has no reward)."""
        return bool(self.concepts or self.keywords or self.regex is not None or self.reward_model is not None)

    @property
    def monotone(self) -> bool:
        """Whether the built reward is monotone (every part but a reward model is)."""
        return self.reward_model is None

    @property
    def one_sentence(self) -> bool:
        """Whether the built reward's answer is one sentence (`Coverage.one_sentence`: concepts given)."""
        return bool(self.concepts)

    def build(self, device: str = "cpu") -> Reward:
        """The reward; a reward model is loaded once per process and `device`, whatever the
        other constraints (see `load_reward_model`)."""
        parts: list[tuple[Reward, float]] = []
        if self.concepts:
            parts.append((Coverage(self.concepts), 1.0))
        if self.keywords:
            parts.append((Keywords(self.keywords), 1.0))
        if self.regex is not None:
            parts.append((Regex(self.regex), 1.0))
        if self.reward_model is not None:
            parts.append((load_reward_model(self.reward_model, self.reward_model_label, device), 1.0))
        if not parts:
            raise ValueError("constraints: give at least one of concepts, keywords, regex, reward_model")
        return parts[0][0] if len(parts) == 1 else Combined(parts, self.combine)
