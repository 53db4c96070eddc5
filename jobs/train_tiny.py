"""Train the bundled tiny draft/target pair on CommonGen train, on CPU.

    python -m jobs.train_tiny --out cdsl/bundled
    ray job submit --working-dir . -- python -m jobs.train_tiny --out runs/tiny

Trains one byte-level BPE tokenizer and two Llama-architecture causal LMs (Llama so that
DeepSpeed AutoTP can split the target) on the same batches. The loss covers only the sentence,
not the prompt: the concept list is the input, not something to imitate. Checkpoints are written
in standard Hugging Face format every `--save-every` steps, so an interrupted run still leaves
usable models, and the loss history goes to `loss.csv`.
"""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from cdsl.tasks import commongen_prompt

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commongen"
EOS = "<|endoftext|>"
app = typer.Typer(add_completion=False)


def load_pairs(data: Path) -> list[tuple[list[str], str]]:
    src = (data / "train.src.txt").read_text().splitlines()
    tgt = (data / "train.tgt.txt").read_text().splitlines()
    return [(s.split(), t.strip()) for s, t in zip(src, tgt) if s.strip() and t.strip()]


def train_tokenizer(pairs: list[tuple[list[str], str]], vocab_size: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = [commongen_prompt(c) + " " + t for c, t in pairs]
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                  pad_token=EOS, unk_token=EOS, model_max_length=256)
    tok.save_pretrained(out)
    return tok


def encode(tok, pairs: list[tuple[list[str], str]], rng: random.Random) -> list[tuple[list[int], int]]:
    """Token ids and the prompt length (loss starts after it). Concept order is shuffled so the
    model does not learn to expect CommonGen's sorted order."""
    rows = []
    for concepts, sentence in pairs:
        concepts = concepts[:]
        rng.shuffle(concepts)
        prompt = tok(commongen_prompt(concepts))["input_ids"]
        body = tok(" " + sentence)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + body, len(prompt)))
    return rows


def batches(rows, batch_size: int, pad: int, rng: random.Random):
    order = list(range(len(rows)))
    rng.shuffle(order)
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for b, (row, n_prompt) in enumerate(chunk):
            ids[b, :len(row)] = torch.tensor(row)
            labels[b, n_prompt:len(row)] = torch.tensor(row[n_prompt:])
            mask[b, :len(row)] = 1
        yield ids, labels, mask


def make_model(vocab: int, hidden: int, layers: int, heads: int, eos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=eos,
                      eos_token_id=eos, pad_token_id=eos)
    return LlamaForCausalLM(cfg)


@app.command()
def main(
    out: Path = typer.Option(Path("cdsl/bundled"), help="Folder for tokenizer, target/ and draft/."),
    data: Path = typer.Option(DATA, help="Folder with CommonGen train.src.txt / train.tgt.txt."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary size."),
    target_hidden: int = typer.Option(384), target_layers: int = typer.Option(6), target_heads: int = 6,
    draft_hidden: int = typer.Option(96), draft_layers: int = typer.Option(2), draft_heads: int = 2,
    epochs: float = typer.Option(3.0, help="Passes over the training set."),
    max_minutes: float = typer.Option(110.0, help="Stop (and save) after this much training time."),
    batch_size: int = 64, seed: int = 0, threads: int = 2,
    target_lr: float = typer.Option(5e-4, help="Peak learning rate of the target (cosine decay)."),
    draft_lr: float = typer.Option(2e-3, help="Peak learning rate of the draft (smaller models take more)."),
    save_every: int = 500, limit: int = typer.Option(0, help="Use only the first N pairs (0: all)."),
) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    pairs = load_pairs(data)
    if limit:
        pairs = pairs[:limit]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_command.txt").write_text("python -m jobs.train_tiny " + " ".join(sys.argv[1:]) + "\n")
    tok = train_tokenizer(pairs, vocab_size, out / "target")
    tok.save_pretrained(out / "draft")
    rows = encode(tok, pairs, rng)
    eos = tok.eos_token_id
    models = {
        "target": make_model(len(tok), target_hidden, target_layers, target_heads, eos),
        "draft": make_model(len(tok), draft_hidden, draft_layers, draft_heads, eos),
    }
    for name, m in models.items():
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters", flush=True)
    steps_per_epoch = len(rows) // batch_size
    total = int(steps_per_epoch * epochs)
    peak = {"target": target_lr, "draft": draft_lr}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=peak[n], weight_decay=0.05) for n, m in models.items()}
    warmup = min(200, total // 10)

    def lr_at(step: int, lr: float) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    log = open(out / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "epoch", "target_loss", "draft_loss", "seconds"])
    start, step = time.time(), 0
    bar = tqdm(total=total, desc="train", mininterval=30)
    done = False
    while not done:
        for ids, labels, mask in batches(rows, batch_size, eos, rng):
            losses = {}
            for name, m in models.items():
                for g in opts[name].param_groups:
                    g["lr"] = lr_at(step, peak[name])
                loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                losses[name] = loss.item()
            step += 1
            elapsed = time.time() - start
            writer.writerow([step, f"{step / steps_per_epoch:.3f}", f"{losses['target']:.4f}",
                             f"{losses['draft']:.4f}", f"{elapsed:.0f}"])
            bar.set_postfix(target=f"{losses['target']:.3f}", draft=f"{losses['draft']:.3f}", refresh=False)
            bar.update(1)
            done = step >= total or elapsed > max_minutes * 60
            if step % save_every == 0 or done:
                log.flush()
                for name, m in models.items():
                    m.save_pretrained(out / name)
            if done:
                break
    bar.close()
    log.close()
    print(f"trained {step} steps ({step / steps_per_epoch:.2f} epochs) in {(time.time() - start) / 60:.1f} min",
          flush=True)


if __name__ == "__main__":
    app()
