"""How fast CDSL and speculative decoding could be with a pair, given perfect foresight.

    python -m jobs.bench_oracle --limit 30                        # CommonGen dev
    python -m jobs.bench_oracle --task harmless --limit 9         # held-out hh-rlhf dialogues
    python -m jobs.bench_oracle --limit 30 --lookup-len 6         # and with prompt lookup's rows

Two bounds, each measured side by side with the real methods, interleaved per example:
- **oracle cdsl**: knows in advance where exact CDSL's target searches change the choice (the
  positions where CDLH's text departs from the target's argmax) and searches only there,
  speculating from the argmax everywhere else. It writes CDLH's text (checked), so its wall time
  bounds every CDSL that writes CDLH's text with this draft, however well it guesses where to
  search.
- **oracle sd**: speculative decoding whose draft ends each proposal exactly before its first
  token the target rejects (a perfect `draft_confidence`). It writes greedy's text (checked), so
  its wall time bounds every stopping rule for this draft.
With `--lookup-len N`, cdsl, oracle cdsl and sd also run with prompt lookup's proposals (one more
row in each verification, docs/proposers.md) beside the runs without: does the bound move?
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from cdsl.config import BUILTIN_DRAFT, BUILTIN_HARMLESS, BUILTIN_TARGET, DecodeConfig
from cdsl.generate import load_pair
from cdsl.methods import METHODS, Context, Generation
from cdsl.methods.cdsl import commit, headroom, propose, search_on_target, stake
from cdsl.methods.speculative import commit_prefix, draft_and_verify
from cdsl.models import LM
from jobs.bench import COMMONGEN_DEV, HARMLESS_DATA, commongen_examples, harmless_examples, load_dataset, load_harmless

app = typer.Typer(add_completion=False)


@torch.inference_mode()
def departures(target: LM, prompt: str, out: list[int]) -> set[int]:
    """Positions of `out` where it is not the target's argmax given the prompt and what precedes."""
    ids = target.prompt_ids(prompt)
    logits = target.model(input_ids=torch.tensor([ids + out])).logits[0, len(ids) - 1: -1, : target.vocab_size]
    return {i for i, tok in enumerate(logits.argmax(-1).tolist()) if tok != out[i]}


def oracle_cdsl(ctx: Context, changes: set[int]) -> None:
    """CDSL that searches on the target only at `changes` and speculates from the argmax
    elsewhere, never past the next change."""
    ahead = sorted(changes)
    while not ctx.finished:
        ctx.stats.rounds += 1
        logp = torch.log_softmax(ctx.target.next_logits(), dim=-1)
        pos = len(ctx.out)
        if pos in changes:
            _, room = headroom(ctx)
            search_on_target(ctx, stake(ctx, logp, room), logp, room)
            continue
        nxt = next((p for p in ahead if p > pos), None)
        s = propose(ctx, [int(logp.argmax())], 0.0)
        if nxt is not None:  # the next change is searched, never passed over
            s = replace(s, passed=min(s.passed, nxt - pos - 1))
        commit(ctx, s, s.passed)


def draft_agrees(prompt: str, target: LM, draft: LM, reward, config: DecodeConfig, reference: list[int]) -> list[bool]:
    """Per position of `reference` (the target's greedy text), whether the draft's own choice
    there, after the prompt and the reference before it, is the reference's token: read from
    one draft call over the reference with the decoding rules in place, as sd would draft it."""
    ctx = Context(prompt, target, draft, reward, config)
    try:
        rows = torch.cat([ctx.draft.next_logits()[None], ctx.draft.step(reference[:-1])]) if reference else None
    finally:
        ctx.close()
    return [] if rows is None else (rows.argmax(-1) == torch.tensor(reference)).tolist()


def oracle_sd(ctx: Context, agrees: list[bool]) -> None:
    """Speculative decoding whose draft proposes exactly the tokens it gets right from here (at
    least one: a round always drafts), so it stops before the first token the target rejects."""
    while not ctx.finished:
        ctx.stats.rounds += 1
        pos = len(ctx.out)
        right = next((i for i, ok in enumerate(agrees[pos:]) if not ok), len(agrees) - pos)
        commit_prefix(ctx, draft_and_verify(ctx, max(1, min(ctx.config.draft_len, ctx.budget, right))))


def timed(prompt: str, target: LM, draft: LM, reward, config: DecodeConfig, oracle=None) -> tuple[Generation, float]:
    """One generation (by `config.method`, or by `oracle(ctx)`) and its wall seconds."""
    ctx = Context(prompt, target, draft, reward, config)
    start = time.perf_counter()
    try:
        (oracle or METHODS[config.method].run)(ctx)
    finally:
        ctx.close()
    return ctx.result(), time.perf_counter() - start


@app.command()
def main(
    task: str = typer.Option("commongen", help="commongen (coverage of dev concept sets) or harmless (the default "
                             "reward model on held-out hh-rlhf dialogues)."),
    dataset: str = typer.Option("", help="CommonGen jsonl or hh-rlhf jsonl (default: the dev files in ../shared)."),
    limit: int = typer.Option(30, min=1),
    draft_len: int = typer.Option(4, min=1, help="d of the two sd runs (the draft card's d)."),
    warmup: int = typer.Option(1, min=0, help="Examples run first and not counted."),
    target: str = typer.Option(BUILTIN_TARGET),
    draft: str = typer.Option(BUILTIN_DRAFT),
    threads: int = typer.Option(2, min=1),
    out: Path = typer.Option(None, help="Also write the totals and per-example records to this JSON file."),
    lookup_len: int = typer.Option(0, min=0, help="Also run cdsl, oracle cdsl and sd with prompt lookup "
                                   "proposing up to this many tokens (0: not)."),
) -> None:
    """Print wall time, speed vs CDLH and greedy, and quality of the methods and their oracles."""
    torch.set_num_threads(threads)
    target_lm, draft_lm = load_pair(target, draft)
    if task == "commongen":
        examples = commongen_examples(load_dataset(dataset or str(COMMONGEN_DEV), limit + warmup), target_lm.tokenizer)
    elif task == "harmless":
        from cdsl.reward_model import RewardModel

        prompts = load_harmless(dataset or str(HARMLESS_DATA), limit + warmup, target_lm.tokenizer, held_out=True)
        examples = harmless_examples(prompts, RewardModel(BUILTIN_HARMLESS, cached_prompts=32))
    else:
        raise typer.BadParameter("task: use commongen or harmless", param_hint="--task")
    cfg = DecodeConfig()
    sd_cfg = cfg.model_copy(update={"method": "sd", "draft_len": draft_len})
    oracle_sd_cfg = sd_cfg.model_copy(update={"draft_confidence": 0.0})  # its foresight is the stopping rule
    sd_name, oracle_sd_name = f"sd d={draft_len}", f"oracle sd d={draft_len}"
    looked = {"lookup_len": lookup_len}
    with_lookup = ({f"{name}, lookup {lookup_len}": name for name in ("cdsl", "oracle cdsl", sd_name)}
                   if lookup_len else {})
    names = ("greedy", "cdsl", "oracle cdsl", "cdlh", sd_name, oracle_sd_name, *with_lookup)
    totals = {n: {"wall_s": 0.0, "score": 0.0, "ok": 0, "tokens": 0, "target_calls": 0, "drafted": 0,
                  "accepted": 0, "rounds": 0} for n in names}
    records, same = [], {"oracle cdsl": 0, oracle_sd_name: 0}
    rng = random.Random(0)
    for i, ex in enumerate(tqdm(examples, desc="oracle bench")):
        reward = ex.reward()
        greedy, t_greedy = timed(ex.prompt, target_lm, draft_lm, reward, cfg.model_copy(update={"method": "greedy"}))
        exact, t_exact = timed(ex.prompt, target_lm, draft_lm, reward, cfg)
        changes = departures(target_lm, ex.prompt, exact.token_ids)
        reference = greedy.token_ids + ([target_lm.eos_ids[0]] if greedy.finish_reason == "eos" else [])
        rest = {  # name -> (config, the oracle that replaces its method, if any)
            "oracle cdsl": (cfg, partial(oracle_cdsl, changes=changes)),
            "cdlh": (cfg.model_copy(update={"method": "cdlh"}), None),
            sd_name: (sd_cfg, None),
            oracle_sd_name: (oracle_sd_cfg, partial(oracle_sd, agrees=draft_agrees(
                ex.prompt, target_lm, draft_lm, reward, oracle_sd_cfg, reference))),
        }
        for name, plain in with_lookup.items():
            config, oracle = rest.get(plain, (cfg, None))
            rest[name] = (config.model_copy(update=looked), oracle)
        runs = {"greedy": (greedy, t_greedy), "cdsl": (exact, t_exact)}
        for name in rng.sample(list(rest), len(rest)):
            runs[name] = timed(ex.prompt, target_lm, draft_lm, reward, *rest[name])
        if i < warmup:
            continue
        same["oracle cdsl"] += runs["oracle cdsl"][0].text == exact.text
        for name in with_lookup:  # lookup rows are checked by the target: the same texts
            same[name] = same.get(name, 0) + (runs[name][0].text == (greedy if name.startswith("sd") else exact).text)
        same[oracle_sd_name] += runs[oracle_sd_name][0].text == greedy.text
        for name, (gen, wall) in runs.items():
            t = totals[name]
            t["wall_s"] += wall
            t["score"] += gen.reward
            t["ok"] += gen.reward >= ex.threshold
            for key in ("tokens", "target_calls", "drafted", "accepted", "rounds"):
                t[key] += getattr(gen.stats, key)
        records.append({**ex.record, "changes": sorted(changes), **{n: g.text for n, (g, _) in runs.items()}})
    n = len(records)
    ok = "reward >= 0.5" if task == "harmless" else "all concepts"
    mean = "mean reward" if task == "harmless" else "mean coverage"
    typer.echo(f"\n{n} examples ({task}), {threads} threads, one run; oracle cdsl wrote cdsl's text in "
               f"{same['oracle cdsl']}/{n}, oracle sd wrote greedy's in {same[oracle_sd_name]}/{n}"
               + "".join(f"; {name} wrote {'greedy' if name.startswith('sd') else 'cdsl'}'s in {same[name]}/{n}"
                         for name in with_lookup) + "\n")
    typer.echo(f"| run | {ok} | {mean} | wall s | speedup vs CDLH | wall vs greedy | target calls/token | acceptance |")
    typer.echo("|---|---|---|---|---|---|---|---|")
    for name, t in totals.items():
        acc = f"{t['accepted'] / t['drafted']:.1%}" if t["drafted"] else "-"
        typer.echo(f"| {name} | {t['ok'] / n:.1%} | {t['score'] / n:.1%} | {t['wall_s']:.1f} "
                   f"| {totals['cdlh']['wall_s'] / t['wall_s']:.2f}x | {t['wall_s'] / totals['greedy']['wall_s']:.2f}x "
                   f"| {t['target_calls'] / max(1, t['tokens']):.2f} | {acc} |")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"task": task, "n": n, "same_text": same, "totals": totals, "records": records},
                                  indent=1))


if __name__ == "__main__":
    app()
