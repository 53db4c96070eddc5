"""The one-command GPU check (`make gpu-check`): what the CPU test suite cannot see.

    python -m jobs.gpu_check [--sets 12] [--target builtin:...] [--draft builtin:...] [--out runs/gpu_check]

On the first visible GPU, with a real pair:
1. float32: greedy `sd` equals greedy target decoding token for token (lossless speculation);
2. float32: the in-process library and the Ray pipeline (all requests batched) give the same texts;
3. bfloat16: the same comparison, counting how often batching changes a text (rounding in a
   batch may differ from one request alone: the share is reported, not hidden);
4. `cdsl bench` in bfloat16 (greedy, cdlh, cdsl) and the pipeline's tokens/s next to the library's;
5. with two or more GPUs, a DeepSpeed TP = 2 target gives the TP = 1 texts (float32).
It prints one table (tokens/s per method, acceptance, speedup vs CDLH, GPU memory peak) and
writes it with every figure to OUT/gpu_check.json. With no GPU visible it fails at once (exit
1): a check that silently ran on CPU would prove nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from cdsl.config import BUILTIN_DRAFT, BUILTIN_TARGET, DecodeConfig, ModelConfig
from cdsl.constraints import RewardSpec
from cdsl.generate import generate, load_pair
from cdsl.request import Request
from cdsl.tasks import commongen_prompt
from jobs.bench import commongen_examples, load_samples, run_bench

app = typer.Typer(add_completion=False, help=__doc__)


def require_gpu() -> int:
    """The number of visible GPUs; exits 1 with the reason when there are none."""
    import torch

    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        typer.echo(f"gpu-check: FAILED: {why} (torch {torch.__version__}); run it on a machine with a GPU "
                   "and a CUDA build of torch", err=True)
        raise typer.Exit(1)
    return torch.cuda.device_count()


def _pipeline_texts(reqs: list[Request], target: ModelConfig, draft: ModelConfig, tp: int = 1) -> list[str]:
    from actors.config import PipelineConfig
    from actors.pipeline import Pipeline

    # fractions, so the draft shares a GPU with a target rank: one GPU holds a TP = 1 pipeline
    pipe = Pipeline(PipelineConfig(target=target, draft=draft, target_tp=tp, target_num_gpus=0.75,
                                   draft_num_gpus=0.25))
    try:
        return [g.text for g in pipe.generate_many(reqs)]
    finally:
        pipe.shutdown()


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


@app.command()
def main(
    sets: int = typer.Option(12, min=2, help="CommonGen concept sets (the bundled sample) per check."),
    target: str = typer.Option(BUILTIN_TARGET),
    draft: str = typer.Option(BUILTIN_DRAFT),
    max_new_tokens: int = typer.Option(32, min=1),
    out: Path = typer.Option(Path("runs/gpu_check"), help="Folder for gpu_check.json."),
) -> None:
    import torch

    gpus = require_gpu()
    figures: dict = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__}
    failures: list[str] = []
    concept_sets = (load_samples() * sets)[:sets]

    def pair(dtype: str):
        return (ModelConfig(path=target, dtype=dtype, device="cuda"),
                ModelConfig(path=draft, dtype=dtype, device="cuda"))

    def requests(method: str, prompts_from) -> list[Request]:
        return [Request(commongen_prompt(c, prompts_from.tokenizer),
                        DecodeConfig(method=method, max_new_tokens=max_new_tokens), RewardSpec(concepts=c))
                for c in concept_sets]

    t32, d32 = pair("float32")
    target_lm, draft_lm = load_pair(t32, d32)
    greedy_reqs, cdsl_reqs = requests("greedy", target_lm), requests("cdsl", target_lm)
    greedy = [generate(r.prompt, target_lm, None, None, r.config).token_ids for r in greedy_reqs]
    sd = [generate(r.prompt, target_lm, draft_lm, None, r.config.model_copy(update={"method": "sd"})).token_ids
          for r in greedy_reqs]
    figures["sd_equals_greedy_fp32"] = _agreement(sd, greedy)
    if figures["sd_equals_greedy_fp32"] < 1.0:
        failures.append(f"greedy sd differs from greedy decoding in float32 on "
                        f"{1 - figures['sd_equals_greedy_fp32']:.0%} of the sets")
    local = [generate(r.prompt, target_lm, draft_lm, r.reward.build(), r.config).text for r in cdsl_reqs]
    del target_lm, draft_lm
    torch.cuda.empty_cache()
    figures["pipeline_equals_library_fp32"] = _agreement(_pipeline_texts(cdsl_reqs, t32, d32), local)
    if figures["pipeline_equals_library_fp32"] < 1.0:
        failures.append("the Ray pipeline's batched cdsl texts differ from the library's in float32")
    if gpus >= 2:
        figures["tp2_equals_tp1_fp32"] = _agreement(_pipeline_texts(cdsl_reqs, t32, d32, tp=2), local)
        if figures["tp2_equals_tp1_fp32"] < 1.0:
            failures.append("DeepSpeed TP = 2 texts differ from TP = 1 in float32")

    t16, d16 = pair("bfloat16")
    target_lm, draft_lm = load_pair(t16, d16)
    local16 = [generate(r.prompt, target_lm, draft_lm, r.reward.build(), r.config).text for r in cdsl_reqs]
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = run_bench(commongen_examples(concept_sets, tokenizer=target_lm.tokenizer),
                        {m: DecodeConfig(method=m, max_new_tokens=max_new_tokens) for m in ("greedy", "cdlh", "cdsl")},
                        target_lm, draft_lm, warmup=1, progress=False)
    figures["bench_bf16_s"] = time.perf_counter() - start
    figures["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del target_lm, draft_lm
    torch.cuda.empty_cache()
    batched16 = _pipeline_texts(cdsl_reqs, t16, d16)
    figures["pipeline_equals_library_bf16"] = _agreement(batched16, local16)  # reported: rounding may differ
    cdlh_wall = results["cdlh"]["wall_s"]
    figures["methods_bf16"] = {name: {"tokens_per_s": d["tokens_per_s"], "acceptance": d["acceptance"],
                                      "coverage_all": d["coverage_all"], "speedup_vs_cdlh": cdlh_wall / d["wall_s"]}
                               for name, d in results.items()}
    figures["failures"] = failures
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2))
    typer.echo(f"{figures['device']} x {gpus}, torch {figures['torch']}; GPU memory peak (bench, bf16) "
               f"{figures['gpu_memory_peak_gib']:.2f} GiB")
    typer.echo("| method (bf16) | tokens/s | acceptance | all concepts | speedup vs CDLH |\n|---|---|---|---|---|")
    for name, d in figures["methods_bf16"].items():
        typer.echo(f"| {name} | {d['tokens_per_s']:.1f} | {d['acceptance']:.2f} | {d['coverage_all']:.0%} "
                   f"| {d['speedup_vs_cdlh']:.2f}x |")
    for key in ("sd_equals_greedy_fp32", "pipeline_equals_library_fp32", "tp2_equals_tp1_fp32",
                "pipeline_equals_library_bf16"):
        if key in figures:
            typer.echo(f"{key}: {figures[key]:.0%}")
    if failures:
        typer.echo("gpu-check: FAILED: " + "; ".join(failures), err=True)
        raise typer.Exit(1)
    typer.echo(f"gpu-check: passed; figures in {out / 'gpu_check.json'}")


if __name__ == "__main__":
    app()
