"""Make the default draft from the target: teacher data, then resumable distillation stages.

    python -m jobs.distill_draft teacher --out runs/distill           # the target's own answers
    python -m jobs.distill_draft train --out runs/distill --minutes 100  # resumes where it stopped
    python -m jobs.distill_draft export --out runs/distill --to cdsl/bundled/draft

`teacher` runs the target greedily on task prompts (CommonGen train concept sets and hh-rlhf
dialogues, built by `cdsl.tasks` exactly as at serving time) and keeps, for every answer token,
the target's top-K log-probabilities: the draft learns the target's own outputs and
distributions, which is what speculative decoding needs it to agree with. Shards are written
whole, so a stopped run resumes at the next shard.

`train` builds the draft (`cdsl.draft_model`: the target's first layers, with a head over the
most frequent answer tokens) and minimises KL(target || draft) over the top-K plus cross-entropy
on the target's greedy token, at the answer positions only. It checkpoints every few minutes and
continues from the last checkpoint when run again, so it can be split into stages.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from cdsl.models import eos_ids
from cdsl.tasks import commongen_prompt, harmless_prompt, parse_concepts

app = typer.Typer(add_completion=False, no_args_is_help=True)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _task_prompts(tokenizer, data: Path, commongen: int, harmless: int, seed: int) -> list[str]:
    """Unique CommonGen train concept sets and hh-rlhf dialogues, shuffled, as chat prompts."""
    rng = random.Random(seed)
    sets = list(dict.fromkeys((data / "commongen" / "train.src.txt").read_text().split("\n")))
    sets = [s for s in sets if s.strip()]
    rng.shuffle(sets)
    prompts = [commongen_prompt(parse_concepts(s.split()), tokenizer) for s in sets[:commongen]]
    dialogues = [json.loads(line)["chosen"] for line in open(data / "hh-rlhf" / "harmless-dev.jsonl")]
    rng.shuffle(dialogues)
    for dialogue in dialogues[:harmless]:
        try:
            prompts.append(harmless_prompt(dialogue, tokenizer))
        except ValueError:  # a malformed dialogue (no Human turn to answer)
            continue
    rng.shuffle(prompts)
    return prompts


@torch.inference_mode()
def _teach(model, tokenizer, prompts: list[str], max_new_tokens: int, top_k: int, max_prompt: int,
           eos: set[int]) -> list[dict]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    truncation=True, max_length=max_prompt)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)  # [B, T, V]
    top = logp.topk(top_k, -1)
    answers = out.sequences[:, enc["input_ids"].shape[1]:]
    rows = []
    for b in range(len(prompts)):
        ids = answers[b].tolist()
        n = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        rows.append({"prompt": prompt, "answer": ids[:n], "top_ids": top.indices[b, :n].to(torch.int32),
                     "top_logp": top.values[b, :n].half()})
    return rows


def _load_target(target: str, threads: int):
    """(folder, tokenizer, model) of the target (the default one unless `target` names another)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdsl.pretrained import default_target

    torch.set_num_threads(threads)
    path = target or str(default_target())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, AutoTokenizer.from_pretrained(path), model


def _write_shard(path: Path, rows: list[dict]) -> None:
    """A shard exists whole or not at all, so a stopped stage resumes at the next one."""
    tmp = path.with_suffix(".tmp")
    torch.save(rows, tmp)
    tmp.rename(path)


@app.command()
def teacher(
    out: Path = typer.Option(Path("runs/distill"), help="Run folder; shards go to OUT/teacher."),
    target: str = typer.Option("", help="Target folder (default: the default target)."),
    commongen: int = typer.Option(6000, help="CommonGen train concept sets."),
    harmless: int = typer.Option(600, help="hh-rlhf dialogues."),
    batch: int = 32, shard: int = 256, max_new_tokens: int = 40, top_k: int = 32, max_prompt: int = 320,
    seed: int = 0, threads: int = 2, data: Path = DATA,
) -> None:
    """Write the target's greedy answers and top-K log-probabilities to OUT/teacher/shard-*.pt."""
    path, tokenizer, model = _load_target(target, threads)
    eos = set(eos_ids(tokenizer, path))
    prompts = _task_prompts(tokenizer, data, commongen, harmless, seed)
    folder = out / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(prompts), shard), desc="teacher shards", mininterval=10):
        path_s = folder / f"shard-{start // shard:05d}.pt"
        if path_s.exists():
            continue
        chunk = prompts[start:start + shard]
        # similar lengths together: less left padding per generate call
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))
        rows = []
        for i in range(0, len(order), batch):
            rows += _teach(model, tokenizer, [chunk[j] for j in order[i:i + batch]], max_new_tokens, top_k,
                           max_prompt, eos)
        _write_shard(path_s, rows)


@torch.inference_mode()
def _teach_forced(model, prompts: list[list[int]], answers: list[list[int]], top_k: int, pad: int) -> list[dict]:
    """The target's top-K at every position of given answers (teacher forcing, one forward)."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, seq in enumerate(seqs):  # right-padded: every row keeps its own positions
        ids[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    spans = [(b, len(p) - 1, len(p) + len(a) - 1) for b, (p, a) in enumerate(zip(prompts, answers))]
    at = torch.cat([hidden[b, lo:hi] for b, lo, hi in spans])  # the output head only where answers are
    top = torch.log_softmax(model.lm_head(at).float(), -1).topk(top_k, -1)
    rows, start = [], 0
    for (_, lo, hi), p, a in zip(spans, prompts, answers):
        rows.append({"prompt": p, "answer": a, "top_ids": top.indices[start:start + hi - lo].to(torch.int32),
                     "top_logp": top.values[start:start + hi - lo].half()})
        start += hi - lo
    return rows


@app.command()
def references(
    out: Path = typer.Option(Path("runs/distill"), help="Run folder; shards go to OUT/references."),
    target: str = typer.Option("", help="Target folder (default: the default target)."),
    sets: int = typer.Option(20000, help="CommonGen train (concept set, human sentence) pairs."),
    batch: int = 32, shard: int = 1024, top_k: int = 32, seed: int = 1, threads: int = 2, data: Path = DATA,
) -> None:
    """The target's top-K on human CommonGen answers: cheap extra distillation data (one forward
    per batch instead of a generation), written to OUT/references/shard-*.pt."""
    path, tokenizer, model = _load_target(target, threads)
    eos = eos_ids(tokenizer, path)[0]
    src = (data / "commongen" / "train.src.txt").read_text().splitlines()
    tgt = (data / "commongen" / "train.tgt.txt").read_text().splitlines()
    pairs = [(s, t.strip()) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    random.Random(seed).shuffle(pairs)
    folder = out / "references"
    folder.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, min(sets, len(pairs)), shard), desc="reference shards", mininterval=10):
        path_s = folder / f"shard-{start // shard:05d}.pt"
        if path_s.exists():
            continue
        chunk = pairs[start:start + shard]
        prompts = [tokenizer.encode(commongen_prompt(parse_concepts(s.split()), tokenizer), add_special_tokens=False)
                   for s, _ in chunk]
        answers = [tokenizer.encode(t, add_special_tokens=False) + [eos] for _, t in chunk]
        rows = []
        for i in range(0, len(chunk), batch):
            rows += _teach_forced(model, prompts[i:i + batch], answers[i:i + batch], top_k, tokenizer.pad_token_id)
        _write_shard(path_s, rows)


def load_teacher(out: Path, kind: str = "teacher") -> list[dict]:
    """Rows of OUT/teacher (the target's own answers) or OUT/references (human answers)."""
    rows = []
    for shard in sorted((out / kind).glob("shard-*.pt")):
        rows += torch.load(shard)
    return rows


def frequent_tokens(rows: list[dict], size: int, always: list[int], texts: list[list[int]] = ()) -> list[int]:
    """The draft head's vocabulary: `always`, then the most frequent tokens of the teacher's
    answers, then of `texts` (human sentences, so everyday words the teacher sample missed
    still get a row), `size` in all."""
    answers = Counter(t for r in rows for t in r["answer"])
    humans = Counter(t for ids in texts for t in ids)
    ranked = [t for t, _ in answers.most_common()] + [t for t, _ in humans.most_common()]
    return sorted(list(dict.fromkeys(always + ranked))[:size])


def _batches(rows: list[dict], size: int, pad: int, rng: random.Random):
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["answer"]))
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(r["prompt"]) + len(r["answer"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        where = []  # (row, position predicting answer token j, j)
        for b, r in enumerate(chunk):
            seq = r["prompt"] + r["answer"]
            ids[b, width - len(seq):] = torch.tensor(seq)  # left-padded, as the engine pads
            mask[b, width - len(seq):] = 1
            first = width - len(r["answer"]) - 1
            where += [(b, first + j, j) for j in range(len(r["answer"]))]
        yield chunk, ids, mask, where


def distill_loss(head_logits: torch.Tensor, t_ids: torch.Tensor, t_logp: torch.Tensor, slot: torch.Tensor,
                 alpha: float) -> tuple[torch.Tensor, float]:
    """alpha * KL(teacher || draft) + (1 - alpha) * CE on the teacher's greedy token, over the
    tokens the draft's head can write; and the draft's top-1 agreement with the teacher.

    head_logits [N, H] (the draft head's scores), t_ids / t_logp [N, K] (the teacher's top-K),
    slot [V]: each token's row in the head, -1 for tokens outside it."""
    idx = slot[t_ids]  # [N, K]
    inside = idx >= 0
    t_p = torch.softmax(t_logp.masked_fill(~inside, float("-inf")), -1)  # top-K within the head, renormalised
    s_logp = torch.log_softmax(head_logits.float(), -1).gather(1, idx.clamp_min(0))
    kl = torch.where(inside, t_p * (t_p.clamp_min(1e-12).log() - s_logp), 0.0).sum(-1).mean()
    greedy_in = inside[:, 0]
    ce = -(s_logp[:, 0] * greedy_in).sum() / greedy_in.sum().clamp_min(1)
    agree = (head_logits.argmax(-1) == idx[:, 0]).float().mean().item()
    return alpha * kl + (1 - alpha) * ce, agree


def _head_logits(model, ids: torch.Tensor, mask: torch.Tensor, where: list) -> torch.Tensor:
    """The draft head's scores at the answer positions only (no full-vocabulary logits)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = torch.tensor([b for b, _, _ in where])
    pos = torch.tensor([p for _, p, _ in where])
    return model.lm_head(hidden[rows, pos])


def _teacher_top(chunk: list[dict], where: list) -> tuple[torch.Tensor, torch.Tensor]:
    t_ids = torch.stack([chunk[b]["top_ids"][j].long() for b, _, j in where])
    t_logp = torch.stack([chunk[b]["top_logp"][j].float() for b, _, j in where])
    return t_ids, t_logp


@app.command()
def train(
    out: Path = typer.Option(Path("runs/distill"), help="Run folder (teacher shards and checkpoints)."),
    target: str = typer.Option("", help="Target folder (default: the default target)."),
    layers: int = typer.Option(4, help="Draft layers, copied from the target's first ones."),
    head: int = typer.Option(8192, help="Tokens in the draft's output head (most frequent answer tokens)."),
    minutes: float = typer.Option(100.0, help="Time budget of this stage; run again to continue."),
    epochs: float = typer.Option(3.0, help="Planned epochs over the teacher data (sets the schedule)."),
    alpha: float = 0.7, lr: float = 3e-4, batch_size: int = 16, held_out: int = 200, seed: int = 0,
    threads: int = 2, data: Path = DATA,
    init: Path = typer.Option(None, help="Start from the weights of another run's ckpt.pt."),
    own_weight: int = typer.Option(2, help="Times the target's own answers count against human answers."),
) -> None:
    """Distil the draft; checkpoints to OUT/ckpt, the last one resumed on the next run."""
    from cdsl.draft_model import draft_from_target
    from cdsl.pretrained import default_target

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    rows = load_teacher(out)
    dev, rows = rows[:held_out], rows[held_out:]
    rows = rows * own_weight + load_teacher(out, "references")
    ckpt = out / "ckpt.pt"
    if ckpt.exists() or init is not None:
        state = torch.load(ckpt if ckpt.exists() else init)
        model = draft_from_target(target or str(default_target()), state["layers"], state["head_ids"])
        model.load_state_dict(state["model"])
        if not ckpt.exists():  # a new run from another run's weights: its own schedule and log
            state = {"model": state["model"], "step": 0, "log": [{"init": str(init), "init_steps": state["step"]}]}
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(target or str(default_target()))
        always = sorted(set(tok.all_special_ids))
        refs = (data / "commongen" / "train.tgt.txt").read_text().splitlines()
        texts = tok([" " + r.strip() for r in refs], add_special_tokens=False)["input_ids"]
        model = draft_from_target(target or str(default_target()), layers, frequent_tokens(rows, head, always, texts))
        state = {"step": 0, "log": []}
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)  # shared with the target, not shipped
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    head_ids = model.head_ids
    slot = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    slot[head_ids] = torch.arange(len(head_ids))
    total = int(epochs * len(rows) / batch_size)
    step, start, saved = state["step"], time.time(), time.time()
    bar = tqdm(total=total, initial=step, desc="distill", mininterval=30)
    pad = model.config.pad_token_id or model.config.eos_token_id or 0  # masked out; any valid id works

    def save() -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": state["log"],
                    "layers": model.config.num_hidden_layers, "head_ids": head_ids.tolist()}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").rename(ckpt)

    while step < total and time.time() - start < minutes * 60:
        rng.seed(seed + step)
        for chunk, ids, mask, where in _batches(rows, batch_size, pad, rng):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            loss, agree = distill_loss(_head_logits(model, ids, mask, where), *_teacher_top(chunk, where), slot, alpha)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree:.3f}", refresh=False)
            bar.update(1)
            if time.time() - saved > 300:
                state["log"].append({"step": step, "loss": loss.item(), "dev_agree": evaluate(model, dev, pad, slot)})
                print(json.dumps(state["log"][-1]), flush=True)
                save()
                saved = time.time()
            if step >= total or time.time() - start > minutes * 60:
                break
    bar.close()
    state["log"].append({"step": step, "dev_agree": evaluate(model, dev, pad, slot)})
    print(json.dumps(state["log"][-1]), flush=True)
    save()


@app.command()
def export(
    out: Path = typer.Option(Path("runs/distill"), help="Run folder holding ckpt.pt."),
    to: Path = typer.Option(Path("cdsl/bundled/draft"), help="Folder to write the shippable draft to."),
    target: str = typer.Option("", help="Target folder (default: the default target)."),
    dtype: str = typer.Option("float16", help="Storage dtype of the shipped weights."),
) -> None:
    """Write the draft without the embedding it shares with the target (`cdsl.pretrained.assemble_draft`
    puts it back), in `dtype`, with the command lines that made it."""
    from safetensors.torch import save_file

    from cdsl.draft_model import draft_from_target
    from cdsl.pretrained import default_target

    state = torch.load(out / "ckpt.pt")
    model = draft_from_target(target or str(default_target()), state["layers"], state["head_ids"])
    model.load_state_dict(state["model"])
    to.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()
               if k != "model.embed_tokens.weight"}
    save_file(weights, to / "model.safetensors", metadata={"format": "pt"})
    model.config.dtype = dtype
    model.config.save_pretrained(to)
    model.generation_config.save_pretrained(to)
    (to / "distill_log.json").write_text(json.dumps({"steps": state["step"], "log": state["log"]}, indent=1))
    typer.echo(f"draft ({state['step']} steps, {sum(v.numel() for v in weights.values()) / 1e6:.1f}M shipped "
               f"parameters) -> {to}")


@torch.inference_mode()
def evaluate(model, rows: list[dict], pad: int, slot: torch.Tensor) -> float:
    """Teacher-forced top-1 agreement with the target on held-out teacher answers."""
    was = model.training
    model.eval()
    hits = n = 0
    for chunk, ids, mask, where in _batches(rows, 32, pad, random.Random(0)):
        t_ids, t_logp = _teacher_top(chunk, where)
        _, agree = distill_loss(_head_logits(model, ids, mask, where), t_ids, t_logp, slot, 1.0)
        hits, n = hits + agree * len(where), n + len(where)
    model.train(was)
    return hits / max(n, 1)


if __name__ == "__main__":
    app()
