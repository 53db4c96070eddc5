"""The main job: every row of a dataset through a pool of pipeline replicas, on Ray Data.

    ray job submit --working-dir . -- python -m jobs.generate --input IN --output OUT_DIR \\
        [--method cdsl[,cdlh,...]] [--config ray_config.yaml] [--replicas N | MIN,MAX] [--batch-size N]

One streaming pass cuts the input into shards of `--batch-size` rows in input order; the driver
keeps a few integers per shard, never the rows. For each method, Ray Data hands the shards not yet
written to an actor pool of `jobs.replica.Replica`s, each owning a whole pipeline (coordinator,
draft worker, target group) placed by the config's resources; a replica reads its shard, generates
it and writes OUT_DIR/<method>/part-<i>.parquet atomically. A rerun of the same command skips the
shards already written, so a stopped job resumes and every row appears exactly once. Bad rows are
written with their `error`; the exit code is 1 if any row failed, 2 if the job could not start
(missing input, bad config, bad options).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import ray
import typer
from pydantic import ValidationError
from tqdm import tqdm

from actors.config import PipelineConfig
from cdsl.config import DecodeConfig
from jobs.cli import fail, validation_error
from jobs.replica import REPLICA_GROUP, Replica, shard_path
from jobs.rows import Plan, plan_input

app = typer.Typer(add_completion=False, help=__doc__)


def parse_replicas(text: str) -> tuple[int, int]:
    """`N` (a fixed pool) or `MIN,MAX` (Ray Data grows the pool while shards wait)."""
    try:
        sizes = [int(p) for p in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or not 1 <= sizes[0] <= sizes[1]:
        raise ValueError(f"--replicas: {text!r} is not N or MIN,MAX with 1 <= MIN <= MAX")
    return sizes[0], sizes[1]


BATCH_SIZE = 64
"""Rows per shard when the input is large enough to give every replica its shards."""


def shard_size(rows: int, replicas: int, shards_per_replica: int) -> int:
    """Rows per shard: BATCH_SIZE, or fewer when the input is small, so that a pool of `replicas`
    gets `shards_per_replica` shards each instead of one replica taking all of them."""
    return max(1, min(BATCH_SIZE, -(-rows // (replicas * shards_per_replica))))


def _earlier_batch_size(out: Path) -> int | None:
    """The shard size of the run a rerun resumes, so its shards line up whatever --replicas says."""
    path = out / "_manifest.json"
    return json.loads(path.read_text()).get("batch_size") if path.exists() else None


def check_manifest(out: Path, manifest: dict) -> None:
    """A rerun must describe the same job, or resumed shards would not line up."""
    path = out / "_manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("rows", "batch_size"):
            if old.get(key) != manifest[key]:
                fail(f"{out} holds a run with {key}={old.get(key)}, this one has {manifest[key]}; "
                     "use another --output or the same input and --batch-size")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))


def connect(config: PipelineConfig, replicas: int) -> None:
    """The cluster of `ray job submit` (RAY_ADDRESS), else a local Ray with a logical CPU per worker."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    need = replicas * config.cpus_per_worker * (config.target_tp + (config.draft is not None))
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False, log_to_driver=False)


def run_methods(plan: Plan, methods: list[str], config: PipelineConfig, out: Path, replicas: tuple[int, int],
                shards_per_replica: int, run: str) -> dict[str, dict]:
    """Generate every missing shard of every method, one method after the other (so their wall
    times compare), each on a pool of replicas; returns per method this run's tokens, wall time
    (first shard start to last shard end) and figures per replica."""
    return {m: _run_method(plan, m, config, out, replicas, shards_per_replica, run) for m in methods}


def _run_method(plan: Plan, method: str, config: PipelineConfig, out: Path, replicas: tuple[int, int],
                shards_per_replica: int, run: str) -> dict:
    todo = [s | {"method": method} for s in plan.shards if not shard_path(out, method, s["shard"]).exists()]
    result: dict = {"tokens": 0, "seconds": 0.0, "replicas": {}}
    if not todo:
        return result
    # MIN replicas start before the first shard is handed out (Ray Data's default dispatches to
    # whichever replica is up first, so a short job could run on one replica of many)
    ray.data.DataContext.get_current().wait_for_min_actors_s = int(config.start_timeout_s)
    pool = ray.data.ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1],
                                      max_concurrent_calls_per_actor=shards_per_replica)
    args = {"config": config.model_dump(mode="json"), "input": plan.path, "output": str(out), "run": run,
            "schema": plan.schema.serialize().to_pybytes()}
    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        Replica, batch_size=1, compute=pool, num_cpus=0, fn_constructor_kwargs=args)
    bar = tqdm(total=sum(s["stop"] - s["start"] for s in todo), desc=method, unit="row", file=sys.stderr,
               mininterval=2, dynamic_ncols=False, ncols=100)
    first, last = float("inf"), 0.0
    try:
        for s in ds.iter_rows():
            bar.update(int(s["rows"]))
            if not s["fresh"]:  # written by an earlier try of this shard: not this run's work
                continue
            start, end, tokens = float(s["start"]), float(s["end"]), int(s["tokens"])
            first, last = min(first, start), max(last, end)
            result["tokens"] += tokens
            r = result["replicas"].setdefault(str(s["replica"]), {"node": str(s["node"]), "rows": 0, "tokens": 0,
                                                                   "first": start, "last": 0.0})
            r["rows"] += int(s["rows"])
            r["tokens"] += tokens
            r["first"], r["last"] = min(r["first"], start), max(r["last"], end)
    finally:
        bar.close()
        release_replica_groups(run)
    result["seconds"] = max(last - first, 0.0)
    for r in result["replicas"].values():
        r["seconds"] = r.pop("last") - r.pop("first")
        r["tokens_per_s"] = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
    return result


def release_replica_groups(run: str) -> None:
    """Ray scopes a placement group to the job, not to the actor that made it, so the groups of a
    finished pool's replicas would hold their GPUs until the job ends; free this run's."""
    for pg in ray.util.placement_group_table().values():
        if (pg.get("name") or "").startswith(f"{REPLICA_GROUP}{run}-") and pg.get("state") != "REMOVED":
            try:
                ray.util.remove_placement_group(ray.util.get_placement_group(pg["name"]))
            except ValueError:  # removed meanwhile
                pass


SUMMED = ("tokens", "time_s", "S1", "S2", "S3", "S4")


def summarize(out: Path, methods: list[str], runs: dict[str, dict]) -> dict:
    """Figures over all shards of every method (this run's and earlier ones), read a shard at a
    time; wall time, tokens/s and replicas cover the rows generated by this run."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    summary = {"output": str(out), "driver_peak_rss_mb": round(peak, 1), "methods": {}}
    for m in methods:
        n = ok = full = 0
        cover = 0.0
        sums = dict.fromkeys(SUMMED, 0)
        for path in sorted((out / m).glob("part-*.parquet")):
            t = pq.read_table(path, columns=["error", "coverage", *SUMMED]).to_pylist()
            n += len(t)
            good = [r for r in t if r["error"] is None]
            ok += len(good)
            cover += sum(r["coverage"] for r in good)
            full += sum(r["coverage"] == 1.0 for r in good)
            for key in SUMMED:
                sums[key] += sum(r[key] for r in good)
        run = runs[m]
        summary["methods"][m] = {
            "rows": n, "errors": n - ok, "mean_coverage": cover / ok if ok else 0.0,
            "all_covered": full / ok if ok else 0.0, "tokens": sums["tokens"], "request_seconds": sums["time_s"],
            "states": {s: sums[s] for s in ("S1", "S2", "S3", "S4")},
            "tokens_this_run": run["tokens"], "wall_s_this_run": run["seconds"],
            "tokens_per_s_this_run": run["tokens"] / run["seconds"] if run["tokens"] else 0.0,
            "replicas_this_run": run["replicas"],
        }
    ref = runs.get("cdlh", {}).get("seconds") if runs.get("cdlh", {}).get("tokens") else None
    for m, s in summary["methods"].items():
        s["speedup_vs_cdlh"] = ref / runs[m]["seconds"] if ref and runs[m]["tokens"] else None
    return summary


def print_table(summary: dict) -> None:
    typer.echo("| method | rows | errors | all covered | mean coverage | wall s | tokens/s | speedup vs cdlh |")
    typer.echo("|---|---|---|---|---|---|---|---|")
    for m, s in summary["methods"].items():
        speed = f"{s['speedup_vs_cdlh']:.2f}x" if s["speedup_vs_cdlh"] else "-"
        typer.echo(f"| {m} | {s['rows']} | {s['errors']} | {s['all_covered']:.0%} | {s['mean_coverage']:.1%} | "
                   f"{s['wall_s_this_run']:.1f} | {s['tokens_per_s_this_run']:.1f} | {speed} |")
    typer.echo("\n| method | replica | node | rows | tokens | busy s | tokens/s |")
    typer.echo("|---|---|---|---|---|---|---|")
    for m, s in summary["methods"].items():
        for name, r in s["replicas_this_run"].items():
            typer.echo(f"| {m} | {name} | {r['node'][:8]} | {r['rows']} | {r['tokens']} | {r['seconds']:.1f} | "
                       f"{r['tokens_per_s']:.1f} |")


@app.command()
def main(
    input: str = typer.Option(..., "--input", help="Parquet, JSONL (a `concepts` list per row) or CommonGen jsonl."),
    output: Path = typer.Option(..., "--output", help="Folder for the Parquet shards and summary.json."),
    method: str = typer.Option(None, help="Method, or several comma-separated; default: the config's."),
    config: str = typer.Option(None, help="YAML with a `cdsl:` section (e.g. ray_config.yaml)."),
    target_tp: int = typer.Option(None, help="Override the config's tensor-parallel size."),
    replicas: str = typer.Option("1", help="Pipeline replicas: N, or MIN,MAX for a pool that grows while "
                                           "shards wait. Each replica needs one draft and target_tp target slots."),
    batch_size: int = typer.Option(None, min=1, help="Rows a replica takes at once (one output shard, the unit of "
                                                     f"resumption). Default: {BATCH_SIZE}, or fewer so that every "
                                                     "replica gets --shards-per-replica shards; a rerun keeps the "
                                                     "first run's."),
    shards_per_replica: int = typer.Option(2, min=1, help="Shards a replica works on at once, so its batches stay "
                                                          "full while one shard's last rows finish."),
    limit: int = typer.Option(0, min=0, help="Only the first N rows (0: all)."),
) -> None:
    try:
        pool = parse_replicas(replicas)
        cfg = PipelineConfig.from_yaml(config) if config else PipelineConfig()
        if target_tp is not None:
            cfg = PipelineConfig.model_validate({**cfg.model_dump(), "target_tp": target_tp})
        methods = [m.strip() for m in (method or cfg.decode.method).split(",") if m.strip()]
        for m in methods:
            DecodeConfig.model_validate(cfg.decode.model_dump() | {"method": m})  # names a bad method
        size = batch_size or _earlier_batch_size(output)
        plan = plan_input(input, size or BATCH_SIZE, limit)
        if size is None and plan.rows:
            size = shard_size(plan.rows, pool[1], shards_per_replica)
            if size != BATCH_SIZE:
                plan = plan_input(input, size, limit)
    except ValidationError as err:
        fail(validation_error(err))
    except (OSError, ValueError) as err:
        fail(str(err))
    if not plan.rows:
        fail(f"input file {input} has no rows")
    check_manifest(output, {"input": str(input), "rows": plan.rows, "batch_size": size, "methods": methods})
    typer.echo(f"{plan.rows} rows in {len(plan.shards)} shard(s) of {size} x {len(methods)} method(s) on {replicas} "
               f"replica(s) -> {output}", err=True)
    if len(plan.shards) < pool[0]:
        typer.echo(f"warning: {len(plan.shards)} shard(s) cannot keep {pool[0]} replicas busy; "
                   f"use a smaller --batch-size", err=True)
    connect(cfg, pool[1])
    run = uuid.uuid4().hex
    try:
        runs = run_methods(plan, methods, cfg, output, pool, shards_per_replica, run)
    finally:
        ray.shutdown()
    summary = summarize(output, methods, runs)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    typer.echo(f"Parquet shards and summary.json in {output}")
    if any(s["errors"] for s in summary["methods"].values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
