"""How good a draft is for its target, side by side in one run: the figures on the draft's card.

    python -m jobs.bench_draft --limit 50 --out cdsl/bundled/draft/eval.json

- forward cost: one-token forwards over a cached 48-token prefix, target and draft interleaved,
  at batch 1 and batch 5, on the same threads;
- speculative decoding (`sd`, greedy, d = 4) against greedy target decoding on CommonGen dev
  prompts, interleaved per prompt: acceptance (accepted / drafted tokens), wall-time ratio, and
  how many outputs equal greedy's (all of them, or SD is broken);
- teacher-forced top-1 agreement of the draft with the target on the target's greedy outputs.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm
from transformers import DynamicCache

from cdsl.config import BUILTIN_DRAFT, BUILTIN_TARGET, DecodeConfig, ModelConfig
from cdsl.generate import generate, load_pair
from cdsl.kernels import parameter_count
from cdsl.models import LM
from cdsl.tasks import commongen_prompt, read_commongen_jsonl
from jobs.bench import COMMONGEN_DEV

app = typer.Typer(add_completion=False)


@torch.inference_mode()
def forward_ms(models: dict[str, LM], batch: int, reps: int = 30, prefix: int = 48, width: int = 1) -> dict[str, float]:
    """Median milliseconds of a forward over `width` new tokens in each of `batch` rows after a
    cached prefix, per model, interleaved."""
    vocab = min(lm.vocab_size for lm in models.values())
    ids = torch.randint(vocab // 4, vocab, (batch, prefix))  # ordinary tokens, past the special ones
    step = torch.randint(vocab // 4, vocab, (batch, width))
    caches = {}
    for name, lm in models.items():
        caches[name] = lm.model(input_ids=ids, cache=DynamicCache(), use_cache=True).cache
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, lm in models.items():
            start = time.perf_counter()
            lm.model(input_ids=step, cache=caches[name], use_cache=True)
            times[name].append((time.perf_counter() - start) * 1000)
            caches[name].crop(-width)  # back to the prefix
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def agreement(target: LM, draft: LM, prompt: str, answer: list[int]) -> tuple[int, int]:
    """(positions where the draft's argmax is the target's, positions) over the answer and its EOS."""
    p = target.encode(prompt)
    ids = torch.tensor([p + answer])
    t = target.model(input_ids=ids).logits[0, len(p) - 1:, : target.vocab_size].argmax(-1)
    d = draft.model(input_ids=ids).logits[0, len(p) - 1:, : target.vocab_size].argmax(-1)
    return int((t == d).sum()), len(t)


@app.command()
def main(
    target: str = typer.Option(BUILTIN_TARGET, help="Target model."),
    draft: str = typer.Option(BUILTIN_DRAFT, help="Draft model."),
    dataset: Path = typer.Option(COMMONGEN_DEV, help="CommonGen jsonl (dev: the project's defaults are chosen there)."),
    limit: int = typer.Option(50, min=1, help="Concept sets for the SD and agreement figures."),
    draft_len: int = typer.Option(4, min=1, help="d of speculative decoding."),
    confidence: str = typer.Option(f"{DecodeConfig().draft_confidence},0",
                                   help="draft_confidence values of speculative decoding, comma-separated, each run "
                                   "side by side with greedy (0: always d tokens; the first is the card's)."),
    branches: str = typer.Option(f"{DecodeConfig().draft_branches},1",
                                 help="draft_branches values of speculative decoding, comma-separated, each run "
                                 "with the first --confidence side by side with greedy (the first is the card's)."),
    max_new_tokens: int = typer.Option(48, min=1),
    threads: int = typer.Option(2, min=1),
    out: Path = typer.Option(None, help="Also write the figures to this JSON file."),
    card: Path = typer.Option(None, help="Also refresh the figure table of this model card (between the "
                              "<!-- figures:start --> and <!-- figures:end --> markers)."),
) -> None:
    """Print (and optionally save) the draft's forward cost, SD acceptance and speed, and agreement."""
    torch.set_num_threads(threads)
    target_lm, draft_lm = load_pair(ModelConfig(path=target), ModelConfig(path=draft))
    models = {"target": target_lm, "draft": draft_lm}
    for lm in models.values():  # warm-up
        forward_ms({"m": lm}, 1, reps=3)
    cost = {f"batch{b}": forward_ms(models, b) for b in (1, 5)}
    sets = [row["concepts"] for row in read_commongen_jsonl(dataset)][:limit]
    greedy_cfg = DecodeConfig(method="greedy", max_new_tokens=max_new_tokens)
    try:
        stops = [float(c) for c in confidence.split(",") if c.strip()]
        widths = [int(b) for b in branches.split(",") if b.strip()]
        settings = [(stops[0], widths[0])] + [(c, widths[0]) for c in stops[1:]] + [(stops[0], b) for b in widths[1:]]
        sd_cfgs = [DecodeConfig(method="sd", draft_len=draft_len, draft_confidence=c, draft_branches=b,
                                max_new_tokens=max_new_tokens) for c, b in settings]
    except (ValueError, IndexError) as err:
        raise typer.BadParameter(f"--confidence / --branches: {err}") from err
    greedy_wall, hits, positions = 0.0, 0, 0
    sd = [{"draft_len": draft_len, "draft_confidence": cfg.draft_confidence, "draft_branches": cfg.draft_branches,
           "branch_below": cfg.branch_below, "wall_s": 0.0, "drafted": 0, "accepted": 0, "other_branches": 0,
           "outputs_equal_to_greedy": 0} for cfg in sd_cfgs]
    for concepts in tqdm(sets, desc="dev sets", mininterval=10):
        prompt = commongen_prompt(concepts, target_lm.tokenizer)
        g = generate(prompt, target_lm, None, None, greedy_cfg)
        greedy_wall += g.stats.time_total
        for cfg, fig in zip(sd_cfgs, sd):
            s = generate(prompt, target_lm, draft_lm, None, cfg)
            fig["wall_s"] += s.stats.time_total
            fig["drafted"] += s.stats.drafted
            fig["accepted"] += s.stats.accepted
            fig["other_branches"] += s.stats.other_branches
            fig["outputs_equal_to_greedy"] += s.token_ids == g.token_ids
        end = [target_lm.eos_id] if g.finish_reason == "eos" else []
        h, n = agreement(target_lm, draft_lm, prompt, g.token_ids + end)
        hits, positions = hits + h, positions + n
    for fig in sd:
        fig.update(acceptance=fig["accepted"] / max(1, fig["drafted"]),  # of the branches kept
                   acceptance_every_branch=fig["accepted"] / max(1, fig["drafted"] + fig["other_branches"]),
                   greedy_wall_s=greedy_wall,
                   wall_vs_greedy=fig["wall_s"] / greedy_wall)
    figures = {
        "target": target, "draft": draft, "dataset": str(dataset), "sets": len(sets), "threads": threads,
        "forward_ms": cost,
        "forward_ratio": {b: c["target"] / c["draft"] for b, c in cost.items()},
        "sd": sd[0],
        "sd_variants": sd[1:],
        "teacher_forced_agreement": hits / max(1, positions),
        "draft_parameters_M": parameter_count(draft_lm.model) / 1e6,
    }
    typer.echo(json.dumps(figures, indent=2))
    if out is not None:
        out.write_text(json.dumps(figures, indent=2) + "\n")
    if card is not None:
        refresh_card(card, figures)


def figure_table(f: dict) -> str:
    """The card's table of `main`'s figures."""
    c, sd = f["forward_ms"], f["sd"]
    return "\n".join([
        f"{f['sets']} CommonGen dev concept sets, {f['threads']} torch threads, one run "
        f"(`python -m jobs.bench_draft --limit {f['sets']}`):",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| one-token forward, batch {b[5:]}: target / draft | {c[b]['target']:.1f} ms / {c[b]['draft']:.1f} ms "
          f"({f['forward_ratio'][b]:.1f}x cheaper) |" for b in ("batch1", "batch5")],
        f"| speculative decoding (greedy, d = {sd['draft_len']}{_confidence(sd)}): draft tokens accepted | "
        f"{sd['acceptance']:.1%}" + (f" (of every branch's: {sd['acceptance_every_branch']:.1%})"
                                     if sd.get("other_branches") else "") + " |",
        f"| speculative decoding wall time vs greedy decoding | {sd['wall_vs_greedy']:.2f}x "
        f"({sd['wall_s']:.1f} s / {sd['greedy_wall_s']:.1f} s) |",
        f"| outputs of speculative decoding equal to greedy's | {sd['outputs_equal_to_greedy']} of {f['sets']} |",
        *[f"| the same with {_setting(v, sd)}: accepted / wall vs greedy | "
          f"{v['acceptance']:.1%} / {v['wall_vs_greedy']:.2f}x |" for v in f.get("sd_variants", [])],
        f"| teacher-forced top-1 agreement with the target's greedy outputs | {f['teacher_forced_agreement']:.1%} |",
    ])


def _confidence(sd: dict) -> str:
    out = f", draft_confidence {sd['draft_confidence']}" if sd.get("draft_confidence") else ""
    if sd.get("draft_branches", 1) > 1:
        out += f", {sd['draft_branches']} branches below {sd['branch_below']}"
    return out


def _setting(variant: dict, card: dict) -> str:
    """What a side-by-side sd run changed from the card's."""
    if variant.get("draft_branches", 1) != card.get("draft_branches", 1):
        return f"draft_branches {variant['draft_branches']}"
    return f"draft_confidence {variant['draft_confidence']}"


def refresh_card(card: Path, figures: dict) -> None:
    text = card.read_text()
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    if start not in text or end not in text:
        raise typer.BadParameter(f"{card} has no {start} ... {end} markers", param_hint="--card")
    head, rest = text.split(start, 1)
    card.write_text(head + start + "\n" + figure_table(figures) + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    app()
