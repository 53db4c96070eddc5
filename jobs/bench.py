"""The benchmark harness: every method on the same examples, interleaved, after a warm-up.

`cdsl bench` runs it and `jobs.report` writes what it found (results.json, report.md, plots,
the README table). In-process only; the Ray pipeline has its own throughput benchmark
(`jobs.bench_pipeline`). It lives in `jobs/` because it reads datasets beside a checkout and
writes reports: `cdsl/` only decodes and scores.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from cdsl.config import BUNDLED, DecodeConfig
from cdsl.generate import generate
from cdsl.models import LM
from cdsl.rewards import Coverage, Reward
from cdsl.stats import Stats
from cdsl.tasks import commongen_prompt, parse_concepts, read_commongen_jsonl, read_harmless_jsonl
from jobs.quality import quality

SAMPLES = BUNDLED / "samples.jsonl"
"""The concept sets that ship with the package (`make run`, `cdsl demo`)."""

HARMLESS_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl"
"""The hh-rlhf pairs beside a checkout of this project (absent on a user's machine)."""
COMMONGEN_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "commongen" / "dev.jsonl"
"""CommonGen dev beside a checkout of this project (absent on a user's machine)."""
SWEEPABLE = {name: f.annotation for name, f in DecodeConfig.model_fields.items() if f.annotation in (int, float)}
"""The numeric `DecodeConfig` fields a `--sweep` grid may vary, with their types."""


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
        self.totals.add(stats)

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


def load_rows(dataset: str, limit: int = 0) -> list[dict]:
    """Rows `{"concepts": [...], "references": [...]}` from "builtin", a CommonGen jsonl (its
    `scene` references), a jsonl with `concepts`, or Parquet; references are empty where the
    file has none."""
    if dataset == "builtin":
        rows = [{"concepts": c} for c in load_samples(SAMPLES)]
    elif dataset.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(dataset, columns=["concepts"])
        rows = [{"concepts": parse_concepts(c)} for c in table.column("concepts").to_pylist()]
    else:
        path = Path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"dataset not found: {dataset}")
        first = json.loads(path.open().readline())
        if "concept_set" in first:
            rows = list(read_commongen_jsonl(path))
        else:
            rows = [{"concepts": parse_concepts(json.loads(line)["concepts"])} for line in path.open() if line.strip()]
    return [{"references": [], **r} for r in rows[: limit or None]]


def load_dataset(dataset: str, limit: int = 0) -> list[list[str]]:
    """The concept sets of `load_rows`."""
    return [r["concepts"] for r in load_rows(dataset, limit)]


def load_harmless(dataset: str, limit: int = 0, tokenizer=None, held_out: bool = False) -> list[str]:
    """Prompts (each dialogue up to its final Assistant turn, as chat for `tokenizer`) from an
    hh-rlhf jsonl file (`held_out`: only the default reward model's held-out pairs)."""
    if not Path(dataset).exists():
        raise FileNotFoundError(f"dataset not found: {dataset}")
    return [row["prompt"] for row in read_harmless_jsonl(dataset, tokenizer, held_out)][: limit or None]


def parse_sweep(spec: str) -> list[dict]:
    """"tau_accept=0.5,1;draft_len=2,4" -> the grid of CDSL overrides."""
    axes = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in SWEEPABLE:
            raise ValueError(f"sweep: unknown field {name!r}; choose from {sorted(SWEEPABLE)}")
        axes[name] = [SWEEPABLE[name](v) for v in values.split(",") if v.strip()]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


@dataclass
class Example:
    """One benchmark input: its prompt, a fresh reward per run, and when an output passes."""

    prompt: str
    reward: Callable[[], Reward]
    record: dict
    """What outputs.jsonl says about the input."""
    task: str = "commongen"
    threshold: float = 1.0
    """An output passes when its final reward (`Generation.reward`, computed once per output)
    reaches this: every concept covered, or the reward model's score at least the threshold."""
    references: list[str] = field(default_factory=list)
    """Human-written outputs to score BLEU-4 and ROUGE-L against (CommonGen's `scene`)."""


def commongen_examples(concept_sets: list[list[str]], tokenizer=None,
                       references: list[list[str]] | None = None) -> list[Example]:
    """CommonGen: the coverage reward steers, and the text passes when it uses every concept;
    `references[i]` (if given) are set i's human sentences."""
    refs = references or [[] for _ in concept_sets]
    return [Example(commongen_prompt(c, tokenizer), partial(Coverage, c), {"concepts": c}, references=list(r))
            for c, r in zip(concept_sets, refs, strict=True)]


def harmless_examples(prompts: list[str], reward_model: Reward, threshold: float = 0.5) -> list[Example]:
    """The harmless task: a reward model steers and judges; a text passes at `threshold`."""
    return [Example(p, lambda: reward_model, {"prompt": p}, "harmless", threshold) for p in prompts]


def run_bench(examples: list[Example], runs: dict[str, DecodeConfig], target: LM, draft: LM | None,
              warmup: int = 2, progress: bool = True, seed: int = 0) -> dict:
    """Run every named config on every example; the order of runs is shuffled per example."""
    for ex in examples[:warmup]:
        for cfg in runs.values():
            generate(ex.prompt, target, draft, ex.reward(), cfg)
    rng = random.Random(seed)
    summaries = {name: Summary(task=examples[0].task if examples else "commongen") for name in runs}
    ppl = {name: [] for name in runs}
    for ex in tqdm(examples, desc="bench", disable=not progress):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            result = generate(ex.prompt, target, draft, ex.reward(), runs[name])
            summaries[name].add(result.text, result.stats, result.reward, result.reward >= ex.threshold)
            ppl[name].append(target.perplexity(ex.prompt, result.text))
    out = {}
    for name, s in summaries.items():
        d = s.to_dict()
        d["perplexity"] = math.exp(sum(math.log(x) for x in ppl[name]) / max(1, len(ppl[name])))
        d["tokens_per_s"] = d["tokens"] / max(1e-9, d["wall_s"])
        d.update(quality(s.texts, [ex.references for ex in examples]))
        d["config"] = runs[name].model_dump(mode="json", exclude={"policy"})
        d["texts"] = s.texts
        out[name] = d
    return out


def run_methods(concept_sets: Iterable[list[str]], methods: list[str], target: LM, draft: LM | None,
                config: DecodeConfig, progress: bool = True) -> dict[str, Summary]:
    """Every method on every concept set, interleaved per set so machine drift hits all alike
    (`cdsl demo`: no warm-up, no perplexity)."""
    out = {m: Summary() for m in methods}
    for concepts in tqdm(list(concept_sets), desc="examples", disable=not progress):
        prompt = commongen_prompt(concepts, target.tokenizer)
        for method in methods:
            result = generate(prompt, target, draft, Coverage(concepts), config.model_copy(update={"method": method}))
            out[method].add(result.text, result.stats, result.reward, result.reward == 1.0)
    return out
