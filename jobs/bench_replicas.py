"""Dataset-job throughput by pool size, side by side in one Ray session.

    python -m jobs.bench_replicas --input IN --config ray_config.yaml --replicas 1,2 [--method greedy]

Runs the same rows through `jobs.generate`'s pool once per pool size (fresh output folders under
`--output`) and prints rows/s and tokens/s for each, from the first shard's start to the last
shard's end (replica start-up, model loading included only where it delays a shard).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import ray
import typer

from actors.config import PipelineConfig
from jobs.generate import BATCH_SIZE, connect, run_methods, shard_size
from jobs.rows import plan_input

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    input: str = typer.Option(..., "--input", help="Parquet or JSONL rows, as for jobs.generate."),
    output: Path = typer.Option(Path("runs/bench_replicas"), help="Folder for one output folder per pool size."),
    config: str = typer.Option(None, help="YAML with a `cdsl:` section (e.g. ray_config.yaml)."),
    method: str = typer.Option(None, help="Method; default: the config's."),
    replicas: str = typer.Option("1,2", help="Pool sizes to compare, comma-separated."),
    batch_size: int = typer.Option(None, min=1, help="Rows per shard; default: as jobs.generate picks for the "
                                                     "largest pool."),
    limit: int = typer.Option(0, min=0, help="Only the first N rows (0: all)."),
) -> None:
    cfg = PipelineConfig.from_yaml(config) if config else PipelineConfig()
    m = method or cfg.decode.method
    sizes = [int(n) for n in replicas.split(",")]
    plan = plan_input(input, batch_size or BATCH_SIZE, limit)
    if batch_size is None:
        batch_size = shard_size(plan.rows, max(sizes), 2)
        plan = plan_input(input, batch_size, limit)
    connect(cfg, max(sizes))
    rows = []
    try:
        for n in sizes:
            run = run_methods(plan, [m], cfg, output / f"replicas-{n}-{uuid.uuid4().hex[:6]}", (n, n), 2,
                              uuid.uuid4().hex)[m]
            rows.append((n, len(run["replicas"]), run["seconds"], run["tokens"]))
    finally:
        ray.shutdown()
    typer.echo(f"\n{plan.rows} rows, method {m}, batch size {batch_size}")
    typer.echo("| replicas | answered | wall s | rows/s | tokens/s | vs 1st |")
    typer.echo("|---|---|---|---|---|---|")
    for n, used, seconds, tokens in rows:
        typer.echo(f"| {n} | {used} | {seconds:.1f} | {plan.rows / seconds:.1f} | {tokens / seconds:.1f} | "
                   f"{rows[0][2] / seconds:.2f}x |")


if __name__ == "__main__":
    app()
