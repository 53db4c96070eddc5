"""Run several methods over the same concept sets, interleaved, and summarise them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cdsl.config import BUNDLED, DecodeConfig
from cdsl.generate import generate
from cdsl.models import LM
from cdsl.rewards import Coverage, coverage
from cdsl.stats import Stats
from cdsl.tasks import commongen_prompt

SAMPLES = BUNDLED / "samples.jsonl"


def load_samples(path: str | Path = SAMPLES) -> list[list[str]]:
    with open(path) as f:
        return [json.loads(line)["concepts"] for line in f if line.strip()]


@dataclass
class Summary:
    """One method's totals over a set of examples."""

    n: int = 0
    all_covered: int = 0
    coverage_sum: float = 0.0
    totals: Stats = field(default_factory=Stats)
    texts: list[str] = field(default_factory=list)
    task: str = "commongen"
    """"commongen": the score is coverage (results also say coverage_all / coverage_mean)."""

    def add(self, text: str, stats: Stats, score: float, ok: bool) -> None:
        """Count one output with its score and whether it passed (all concepts, or reward >= threshold)."""
        self.n += 1
        self.all_covered += ok
        self.coverage_sum += score
        self.texts.append(text)
        t = self.totals
        for name in ("target_calls", "draft_calls", "reward_calls", "tokens", "drafted", "accepted", "rounds",
                     "time_draft", "time_target", "time_reward", "time_total"):
            setattr(t, name, getattr(t, name) + getattr(stats, name))
        for state, count in stats.states.items():
            t.states[state] += count

    def to_dict(self) -> dict:
        t = self.totals
        ok, mean = self.all_covered / max(1, self.n), self.coverage_sum / max(1, self.n)
        return {"n": self.n, "wall_s": t.time_total, "tokens": t.tokens, "target_calls": t.target_calls,
                "draft_calls": t.draft_calls, "reward_calls": t.reward_calls,
                "target_calls_per_token": t.target_calls_per_token, "acceptance": t.acceptance,
                "ok_share": ok, "score_mean": mean,
                **({"coverage_all": ok, "coverage_mean": mean} if self.task == "commongen" else {}),
                "states": dict(t.states), "time_model_share": (t.time_target + t.time_draft) / max(1e-9, t.time_total),
                "reward_s": t.time_reward, "reward_s_per_token": t.time_reward / max(1, t.tokens)}


def run_methods(concept_sets: Iterable[list[str]], methods: list[str], target: LM, draft: LM | None,
                config: DecodeConfig, progress: bool = True) -> dict[str, Summary]:
    """Every method on every example, interleaved per example so machine drift hits all alike."""
    sets = list(concept_sets)
    out = {m: Summary() for m in methods}
    for concepts in tqdm(sets, desc="examples", disable=not progress):
        prompt = commongen_prompt(concepts, target.tokenizer)
        for method in methods:
            result = generate(prompt, target, draft, Coverage(concepts), config.model_copy(update={"method": method}))
            c = coverage(result.text, concepts)
            out[method].add(result.text, result.stats, c, c == 1.0)
    return out
