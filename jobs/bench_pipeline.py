"""Throughput of the Ray pipeline against the in-process library, measured side by side.

    python -m jobs.bench_pipeline --requests 64 --method cdsl [--dataset ../shared/data/commongen/dev.jsonl]
    python -m jobs.bench_pipeline --single --limit 12 --out runs/overlap.json
    python -m jobs.bench_pipeline --single --task harmless --limit 4 --methods cdsl --out runs/overlap_harmless.json

Three runs over the same requests, each after a warm-up: the library one request at a time
(`cdsl.generate`), the in-process engine stepping all requests at once (`cdsl.engine`), and the
Ray pipeline (workers + coordinator, started before the clock). Prints tokens/s, the ratios the
issue asks for, and per-phase utilisation; writes them as JSON.

`--single`: one request at a time through two Ray pipelines started side by side, one serial
(`overlap` and `search_ahead` off) and one overlapped (both on), each worker on one CPU;
requests alternate between them so both see the same machine. Writes `serial_s` and
`overlapped_s` (method -> seconds) and `same_text` (whether every text matched). `--task
harmless`: held-out hh-rlhf dialogues with the default harmless reward model (on the reward
worker) instead of CommonGen concept sets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import typer
from tqdm import tqdm

from actors.config import PipelineConfig
from actors.pipeline import Pipeline
from cdsl.config import BUILTIN_DRAFT, BUILTIN_HARMLESS, BUILTIN_TARGET, DecodeConfig, ModelConfig
from cdsl.constraints import RewardSpec
from cdsl.engine import local_engine
from cdsl.generate import generate, load_pair
from cdsl.models import Codec
from cdsl.request import Request
from cdsl.rewards import coverage
from cdsl.stats import Stats
from cdsl.tasks import commongen_prompt
from jobs.bench import COMMONGEN_DEV, HARMLESS_DATA, load_dataset, load_harmless

app = typer.Typer(add_completion=False, help=__doc__)


def _figures(outs, reqs, seconds: float) -> dict:
    tokens = sum(o.stats.tokens for o in outs)
    cov = [coverage(o.text, r.reward.concepts) for o, r in zip(outs, reqs)]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "mean_coverage": sum(cov) / len(cov)}


def single_requests(task: str, dataset: str, limit: int, tokenizer, reward_model: str = BUILTIN_HARMLESS
             ) -> Callable[[str], list[Request]]:
    """method -> the requests of `--single`: CommonGen concept sets, or hh-rlhf dialogues (the
    default file's held-out ones) scored by `reward_model`."""
    if task == "harmless":
        prompts = load_harmless(dataset or str(HARMLESS_DATA), limit, tokenizer, held_out=not dataset)
        spec = RewardSpec(reward_model=reward_model)
        return lambda method: [Request(p, DecodeConfig(method=method), spec) for p in prompts]
    if task != "commongen":
        raise typer.BadParameter("task: use commongen or harmless", param_hint="--task")
    sets = load_dataset(dataset or (str(COMMONGEN_DEV) if COMMONGEN_DEV.exists() else "builtin"), limit)
    return lambda method: [Request(commongen_prompt(c, tokenizer), DecodeConfig(method=method),
                                   RewardSpec(concepts=c)) for c in sets]


def single(requests_for: Callable[[str], list[Request]], methods: list[str], target: str, draft: str,
           out: Path) -> dict:
    """Serial against overlapped pipeline, one request at a time (see the module's doc)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # two model workers per pipeline
    models = dict(target=ModelConfig(path=target), draft=ModelConfig(path=draft), cpus_per_worker=1.0)
    pipes = {mode: Pipeline(PipelineConfig(**models, overlap=mode == "overlapped", search_ahead=mode == "overlapped"))
             for mode in ("serial", "overlapped")}
    results: dict = {"sets": len(requests_for(methods[0])), "serial_s": {}, "overlapped_s": {}, "texts_differ": {},
                     "stats": {}}
    try:
        for method in methods:
            reqs = requests_for(method)
            for pipe in pipes.values():  # warm-up
                pipe.generate(reqs[0])
            seconds, texts = {m: 0.0 for m in pipes}, {m: [] for m in pipes}
            totals = {m: Stats() for m in pipes}
            for req in tqdm(reqs, desc=method, unit="set"):
                for mode, pipe in pipes.items():
                    start = time.perf_counter()
                    gen = pipe.generate(req)
                    seconds[mode] += time.perf_counter() - start
                    texts[mode].append(gen.text)
                    totals[mode].add(gen.stats)
            results["serial_s"][method], results["overlapped_s"][method] = seconds["serial"], seconds["overlapped"]
            results["texts_differ"][method] = sum(a != b for a, b in zip(texts["serial"], texts["overlapped"]))
            results["stats"][method] = {m: {k: v for k, v in st.to_dict().items() if k != "state_trace"}
                                        for m, st in totals.items()}
            typer.echo(f"{method}: serial {seconds['serial']:.1f} s, overlapped {seconds['overlapped']:.1f} s "
                       f"({seconds['overlapped'] / seconds['serial']:.2f}x), "
                       f"{results['texts_differ'][method]} texts differ", err=True)
        results["workers"] = {mode: pipe.placement() for mode, pipe in pipes.items()}
    finally:
        for pipe in pipes.values():
            pipe.shutdown()
        ray.shutdown()
    results["same_text"] = not any(results["texts_differ"].values())
    results["ratio"] = {m: results["overlapped_s"][m] / results["serial_s"][m] for m in methods}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    typer.echo("| method | serial s | overlapped s | ratio |\n|---|---|---|---|")
    for m in methods:
        serial, overlapped = results["serial_s"][m], results["overlapped_s"][m]
        typer.echo(f"| {m} | {serial:.1f} | {overlapped:.1f} | {results['ratio'][m]:.2f}x |")
    typer.echo(f"same text: {results['same_text']}; figures written to {out}")
    return results


@app.command()
def main(
    requests: int = typer.Option(64, help="Concurrent requests (CommonGen concept sets)."),
    method: str = typer.Option("cdsl", help="Decoding method for every request."),
    dataset: str = typer.Option("", help="builtin (bundled samples), or a CommonGen/Parquet/JSONL file "
                                "(default: builtin; with --single, CommonGen dev where it is beside the checkout)."),
    target: str = typer.Option(BUILTIN_TARGET),
    draft: str = typer.Option(BUILTIN_DRAFT),
    target_tp: int = typer.Option(1, help="Tensor-parallel size of the Ray target group."),
    out: Path = typer.Option(Path("runs/bench_pipeline.json"), help="Where the figures go (JSON)."),
    one: bool = typer.Option(False, "--single", help="One request at a time: serial against overlapped pipeline."),
    limit: int = typer.Option(12, min=1, help="--single: concept sets to run."),
    methods: str = typer.Option("sd,cdsl", help="--single: comma-separated methods."),
    task: str = typer.Option("commongen", help="--single: commongen, or harmless (hh-rlhf dialogues, the "
                             "default harmless reward model)."),
    reward_model: str = typer.Option(BUILTIN_HARMLESS, help="--single --task harmless: the reward model."),
) -> None:
    if one:
        tokenizer = Codec.load(ModelConfig(path=target), "target").tokenizer
        names = [m.strip() for m in methods.split(",") if m.strip()]
        single(single_requests(task, dataset, limit, tokenizer, reward_model), names, target, draft, out)
        return
    dataset = dataset or "builtin"
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
