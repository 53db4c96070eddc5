"""Distil a draft from a trained target: the lever for draft/target agreement (CDSL's acceptance).

    python -m jobs.distill_draft --target cdsl/bundled/target --out runs/draft-distilled --minutes 15

The draft learns the target's next-token distribution (KL(target || draft) on the sentence
tokens, mixed with the usual cross-entropy on the data) instead of the data alone, so it agrees
with the target where the target departs from the references. Starts from `--init` (an existing
draft) or from scratch.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from jobs.recipe import command_line
from jobs.train_tiny import DATA, batches, content_words, draw_prompts, encode, load_pairs, make_model

app = typer.Typer(add_completion=False)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float) -> torch.Tensor:
    """alpha * KL(teacher || student) + (1 - alpha) * cross-entropy, over positions with a label."""
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    gold = labels[:, 1:]
    mask = gold != -100
    log_s = torch.log_softmax(s[mask], -1)
    kl = torch.nn.functional.kl_div(log_s, torch.log_softmax(t[mask], -1), log_target=True, reduction="batchmean")
    ce = torch.nn.functional.nll_loss(log_s, gold[mask])
    return alpha * kl + (1 - alpha) * ce


@app.command()
def main(
    target: Path = typer.Option(Path("cdsl/bundled/target"), help="Trained target (with its tokenizer)."),
    out: Path = typer.Option(Path("runs/draft-distilled"), help="Folder for the distilled draft."),
    init: Path = typer.Option(None, help="Start from this draft instead of random weights."),
    hidden: int = 128, layers: int = 2, heads: int = 2,
    minutes: float = typer.Option(15.0, help="Training time budget."),
    steps: int = typer.Option(2000, help="Planned steps (sets the cosine schedule); stops early at --minutes."),
    alpha: float = typer.Option(0.8, help="Weight of the KL term (the rest is data cross-entropy)."),
    augment: float = typer.Option(0.5, help="Share of rows re-prompted from the sentence's words, as in training."),
    lr: float = 2e-3, batch_size: int = 64, seed: int = 0, threads: int = 2, data: Path = DATA,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(target)
    teacher = AutoModelForCausalLM.from_pretrained(target).eval()
    student = (AutoModelForCausalLM.from_pretrained(init) if init else
               make_model(len(tok), hidden, layers, heads, tok.eos_token_id))
    pairs = load_pairs(data)
    words = content_words(pairs)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05)
    start, step = time.time(), 0
    bar = tqdm(total=steps, desc="distill", mininterval=30)
    while step < steps and time.time() - start < minutes * 60:
        rows = encode(tok, draw_prompts(pairs, words, augment, rng), pairs)
        for ids, labels, mask in batches(rows, batch_size, tok.eos_token_id, rng):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            loss = distill_loss(student(input_ids=ids, attention_mask=mask).logits, t_logits, labels, alpha)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
            if step >= steps or time.time() - start > minutes * 60:
                break
    bar.close()
    student.save_pretrained(out)
    tok.save_pretrained(out)
    earlier = init / "distill_command.txt" if init else None
    (out / "distill_command.txt").write_text(command_line("jobs.distill_draft", earlier) + "\n")
    print(f"distilled {step} steps in {(time.time() - start) / 60:.1f} min -> {out}", flush=True)


if __name__ == "__main__":
    app()
