"""Train the bundled harmlessness reward model: a small Llama sequence classifier with one score
head, trained pairwise (chosen over rejected: loss = -log sigmoid(r_chosen - r_rejected)) on
../shared/data/hh-rlhf/harmless-dev.jsonl, with a seeded held-out split for its accuracy.

    python -m jobs.train_reward --out cdsl/bundled/harmless-rm
    ray job submit --working-dir . -- python -m jobs.train_reward --out runs/harmless-rm

It reuses the bundled tokenizer (truncating from the left, so the final assistant turn, where
chosen and rejected differ, is always kept) and writes the model in Hugging Face format with a
model card holding the held-out pairwise accuracy.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from cdsl.config import BUNDLED
from cdsl.rewards import pairwise_accuracy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl"
app = typer.Typer(add_completion=False)


def read_pairs(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def split(pairs: list[dict], held_out: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = int(len(pairs) * held_out)
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


def build(tokenizer, hidden: int, layers: int, max_len: int) -> LlamaForSequenceClassification:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         max_position_embeddings=max_len, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    return LlamaForSequenceClassification(config)


def scores(model, tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    return model(**enc).logits[:, 0]


@app.command()
def main(
    out: Path = typer.Option(BUNDLED / "harmless-rm", help="Folder for the model, tokenizer and model card."),
    data: Path = typer.Option(DATA, help="hh-rlhf jsonl of {chosen, rejected} dialogues."),
    held_out: float = typer.Option(0.2, min=0.05, max=0.5, help="Share of pairs kept out of training."),
    epochs: int = typer.Option(6, min=1),
    batch: int = typer.Option(16, min=1, help="Pairs per step."),
    lr: float = typer.Option(1e-3),
    hidden: int = typer.Option(128),
    layers: int = typer.Option(2),
    max_len: int = typer.Option(256, help="Tokens per dialogue kept (its end)."),
    seed: int = typer.Option(0),
    tokenizer_from: Path = typer.Option(BUNDLED / "harmless-rm", "--tokenizer",
                                        help="Folder whose tokenizer the reward model uses (the bundled model "
                                        "keeps the 4,096-token BPE of the project's retired toy pair)."),
) -> None:
    """Train, keep the epoch with the best held-out accuracy, save, and write the model card."""
    if not data.exists():
        raise typer.BadParameter(f"no such file: {data}", param_hint="--data")
    torch.manual_seed(seed)
    train, test = split(read_pairs(data), held_out, seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokenizer.truncation_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = build(tokenizer, hidden, layers, max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, best, history = time.perf_counter(), -1.0, []
    for epoch in range(epochs):
        model.train()
        random.Random(seed + epoch).shuffle(train)
        losses = []
        for i in tqdm(range(0, len(train), batch), desc=f"epoch {epoch + 1}/{epochs}"):
            chunk = train[i:i + batch]
            r = scores(model, tokenizer, [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk], max_len)
            loss = -torch.nn.functional.logsigmoid(r[: len(chunk)] - r[len(chunk):]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.inference_mode():
            acc = pairwise_accuracy(lambda texts: scores(model, tokenizer, texts, max_len).tolist(), test)
            train_acc = pairwise_accuracy(lambda texts: scores(model, tokenizer, texts, max_len).tolist(), train)
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "train_accuracy": train_acc,
                        "held_out_accuracy": acc})
        typer.echo(json.dumps(history[-1]))
        if acc > best:
            best = acc
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    minutes = (time.perf_counter() - start) / 60
    params = sum(p.numel() for p in model.parameters())
    write_card(out, params, len(train), len(test), history, best, minutes, hidden, layers, max_len)
    typer.echo(f"best held-out pairwise accuracy {best:.3f}; saved to {out}")


def write_card(out: Path, params: int, n_train: int, n_test: int, history: list[dict], best: float,
               minutes: float, hidden: int, layers: int, max_len: int) -> None:
    rows = "\n".join(f"| {h['epoch']} | {h['loss']:.3f} | {h['train_accuracy']:.3f} | {h['held_out_accuracy']:.3f} |"
                     for h in history)
    (out / "README.md").write_text(f"""# harmless-rm: the bundled tiny harmlessness reward model

A Llama-architecture sequence classifier ({params / 1e6:.2f}M parameters: hidden {hidden}, {layers} layers,
one score head) trained pairwise, chosen over rejected, on Anthropic hh-rlhf harmless-base
(`../shared/data/hh-rlhf/harmless-dev.jsonl`, MIT licence; contains offensive text by design):
{n_train} training pairs, {n_test} held-out pairs (seeded split). Tokenizer: the bundled CommonGen
byte-level BPE, truncating from the left to the last {max_len} tokens so that the final assistant
turn is kept. Score = sigmoid of the logit (`RewardSpec(reward_model=...)`, label None).

Training command: `python -m jobs.train_reward --out cdsl/bundled/harmless-rm` ({minutes:.1f} minutes on
a 2-core CPU); the epoch with the best held-out accuracy is kept.

**Held-out pairwise accuracy: {best:.1%}** (share of held-out pairs where chosen scores above
rejected; 50% is chance). Reproduce with
`cdsl eval-reward --pairs ../shared/data/hh-rlhf/harmless-dev.jsonl --model cdsl/bundled/harmless-rm`
(that figure is over all pairs, training ones included).

| epoch | loss | train accuracy | held-out accuracy |
|---|---|---|---|
{rows}

This is a toy for offline tests and demos: it is small and trained on ~1k pairs, so it
measures little more than surface cues. For real use give any Hugging Face reward model
(e.g. a harmlessness classifier) by hub id or folder.
""")


if __name__ == "__main__":
    app()
