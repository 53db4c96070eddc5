"""Fine-tune a trained target against the flaws of its own greedy output (sequence-level
unlikelihood, Welleck et al., 2020).

    python -m jobs.seq_unlikelihood --init cdsl/bundled/target --out runs/target-ul --minutes 40

Maximum likelihood on references never shows a small LM its own greedy mistakes: loops ("a field
of grassy fields and a field"), repeated phrases, and BPE splices that are not words ("danceing").
Every other step here decodes a batch of training prompts greedily, marks the tokens where the
continuation first goes wrong by the rules of `jobs.eval_tiny.fluency_flaws`, and lowers their
probability with -log(1 - p); the steps between are ordinary cross-entropy on CommonGen train, so
the model keeps the language it has. Held-out train concept sets (never CommonGen dev), with the
same share of swapped concepts as the prompts, are decoded every `--eval-every` steps; `best/` is
the checkpoint with the most flawless greedy outputs whose mean concept coverage has not fallen
more than `--max-coverage-drop` below the start.
"""

from __future__ import annotations

import csv
import math
import random
import re
import shutil
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from cdsl.tasks import commongen_prompt
from jobs.eval_tiny import FLAWS, PUNCTUATION, STOPWORDS, batched_greedy, judge, training_words
from jobs.recipe import command_line
from jobs.train_tiny import (
    DATA,
    add_residual_dropout,
    batches,
    content_words,
    draw_prompts,
    encode,
    load_pairs,
    split_heldout,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
app = typer.Typer(add_completion=False)


def word_spans(pieces: list[str]) -> list[tuple[str, list[int]]]:
    """Lower-cased words of a continuation and the token positions that spell each. A token that
    starts with a letter continues the word before it; anything else starts a new one."""
    words: list[tuple[str, list[int]]] = []
    glued = False
    for i, piece in enumerate(pieces):
        m = re.match(r"[A-Za-z]+", piece)
        if m and glued and words:
            words[-1] = (words[-1][0] + m.group().lower(), words[-1][1] + [i])
        else:
            m = re.search(r"[A-Za-z]+", piece)
            if m:
                words.append((m.group().lower(), [i]))
        glued = bool(re.search(r"[A-Za-z]$", piece))
    return words


def flaw_positions(pieces: list[str], vocab: set[str], prefixes: set[str]) -> list[int]:
    """Token positions where a continuation first breaks a fluency rule: the first token of a word
    that repeats an earlier two-word phrase (unless both words are stopwords) or that is a content
    word used twice already, the token that turns a word into one no training sentence has, and the
    token that makes a fourth punctuation mark in a row."""
    bad = set(punctuation_run_start(pieces))
    seen_pairs: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    words = word_spans(pieces)
    for j, (word, positions) in enumerate(words):
        if j:
            pair = (words[j - 1][0], word)
            if pair in seen_pairs and not set(pair) <= STOPWORDS:
                bad.add(positions[0])
            seen_pairs.add(pair)
        if word not in STOPWORDS:
            if counts.get(word, 0) >= 2:
                bad.add(positions[0])
            counts[word] = counts.get(word, 0) + 1
        if word not in vocab:
            # Only a token that leaves every training word's spelling is marked. A word cut short
            # ("po" + "ck", a prefix of "pocket") is not: a 600-step stage that also marked the
            # token ending such a word raised the unknown-word rate on 793 dev sets (26.2% -> 29.9%).
            spelled = ""
            for p in positions:
                spelled += re.sub(r"[^a-z]", "", pieces[p].lower())
                if spelled not in prefixes:
                    bad.add(p)
                    break
    return sorted(bad)


def punctuation_run_start(pieces: list[str]) -> list[int]:
    """The token (if any) whose characters first make four punctuation marks in a row (the
    "punctuation run" rule), counted across token boundaries."""
    run = 0
    for i, piece in enumerate(pieces):
        for ch in piece:
            run = run + 1 if re.fullmatch(PUNCTUATION, ch) else 0
            if run == 4:
                return [i]
    return []


def ul_prompts(pairs, n: int, swap: float, rng: random.Random) -> list[list[str]]:
    """Concept lists for unlikelihood steps: train sets, shuffled, and with probability `swap` one
    concept replaced by one from another set. Dev sets are combinations train never has, and a
    train set alone rarely makes the model slip (it has seen sentences for it)."""
    sets = []
    for concepts, _ in rng.sample(pairs, n):
        concepts = rng.sample(concepts, len(concepts))
        if rng.random() < swap:
            other = rng.choice(rng.choice(pairs)[0])
            if other not in concepts:
                concepts[rng.randrange(len(concepts))] = other
        sets.append(concepts)
    return sets


def unlikelihood_batch(tok, prompts: list[str], conts: list[list[int]], vocab: set[str],
                       prefixes: set[str]):
    """Right-padded prompt + continuation ids, attention mask, and a 0/1 mask of the positions whose
    token is to be made unlikely (aligned with the logits that predict them)."""
    heads = tok(prompts)["input_ids"]
    width = max(len(h) + len(c) for h, c in zip(heads, conts))
    ids = torch.full((len(prompts), width), tok.eos_token_id)
    mask = torch.zeros_like(ids)
    target = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (head, cont) in enumerate(zip(heads, conts)):
        ids[b, :len(head) + len(cont)] = torch.tensor(head + cont)
        mask[b, :len(head) + len(cont)] = 1
        for p in flaw_positions([tok.decode([t]) for t in cont], vocab, prefixes):
            target[b, len(head) + p] = True
    return ids, mask, target


def sequence_unlikelihood(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean -log(1 - p) of the marked tokens under the model (zero when nothing is marked)."""
    probs = torch.softmax(logits[:, :-1].float(), -1)
    p = probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    marked = target[:, 1:]
    if not marked.any():
        return logits.sum() * 0.0
    return -torch.log((1 - p[marked]).clamp(min=1e-5)).mean()


def checkpoint(model, init: Path, folder: Path, command: str) -> None:
    """A loadable target folder that also records how it was made (the model card shows it). The
    tokenizer files are copied from `init` byte for byte, so the saved tokenizer is the one it was
    trained with."""
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (init / name).exists():
            shutil.copyfile(init / name, folder / name)
    (folder / "unlikelihood_command.txt").write_text(command + "\n")


@app.command()
def main(
    init: Path = typer.Option(Path("cdsl/bundled/target"), help="Trained target (with its tokenizer)."),
    out: Path = typer.Option(Path("runs/target-ul"), help="Folder for best/ and last/ checkpoints and log.csv."),
    minutes: float = typer.Option(40.0, help="Training time budget."),
    steps: int = typer.Option(2000, help="Most steps (half of them unlikelihood steps)."),
    lr: float = typer.Option(1e-4, help="Peak learning rate, reached after a 50-step warm-up."),
    schedule: str = typer.Option("cosine", help="cosine: decay to zero over --steps or --minutes, whichever "
                                 "ends first; constant: stay at --lr."),
    weight: float = typer.Option(1.0, help="Weight of the unlikelihood loss on its steps."),
    swap: float = typer.Option(0.5, help="Share of unlikelihood prompts (and held-out check sets) with one "
                               "concept swapped in from another set (new combinations, as on dev)."),
    batch_size: int = 64, ul_batch: int = typer.Option(48, help="Prompts decoded per unlikelihood step."),
    max_new_tokens: int = typer.Option(48, help="Greedy continuation length (DecodeConfig's default)."),
    dropout: float = typer.Option(0.1, help="Residual dropout on the cross-entropy steps, as in training."),
    distract: float = typer.Option(0.0, help="Share of cross-entropy rows whose prompt gets one concept of "
                                   "another set that the sentence does not use (see draw_prompts)."),
    eval_every: int = typer.Option(100, help="Steps between held-out checks (and checkpoints)."),
    eval_sets: int = typer.Option(150, help="Held-out train concept sets decoded per check."),
    max_coverage_drop: float = typer.Option(0.02, help="best/ only among checks whose coverage is at most "
                                            "this far below the start."),
    heldout_sets: int = typer.Option(500, help="As in train_tiny (same seed: the same sets held out)."),
    seed: int = 0, threads: int = 2, data: Path = DATA,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if schedule not in ("cosine", "constant"):
        raise typer.BadParameter(f"must be cosine or constant, not {schedule!r}", param_hint="--schedule")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init)
    if dropout:
        add_residual_dropout(model, dropout)
    pairs, heldout = split_heldout(load_pairs(data), heldout_sets, rng)
    words = content_words(pairs)
    vocab = training_words(data)
    prefixes = {w[:i] for w in vocab for i in range(1, len(w) + 1)}
    held_sets = sorted({tuple(c) for c, _ in heldout})
    # The check draws its sets the way the unlikelihood prompts are drawn (with --swap), so that it
    # measures the new combinations dev asks for, not only sets like the training ones.
    held = [(list(c), "") for c in held_sets]
    eval_sets_list = ul_prompts(held, min(eval_sets, len(held)), swap, random.Random(seed + 1))
    out.mkdir(parents=True, exist_ok=True)
    command = command_line("jobs.seq_unlikelihood", init / "unlikelihood_command.txt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    log_file = open(out / "log.csv", "w", newline="")
    log = csv.writer(log_file)
    log.writerow(["step", "seconds", "ce", "ul", "marked", "fluent", "coverage", *FLAWS])
    start_check = judge(model, tok, eval_sets_list, vocab, max_new_tokens)
    print(f"start: fluent {start_check['fluent']:.1%} coverage {start_check['coverage']:.1%}", flush=True)
    log.writerow([0, 0, "", "", "", *(f"{start_check[k]:.4f}" for k in ("fluent", "coverage", *FLAWS))])
    best = start_check["fluent"]

    def lr_at(step: int, elapsed: float) -> float:
        warm = lr * min(1.0, (step + 1) / 50)
        if schedule == "constant":
            return warm
        # Cosine over whichever budget runs out first, so the last checkpoint is an annealed one
        # rather than one noisy point of a constant-rate walk.
        progress = min(1.0, max(step / steps, elapsed / (minutes * 60)))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))

    start, step = time.time(), 0
    ce = ul = marked = 0.0
    bar = tqdm(total=steps, desc="unlikelihood", mininterval=30)
    while step < steps and time.time() - start < minutes * 60:
        rows = encode(tok, draw_prompts(pairs, words, 0.5, rng, distract), pairs)
        for ids, labels, mask in batches(rows, batch_size, tok.eos_token_id, rng):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, time.time() - start)
            if step % 2:
                prompts = [commongen_prompt(c) for c in ul_prompts(pairs, ul_batch, swap, rng)]
                u_ids, u_mask, target = unlikelihood_batch(
                    tok, prompts, batched_greedy(model, tok, prompts, max_new_tokens), vocab, prefixes)
                loss = weight * sequence_unlikelihood(model(input_ids=u_ids, attention_mask=u_mask).logits,
                                                      u_ids, target)
                ul, marked = loss.item() / max(weight, 1e-9), target.sum().item() / ul_batch
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                ce = loss.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(ce=f"{ce:.3f}", ul=f"{ul:.3f}", marked=f"{marked:.2f}", refresh=False)
            bar.update(1)
            done = step >= steps or time.time() - start > minutes * 60
            if step % eval_every == 0 or done:
                check = judge(model, tok, eval_sets_list, vocab, max_new_tokens)
                log.writerow([step, f"{time.time() - start:.0f}", f"{ce:.4f}", f"{ul:.4f}", f"{marked:.2f}",
                              *(f"{check[k]:.4f}" for k in ("fluent", "coverage", *FLAWS))])
                log_file.flush()
                tqdm.write(f"step {step}: fluent {check['fluent']:.1%} coverage {check['coverage']:.1%} "
                           f"(ce {ce:.3f}, marked/row {marked:.2f})")
                checkpoint(model, init, out / "last", command)
                if check["fluent"] > best and check["coverage"] >= start_check["coverage"] - max_coverage_drop:
                    best = check["fluent"]
                    checkpoint(model, init, out / "best", command)
            if done:
                break
    bar.close()
    log_file.close()
    print(f"{step} steps in {(time.time() - start) / 60:.1f} min; best held-out fluent {best:.1%} "
          f"(start {start_check['fluent']:.1%}) -> {out}", flush=True)


if __name__ == "__main__":
    app()
