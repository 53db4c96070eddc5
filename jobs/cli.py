"""`cdsl` command line: `cdsl generate --concepts "dog,frisbee,catch,throw" --method cdsl`.

It lives in `jobs/` because it fronts every layer: the in-process library, and (with
`--backend ray`) the Ray pipeline in `actors/`."""

from __future__ import annotations

import json
import sys

import typer
from pydantic import ValidationError

from cdsl.config import BUILTIN_DRAFT, BUILTIN_HARMLESS, BUILTIN_TARGET, DecodeConfig, ModelConfig
from cdsl.constraints import RewardSpec
from cdsl.errors import RequestError
from cdsl.generate import generate as run_generate
from cdsl.generate import load_pair
from cdsl.methods import METHODS
from cdsl.models import Codec
from cdsl.request import Limits, Request, RequestInput
from cdsl.request import validation_error as to_request_error
from cdsl.tasks import parse_concepts
from jobs.options import decode_options

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

TARGET = typer.Option(BUILTIN_TARGET, help="Target model: local folder, hub id, .gguf file or builtin name.")
DRAFT = typer.Option(BUILTIN_DRAFT, help="Draft model: local folder, hub id, .gguf file or builtin name.")
ONEDNN = typer.Option(True, "--onednn/--no-onednn", help=ModelConfig.model_fields["onednn"].description)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def validation_error(err: ValidationError) -> str:
    """The first problem, as every front end words it ("<field>: <problem>", `cdsl.request`)."""
    return str(to_request_error(err))


def split_list(value: str | None) -> list[str]:
    return [w.strip() for w in value.split(",") if w.strip()] if value else []


@app.command()
@decode_options()
def generate(
    concepts: str = typer.Option(None, help="Concepts to cover, comma-separated (CommonGen task)."),
    prompt: str = typer.Option(None, help="Prompt text; default: the CommonGen prompt built from --concepts."),
    dialogue: str = typer.Option(None, help="An hh-rlhf dialogue ending in '\\n\\nAssistant:' to answer, sent to "
                                 "the target as chat turns (the harmless task); instead of --prompt."),
    keywords: str = typer.Option(None, help="Comma-separated keywords that must appear."),
    regex: str = typer.Option(None, help="A pattern the text must match."),
    reward_model: str = typer.Option(None, help="A sequence-classification reward model (folder, hub id or "
                                     f"{BUILTIN_HARMLESS}); combines with the other constraints."),
    reward_label: str = typer.Option(None, help="Label of --reward-model whose probability is the reward."),
    target: str = TARGET,
    draft: str = DRAFT,
    dtype: str = typer.Option("float32", help="Model dtype: float32, float64, bfloat16, float16."),
    device: str = typer.Option("cpu", help="torch device for both models."),
    backend: str = typer.Option("local", help="local: in this process; ray: through the Ray pipeline "
                                "(a local Ray is started if none is running; RAY_ADDRESS picks a cluster)."),
    target_tp: int = typer.Option(1, help="Tensor-parallel size of the target (--backend ray)."),
    onednn: bool = ONEDNN,
    as_json: bool = typer.Option(False, "--json", help='Print {"text": ..., "stats": {...}}.'),
    decode: DecodeConfig = None,
) -> None:
    """Generate one text under a constraint and print it (or JSON with its stats)."""
    if backend not in ("local", "ray"):
        fail(f"--backend must be local or ray, not {backend!r}")
    try:
        ask = RequestInput(
            prompt=prompt, dialogue=dialogue,
            constraints=RewardSpec(concepts=parse_concepts(concepts) if concepts else [], keywords=split_list(keywords),
                                   regex=regex, reward_model=reward_model, reward_model_label=reward_label),
            decode=decode)
        target_cfg = ModelConfig(path=target, dtype=dtype, device=device, onednn=onednn)
        needs_draft = METHODS[ask.decode.method].needs_draft
        draft_cfg = ModelConfig(path=draft, dtype=dtype, device=device, onednn=onednn) if needs_draft else None
        request = ask.build(Codec.load(target_cfg, "target"), Limits(), needs_draft)
        reward = request.reward.build() if request.reward is not None else None
    except ValidationError as err:
        fail(validation_error(err))
    except RequestError as err:
        fail(str(err))
    except (OSError, ValueError) as err:  # a model or reward model that cannot be loaded
        fail(str(err))
    if backend == "ray":
        result = _generate_on_ray(request, target_cfg, draft_cfg, target_tp)
    else:
        try:
            target_lm, draft_lm = load_pair(target_cfg, draft_cfg)
        except (OSError, ValueError) as err:
            fail(str(err))
        result = run_generate(request.prompt, target_lm, draft_lm, reward, request.config)
    if as_json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        typer.echo(result.text.strip())


def _generate_on_ray(request: Request, target: ModelConfig, draft: ModelConfig | None, target_tp: int):
    import os

    from actors.config import PipelineConfig
    from actors.pipeline import Pipeline

    try:
        pipe_cfg = PipelineConfig(target=target, draft=draft, target_tp=target_tp)
        if draft is not None:
            Codec.load(draft)  # a bad path fails here, not inside a Ray actor
    except ValidationError as err:
        fail(validation_error(err))
    except (OSError, ValueError) as err:
        fail(str(err))
    pipe = Pipeline(pipe_cfg, address=os.environ.get("RAY_ADDRESS"))
    try:
        return pipe.generate(request)
    finally:
        pipe.shutdown()


@app.callback()
def main() -> None:
    """Constrained decoding with speculative lookaheads."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stdout/stderr to what the command prints


@app.command()
def prepare() -> None:
    """Make the default models' folders (convert the target's GGUF, assemble the draft and the
    harmless reward model) and print them."""
    from cdsl.pretrained import ModelSourceError, default_draft, default_harmless, default_target

    try:
        typer.echo(f"target: {default_target()}")
        typer.echo(f"draft: {default_draft()}")
        typer.echo(f"harmless reward model: {default_harmless()}")
    except (OSError, ModelSourceError) as err:
        fail(str(err))


@app.command()
def demo(
    methods: str = typer.Option("greedy,cdlh,cdsl", help="Comma-separated methods to compare."),
    samples: str = typer.Option(None, help="jsonl of {'concepts': [...]} rows; default: the bundled sample."),
    limit: int = typer.Option(0, help="Use only the first N concept sets (0: all)."),
    target: str = TARGET,
    draft: str = DRAFT,
) -> None:
    """Compare methods on the bundled concept sets, in-process, and print a table."""
    from rich.console import Console
    from rich.table import Table

    from jobs.bench import SAMPLES, load_samples, run_methods

    names = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        configs = [DecodeConfig(method=m) for m in names]
        target_lm, draft_lm = load_pair(ModelConfig(path=target), ModelConfig(path=draft))
    except ValidationError as err:
        fail(validation_error(err))
    except (OSError, ValueError) as err:
        fail(str(err))
    sets = load_samples(samples or SAMPLES)[: limit or None]
    results = run_methods(sets, names, target_lm, draft_lm, configs[0])
    ref = results["cdlh"].totals.time_total if "cdlh" in results else None
    table = Table(title=f"{len(sets)} concept sets, in-process")
    for col in ("method", "all covered", "mean coverage", "wall s", "target calls/token", "speedup vs cdlh"):
        table.add_column(col, justify="right")
    for name, s in results.items():
        d = s.to_dict()
        speed = f"{ref / d['wall_s']:.1f}x" if ref else "-"
        table.add_row(name, f"{d['coverage_all']:.0%}", f"{d['coverage_mean']:.0%}", f"{d['wall_s']:.1f}",
                      f"{d['target_calls_per_token']:.2f}", speed)
    Console().print(table)
    for name, s in results.items():
        typer.echo(f"{name}: {s.texts[0].strip()}")


@app.command()
@decode_options(skip=("method",))
def bench(
    task: str = typer.Option("commongen", help="commongen (concept coverage) or harmless (reward model)."),
    dataset: str = typer.Option("builtin", help="commongen: builtin, a CommonGen-format jsonl, or Parquet with "
                                "`concepts`; harmless: an hh-rlhf jsonl (default: ../shared/data/hh-rlhf)."),
    reward_model: str = typer.Option(BUILTIN_HARMLESS, help="harmless: reward model (folder, hub id or builtin name)."),
    reward_label: str = typer.Option(None, help="harmless: label whose probability is the reward (default: "
                                     "sigmoid of the first logit)."),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="harmless: a text passes at this reward."),
    held_out: bool = typer.Option(False, "--held-out", help="harmless: only the dialogues of the default reward "
                                  "model's held-out pairs (those it was not fitted on)."),
    reward_cache: bool = typer.Option(True, help="harmless: keep the reward model's cache of each prompt "
                                      "(--no-reward-cache re-reads the dialogue for every scored text)."),
    methods: str = typer.Option("greedy,sd,cdlh,cdlh-appx,cdsl", help="Comma-separated methods."),
    limit: int = typer.Option(0, help="Use only the first N examples (0: all)."),
    out: str = typer.Option("runs/bench", help="Folder for results.json, report.md and plots."),
    sweep: str = typer.Option(None, help='CDSL grid, e.g. "gain_share=1,0.5;accept_ratio=1,0.3;draft_len=3,5".'),
    sweep_methods: str = typer.Option("cdsl", help='Comma-separated methods the --sweep grid runs, e.g. "sd,cdsl".'),
    warmup: int = typer.Option(2, help="Concept sets run first and not counted."),
    readme: str = typer.Option(None, help="Also refresh the table between the bench markers of this file."),
    target: str = TARGET,
    draft: str = DRAFT,
    onednn: bool = ONEDNN,
    decode: DecodeConfig = None,
) -> None:
    """Benchmark methods side by side (and optionally sweep CDSL's knobs); writes OUT/results.json."""
    from pathlib import Path

    from cdsl.reward_model import RewardModel
    from jobs.bench import (
        HARMLESS_DATA,
        commongen_examples,
        harmless_examples,
        load_harmless,
        load_rows,
        parse_sweep,
        run_bench,
    )
    from jobs.report import refresh_readme, report_table, save_results

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if task not in ("commongen", "harmless"):
        fail(f"--task must be commongen or harmless, got {task!r}")
    try:
        base = decode
        if not names:
            fail("--methods is empty")
        runs = {m: DecodeConfig(**{**base.model_dump(), "method": m}) for m in names}
        grid = parse_sweep(sweep) if sweep else []
        swept = [m.strip() for m in sweep_methods.split(",") if m.strip()]
        sweep_runs = {f"{m} " + " ".join(f"{k_}={v}" for k_, v in g.items()):
                      DecodeConfig(**{**base.model_dump(), **g, "method": m}) for m in swept for g in grid}
        harmless_path = str(HARMLESS_DATA) if dataset == "builtin" else dataset
        sets = (load_rows(dataset, limit) if task == "commongen"
                else load_harmless(harmless_path, limit, held_out=held_out))
        target_lm, draft_lm = load_pair(ModelConfig(path=target, onednn=onednn), ModelConfig(path=draft, onednn=onednn))
        if task == "commongen":
            examples = commongen_examples([r["concepts"] for r in sets], target_lm.tokenizer,
                                          [r["references"] for r in sets])
        else:  # the dialogues again, now as chat prompts for the target's template
            prompts = load_harmless(harmless_path, limit, target_lm.tokenizer, held_out)
            examples = harmless_examples(prompts, RewardModel(reward_model, reward_label,
                                                                 cached_prompts=32 if reward_cache else 0,
                                                                 onednn=onednn), threshold)
    except ValidationError as err:
        fail(validation_error(err))
    except (OSError, ValueError) as err:
        fail(str(err))
    results = run_bench(examples, {**runs, **sweep_runs}, target_lm, draft_lm, warmup=warmup)
    setup = {"task": task, "dataset": dataset, "target": target, "draft": draft,
             **({"reward_model": reward_model, "threshold": threshold, "reward_cache": reward_cache,
                 "held_out": held_out}
                if task == "harmless" else {}),
             **base.model_dump(mode="json", exclude={"method", "policy"})}
    folder = Path(out)
    report = save_results(folder, examples, results, list(runs), setup)
    typer.echo(report_table(report))
    if readme:
        refresh_readme(Path(readme), report)
    typer.echo(f"results: {folder / 'results.json'}, report: {folder / 'report.md'}")


@app.command("eval-reward")
def eval_reward(
    pairs: str = typer.Option(..., help='jsonl of {"chosen": dialogue, "rejected": dialogue} pairs (hh-rlhf).'),
    model: str = typer.Option(BUILTIN_HARMLESS, help="Reward model: local folder, hub id or builtin name."),
    label: str = typer.Option(None, help="Label whose softmax probability is the reward (default: sigmoid of "
                              "the first logit)."),
    limit: int = typer.Option(0, min=0, help="Use only the first N pairs (0: all)."),
    held_out: bool = typer.Option(False, "--held-out", help="Only the pairs `jobs.train_reward` keeps out of "
                                  "training (its split of harmless-dev.jsonl)."),
) -> None:
    """Print, as JSON, the pairwise accuracy of a reward model: the share of pairs where the
    chosen answer scores above the rejected one. Each dialogue is read as at decoding time: the
    dialogue up to its last Assistant turn as the prompt (through the model's chat template),
    that turn as the text; dialogues without such a turn are skipped and counted."""
    from pathlib import Path

    from cdsl.reward_model import RewardModel, pairwise_accuracy
    from cdsl.rewards import RewardInput
    from cdsl.tasks import split_dialogue

    path = Path(pairs)
    if not path.exists():
        fail(f"--pairs: no such file: {pairs}")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                fail(f"--pairs: line {n} is not JSON ({err})")
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("chosen", "rejected"))):
                fail(f"--pairs: line {n} needs string fields 'chosen' and 'rejected'")
            rows.append(row)
    if held_out:
        from cdsl.tasks import held_out_split

        rows = [rows[i] for i in held_out_split(len(rows))[1]]
    rows = rows[: limit or None]
    if not rows:
        fail("--pairs: the file has no pairs")
    try:
        rm = RewardModel(model, label)
    except (OSError, ValueError) as err:
        fail(f"--model: {err}")
    inputs = []
    for row in rows:
        try:
            inputs.append({k: RewardInput(*split_dialogue(row[k], rm.tokenizer), final=True) for k in ("chosen",
                                                                                                     "rejected")})
        except ValueError:
            continue
    scored: list[float] = []

    def score(items: list[RewardInput]) -> list[float]:
        out = rm.score(items)
        scored.extend(out)
        return out

    accuracy = pairwise_accuracy(score, inputs)
    typer.echo(json.dumps({"model": model, "pairs": len(inputs), "skipped": len(rows) - len(inputs),
                           "accuracy": accuracy, "mean_score": sum(scored) / max(1, len(scored))}, indent=2))
