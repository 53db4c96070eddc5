"""What a benchmark run found, written down: results.json, report.md, the plots and the README
table between the bench markers (`jobs.bench` produces the figures)."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import torch

from cdsl.config import DecodeConfig
from jobs.bench import Example


def speedups(methods: dict[str, dict], ref: str = "cdlh") -> dict[str, float]:
    """Each method's speed relative to `ref`'s: ref's wall time / its own (empty without `ref`)."""
    if ref not in methods:
        return {}
    return {name: methods[ref]["wall_s"] / max(1e-9, d["wall_s"]) for name, d in methods.items()}


def walls_vs(methods: dict[str, dict], ref: str = "greedy") -> dict[str, float]:
    """Each method's wall time as a multiple of `ref`'s (empty without `ref`)."""
    return {name: 1 / s for name, s in speedups(methods, ref).items()}


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
                         "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                         "date": datetime.date.today().isoformat(), "commit": commit()},
              "methods": methods, "speedup_vs_cdlh": speedups(methods),
              "wall_vs_greedy": walls_vs(methods), "sweep": {n: d for n, d in results.items() if n not in methods}}
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
    # older results.json files lack the greedy ratio: derive it from the walls
    vs_greedy = results.get("wall_vs_greedy") or walls_vs(results["methods"])
    harmless = results["config"].get("task", "commongen") == "harmless"
    ok, mean = (f"reward >= {results['config'].get('threshold', 0.5)}", "mean reward") if harmless else (
        "all concepts", "mean coverage")
    extra = " reward ms/token |" if harmless else ""  # a reward model's cost is the harmless task's question
    rows = [f"| method | {ok} | {mean} | repeated trigram | one sentence | words | BLEU-4 | ROUGE-L "
            f"| perplexity | wall s | tokens/s | target calls/token "
            f"| speedup vs CDLH | wall vs greedy | time in forward passes |{extra} states S1/S2/S3/S4 |",
            "|---" * (17 if harmless else 16) + "|"]
    for name, d in results["methods"].items():
        states = "/".join(str(d["states"][s]) for s in ("S1", "S2", "S3", "S4")) if sum(d["states"].values()) else "-"
        cost = f" {1000 * d.get('reward_s_per_token', 0.0):.0f} |" if harmless else ""
        rows.append(f"| {name} | {d['ok_share']:.1%} | {d['score_mean']:.1%} | {quality_cells(d)} "
                    f"| {d['perplexity']:.1f} "
                    f"| {d['wall_s']:.1f} | {d['tokens_per_s']:.0f} | {d['target_calls_per_token']:.2f} "
                    f"| {speed.get(name, float('nan')):.2f}x | {vs_greedy.get(name, float('nan')):.2f}x "
                    f"| {d['time_model_share']:.0%} |{cost} {states} |")
    return "\n".join(rows)


def quality_cells(d: dict) -> str:
    """The `jobs.quality` figures of one method as table cells ("-" where a run lacks them: no
    references, or results.json from before they were measured)."""
    def cell(key: str, form: str) -> str:
        return format(d[key], form) if key in d else "-"
    return " | ".join([cell("repeated_trigram_share", ".0%"), cell("one_sentence_share", ".0%"),
                       cell("mean_words", ".1f"), cell("bleu4", ".1f"), cell("rouge_l", ".1f")])


def commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it: the code a
    figure was measured with ("unknown" outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def refresh_readme(readme: Path, results: dict) -> None:
    """Replace the text between the bench markers with this run's table and settings."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: no {START} ... {END} markers to refresh")
    cfg = results["config"]
    settings = ", ".join(f"{k}={cfg[k]}" for k in DecodeConfig.model_fields
                         if k in cfg and k not in ("method", "policy", "temperature", "seed"))
    when = f" on {cfg['date']} at commit {cfg['commit']}" if "commit" in cfg else ""
    body = (f"{cfg['n']} concept sets of `{cfg['dataset']}`, default pair, {settings}; "
            f"measured in one run by `make bench`{when} ({cfg.get('machine', 'machine not recorded')}).\n\n"
            f"{report_table(results)}\n")
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
