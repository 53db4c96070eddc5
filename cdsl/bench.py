"""The benchmark: every method on the same concept sets, interleaved, after a warm-up.

Writes OUT/results.json, OUT/report.md and PNG plots (speed vs coverage, CDSL state mix and,
with a sweep, the CDSL speed/quality frontier). In-process only; the Ray pipeline has its own
throughput benchmark.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from cdsl.config import DecodeConfig
from cdsl.evaluate import SAMPLES, Summary, load_samples
from cdsl.generate import generate
from cdsl.models import LM
from cdsl.rewards import Coverage, Reward, RewardInput, coverage
from cdsl.tasks import commongen_prompt, parse_concepts, read_commongen_jsonl, read_harmless_jsonl

HARMLESS_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl"
"""The hh-rlhf pairs beside a checkout of this project (absent on a user's machine)."""
SWEEPABLE = {"gain_share": float, "accept_ratio": float, "tau_accept": float, "tau_reward": float,
             "draft_len": int, "k": int, "lookahead": int, "reward_weight": float, "reward_range": float}


def load_dataset(dataset: str, limit: int = 0) -> list[list[str]]:
    """Concept sets from "builtin", a CommonGen jsonl, a jsonl with `concepts`, or Parquet."""
    if dataset == "builtin":
        sets = load_samples(SAMPLES)
    elif dataset.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(dataset, columns=["concepts"])
        sets = [parse_concepts(c) for c in table.column("concepts").to_pylist()]
    else:
        path = Path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"dataset not found: {dataset}")
        first = json.loads(path.open().readline())
        if "concept_set" in first:
            sets = [r["concepts"] for r in read_commongen_jsonl(path)]
        else:
            sets = [parse_concepts(json.loads(line)["concepts"]) for line in path.open() if line.strip()]
    return sets[: limit or None]


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


@torch.inference_mode()
def perplexity(target: LM, prompt: str, text: str) -> float:
    """Target perplexity of `text` (+ EOS) after `prompt`: the fluency check on outputs."""
    p = target.encode(prompt)
    body = target.encode(text) + [target.eos_id]  # the first EOS id is the one a text ends with
    logits = target.model(torch.tensor([p + body]).to(target.device)).logits[0, len(p) - 1:-1, : target.vocab_size]
    return math.exp(torch.nn.functional.cross_entropy(logits.float().cpu(), torch.tensor(body)).item())


@dataclass
class Example:
    """One benchmark input: its prompt, a fresh reward per run, and how an output is judged."""

    prompt: str
    reward: Callable[[], Reward]
    judge: Callable[[str], tuple[float, bool]]
    """text -> (score, passed): coverage and all-covered, or reward and reward >= threshold."""
    record: dict
    """What outputs.jsonl says about the input."""
    task: str = "commongen"


def commongen_examples(concept_sets: list[list[str]], progress_mode: str = "coverable",
                       tokenizer=None) -> list[Example]:
    """CommonGen: the coverage reward steers, and the text passes when it uses every concept."""
    def judge(concepts):
        def score(text: str) -> tuple[float, bool]:
            c = coverage(text, concepts)
            return c, c == 1.0
        return score
    return [Example(commongen_prompt(c, tokenizer), partial(Coverage, c, progress_mode=progress_mode), judge(c),
                    {"concepts": c}) for c in concept_sets]


def harmless_examples(prompts: list[str], reward_model: Reward, threshold: float = 0.5) -> list[Example]:
    """The harmless task: a reward model steers and judges; a text passes at `threshold`."""
    def judge(prompt):
        def score(text: str) -> tuple[float, bool]:
            (r,) = reward_model.score([RewardInput(prompt, "", text, True, 0, 0)])
            return r, r >= threshold
        return score
    return [Example(p, lambda: reward_model, judge(p), {"prompt": p}, "harmless") for p in prompts]


def run_bench(examples: list[Example], runs: dict[str, DecodeConfig], target: LM, draft: LM | None,
              warmup: int = 2, progress: bool = True, seed: int = 0) -> dict:
    """Run every named config on every example; the order of runs is shuffled per example."""
    from tqdm import tqdm

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
            summaries[name].add(result.text, result.stats, *ex.judge(result.text))
            ppl[name].append(perplexity(target, ex.prompt, result.text))
    out = {}
    for name, s in summaries.items():
        d = s.to_dict()
        d["perplexity"] = math.exp(sum(math.log(x) for x in ppl[name]) / max(1, len(ppl[name])))
        d["tokens_per_s"] = d["tokens"] / max(1e-9, d["wall_s"])
        d["config"] = runs[name].model_dump(mode="json", exclude={"policy"})
        d["texts"] = s.texts
        out[name] = d
    return out


def speedups(methods: dict[str, dict], ref: str = "cdlh") -> dict[str, float]:
    if ref not in methods:
        return {}
    return {name: methods[ref]["wall_s"] / max(1e-9, d["wall_s"]) for name, d in methods.items()}


def save_results(folder: Path, examples: list[Example], results: dict[str, dict], main: list[str],
                 setup: dict) -> dict:
    """Write outputs.jsonl, results.json, report.md and plots; `main` names the method runs (the
    rest are sweep points). Returns the results.json content."""
    import platform

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "outputs.jsonl", "w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({**ex.record, **{n: d["texts"][i] for n, d in results.items()}}) + "\n")
    results = {n: {k: v for k, v in d.items() if k != "texts"} for n, d in results.items()}
    methods = {n: results[n] for n in main}
    report = {"config": {**setup, "n": len(examples),
                         "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"},
              "methods": methods, "speedup_vs_cdlh": speedups(methods),
              "sweep": {n: d for n, d in results.items() if n not in methods}}
    (folder / "results.json").write_text(json.dumps(report, indent=2))
    write_report(folder, report)
    return report


def write_report(out: Path, results: dict) -> None:
    """report.md (a table) and the plots, from a results.json-shaped dict."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [report_table(results), ""]
    plots = plot(out, results)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def report_table(results: dict) -> str:
    speed = results.get("speedup_vs_cdlh", {})
    harmless = results["config"].get("task", "commongen") == "harmless"
    ok, mean = (f"reward >= {results['config'].get('threshold', 0.5)}", "mean reward") if harmless else (
        "all concepts", "mean coverage")
    extra = " reward ms/token |" if harmless else ""  # a reward model's cost is the harmless task's question
    rows = [f"| method | {ok} | {mean} | perplexity | wall s | tokens/s | target calls/token "
            f"| speedup vs CDLH | time in forward passes |{extra} states S1/S2/S3/S4 |",
            "|---" * (11 if harmless else 10) + "|"]
    for name, d in results["methods"].items():
        states = "/".join(str(d["states"][s]) for s in ("S1", "S2", "S3", "S4")) if sum(d["states"].values()) else "-"
        cost = f" {1000 * d.get('reward_s_per_token', 0.0):.0f} |" if harmless else ""
        rows.append(f"| {name} | {d['ok_share']:.1%} | {d['score_mean']:.1%} | {d['perplexity']:.1f} "
                    f"| {d['wall_s']:.1f} | {d['tokens_per_s']:.0f} | {d['target_calls_per_token']:.2f} "
                    f"| {speed.get(name, float('nan')):.2f}x | {d['time_model_share']:.0%} |{cost} {states} |")
    return "\n".join(rows)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def refresh_readme(readme: Path, results: dict) -> None:
    """Replace the text between the bench markers with this run's table and settings."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: no {START} ... {END} markers to refresh")
    cfg = results["config"]
    settings = ", ".join(f"{k}={cfg[k]}" for k in ("k", "lookahead", "draft_len", "tau_accept", "tau_reward",
                                                   "gain_share", "accept_ratio", "reward_weight", "max_new_tokens")
                         if k in cfg)
    body = (f"{cfg['n']} concept sets of `{cfg['dataset']}`, default pair, {settings}; "
            f"measured in one run by `make bench`.\n\n{report_table(results)}\n")
    head, rest = text.split(START, 1)
    readme.write_text(head + START + "\n" + body + END + rest.split(END, 1)[1])


def plot(out: Path, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, files = results["methods"], []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in methods.items():
        ax.scatter(d["wall_s"], 100 * d["ok_share"], s=40)
        ax.annotate(name, (d["wall_s"], 100 * d["ok_share"]), textcoords="offset points", xytext=(5, 3))
    for d in results.get("sweep", {}).values():
        ax.scatter(d["wall_s"], 100 * d["ok_share"], s=12, c="grey", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("wall time, s (log)")
    ax.set_ylabel("all concepts covered, %")
    ax.set_title("Speed vs coverage" + (" (grey: CDSL sweep)" if results.get("sweep") else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "speed_vs_coverage.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    mixes = {n: d["states"] for n, d in {**methods, **results.get("sweep", {})}.items() if sum(d["states"].values())}
    if mixes:
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(mixes) + 2), 4))
        bottom = [0.0] * len(mixes)
        for state in ("S1", "S2", "S3", "S4"):
            share = [m[state] / sum(m.values()) for m in mixes.values()]
            ax.bar(list(mixes), share, bottom=bottom, label=state)
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_ylabel("share of CDSL rounds")
        ax.set_title("CDSL state mix")
        ax.legend()
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
        fig.tight_layout()
        files.append(out / "cdsl_states.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files
