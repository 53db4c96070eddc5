"""Throughput of the Ray pipeline against the in-process library, measured side by side.

    python -m jobs.bench_pipeline --requests 64 --method cdsl [--dataset ../shared/data/commongen/dev.jsonl]

Three runs over the same requests, each after a warm-up: the library one request at a time
(`cdsl.generate`), the in-process engine stepping all requests at once (`cdsl.engine`), and the
Ray pipeline (workers + coordinator, started before the clock). Prints tokens/s, the ratios the
issue asks for, and per-phase utilisation; writes them as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from actors.config import PipelineConfig
from actors.pipeline import Pipeline
from cdsl.config import BUILTIN_DRAFT, BUILTIN_TARGET, DecodeConfig, ModelConfig
from cdsl.constraints import RewardSpec
from cdsl.engine import local_engine
from cdsl.generate import generate, load_pair
from cdsl.request import Request
from cdsl.rewards import coverage
from cdsl.tasks import commongen_prompt
from jobs.bench import load_dataset

app = typer.Typer(add_completion=False, help=__doc__)


def _figures(outs, reqs, seconds: float) -> dict:
    tokens = sum(o.stats.tokens for o in outs)
    cov = [coverage(o.text, r.reward.concepts) for o, r in zip(outs, reqs)]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "mean_coverage": sum(cov) / len(cov)}


@app.command()
def main(
    requests: int = typer.Option(64, help="Concurrent requests (CommonGen concept sets)."),
    method: str = typer.Option("cdsl", help="Decoding method for every request."),
    dataset: str = typer.Option("builtin", help="builtin (bundled samples), or a CommonGen/Parquet/JSONL file."),
    target: str = typer.Option(BUILTIN_TARGET),
    draft: str = typer.Option(BUILTIN_DRAFT),
    target_tp: int = typer.Option(1, help="Tensor-parallel size of the Ray target group."),
    out: Path = typer.Option(Path("runs/bench_pipeline.json"), help="Where the figures go (JSON)."),
) -> None:
    sets = load_dataset(dataset, requests)
    sets = [sets[i % len(sets)] for i in range(requests)]
    target_lm, draft_lm = load_pair(ModelConfig(path=target), ModelConfig(path=draft))
    reqs = [Request(commongen_prompt(c, target_lm.tokenizer), DecodeConfig(method=method), RewardSpec(concepts=c))
            for c in sets]

    def one_at_a_time():
        return [generate(r.prompt, target_lm, draft_lm, r.reward.build(), r.config) for r in reqs]

    for r in reqs[:2]:  # warm-up
        generate(r.prompt, target_lm, draft_lm, r.reward.build(), r.config)
    results = {"requests": requests, "method": method, "dataset": dataset, "target_tp": target_tp}
    start = time.perf_counter()
    results["library_one_at_a_time"] = _figures(one_at_a_time(), reqs, time.perf_counter() - start)
    typer.echo(f"library, one at a time: {results['library_one_at_a_time']['tokens_per_s']:.1f} tok/s", err=True)

    engine = local_engine(target_lm, draft_lm)
    engine.generate_many(reqs[:4])
    engine.reset_utilisation()
    start = time.perf_counter()
    outs = engine.generate_many(reqs, concurrency=requests)
    results["engine_in_process"] = {**_figures(outs, reqs, time.perf_counter() - start),
                                    "phases": engine.utilisation()}
    engine.close()
    typer.echo(f"engine, in process: {results['engine_in_process']['tokens_per_s']:.1f} tok/s", err=True)

    pipe = Pipeline(PipelineConfig(target=ModelConfig(path=target), draft=ModelConfig(path=draft),
                                   target_tp=target_tp))
    try:
        pipe.generate_many(reqs[:4])
        pipe.utilisation(reset=True)
        start = time.perf_counter()
        outs = pipe.generate_many(reqs)
        results["ray_pipeline"] = {**_figures(outs, reqs, time.perf_counter() - start),
                                   "start_s": pipe.start_s, "phases": pipe.utilisation(), "workers": pipe.placement()}
    finally:
        pipe.shutdown()
    lib, eng, ray_ = (results[k]["tokens_per_s"] for k in ("library_one_at_a_time", "engine_in_process",
                                                          "ray_pipeline"))
    results["ray_vs_library"] = ray_ / lib
    results["engine_vs_library"] = eng / lib
    results["ray_overhead_vs_engine"] = eng / ray_ - 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    typer.echo(json.dumps({k: results[k] for k in ("requests", "method", "ray_vs_library", "engine_vs_library",
                                                      "ray_overhead_vs_engine")}))
    typer.echo("| run | tokens/s | seconds | mean coverage |\n|---|---|---|---|")
    for name in ("library_one_at_a_time", "engine_in_process", "ray_pipeline"):
        r = results[name]
        typer.echo(f"| {name} | {r['tokens_per_s']:.1f} | {r['seconds']:.1f} | {r['mean_coverage']:.3f} |")
    typer.echo(f"figures written to {out}")


if __name__ == "__main__":
    app()
