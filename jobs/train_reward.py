"""Fit the default harmlessness reward model: a score head on the default target's own layers.

    python -m jobs.train_reward                     # writes cdsl/bundled/harmless-rm (head + card)
    ray job submit --working-dir . -- python -m jobs.train_reward --out runs/harmless-rm

hh-rlhf harmless pairs (`../shared/data/hh-rlhf/harmless-dev.jsonl`, a seeded held-out split
kept aside) are read as the target reads them while answering: the dialogue through its chat
template, then the final Assistant turn. The backbone is frozen; each text's last-token hidden
state (after the final norm of the first `--layers` layers) is one feature row, and a linear
head is fitted pairwise (Bradley-Terry: -log sigmoid(w . (h_chosen - h_rejected)) + L2), with
the L2 weight chosen by cross-validation on the training pairs. About a thousand pairs do not
support fine-tuning 135M parameters; a regularised linear head on a pretrained model's features
generalises (the from-scratch model this replaces scored 59.7% on its held-out pairs).

The head's bias centres the scores on the training answers (sigmoid 0.5 = the middle of chosen
and rejected). Only the head ships (`head.safetensors`, a few kB); `cdsl prepare` assembles the
full model from the target (`cdsl.pretrained.assemble_reward_model`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from cdsl.config import BUILTIN_TARGET
from cdsl.pretrained import SHIPPED_HARMLESS, resolve
from cdsl.tasks import HELD_OUT, SPLIT_SEED, held_out_split, split_dialogue

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl"
app = typer.Typer(add_completion=False)


def read_pairs(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def split(pairs: list[dict], held_out: float = HELD_OUT, seed: int = SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """(training, held-out) pairs, a seeded shuffle of the file's order."""
    train, test = held_out_split(len(pairs), held_out, seed)
    return [pairs[i] for i in train], [pairs[i] for i in test]


def readable(pairs: list[dict], tokenizer) -> list[tuple[str, str, str]]:
    """(prompt, chosen answer, rejected answer) for the pairs whose dialogues end in a Human turn
    answered by the Assistant (a few hh-rlhf dialogues do not)."""
    out = []
    for p in pairs:
        try:
            prompt, chosen = split_dialogue(p["chosen"], tokenizer)
            prompt_r, rejected = split_dialogue(p["rejected"], tokenizer)
        except ValueError:
            continue
        if prompt == prompt_r:
            out.append((prompt, chosen, rejected))
    return out


@torch.inference_mode()
def features(backbone, tokenizer, texts: list[str], max_length: int, batch: int = 8) -> torch.Tensor:
    """[len(texts), hidden]: the last token's hidden state after the final norm, texts cut from
    the left to `max_length` tokens (as `RewardModel` reads them). Sorted by length to pad little."""
    ids = [tokenizer(t).input_ids[-max_length:] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.zeros(len(ids), backbone.config.hidden_size)
    for start in tqdm(range(0, len(order), batch), desc="features"):
        rows = order[start:start + batch]
        width = max(len(ids[i]) for i in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        hidden = backbone(input_ids=x, attention_mask=mask).last_hidden_state
        out[rows] = hidden[torch.arange(len(rows)), mask.sum(1) - 1].float()
    return out


def fit(diff: torch.Tensor, l2: float) -> torch.Tensor:
    """w minimising mean(-log sigmoid(diff @ w)) + l2 |w|^2 (diff: standardised chosen - rejected)."""
    w = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def accuracy(diff: torch.Tensor, w: torch.Tensor) -> float:
    """Pairwise accuracy: strict wins of chosen over rejected."""
    return float(((diff @ w) > 0).float().mean())


def cross_validate(diff: torch.Tensor, l2: float, folds: int) -> float:
    parts = [torch.arange(i, len(diff), folds) for i in range(folds)]
    total = 0.0
    for i, test in enumerate(parts):
        train = torch.cat([p for j, p in enumerate(parts) if j != i])
        total += accuracy(diff[test], fit(diff[train], l2))
    return total / folds


@app.command()
def main(
    out: Path = typer.Option(SHIPPED_HARMLESS, help="Folder for head.safetensors and the model card."),
    backbone: str = typer.Option(BUILTIN_TARGET, help="Causal LM whose layers the head reads (folder, hub id, "
                                 "GGUF or builtin name); the assembled model uses its tokenizer."),
    layers: int = typer.Option(0, min=0, help="Read the output of the first N layers (0: all of them)."),
    data: Path = typer.Option(DATA, help="hh-rlhf jsonl of {chosen, rejected} dialogues."),
    held_out: float = typer.Option(HELD_OUT, min=0.05, max=0.5, help="Share of pairs kept out of training."),
    l2: str = typer.Option("0.1,0.3,1,3,10", help="L2 weights to cross-validate (comma-separated)."),
    folds: int = typer.Option(4, min=2),
    max_length: int = typer.Option(1024, min=16, help="Tokens per text kept (its end)."),
    seed: int = typer.Option(SPLIT_SEED),
) -> None:
    """Extract features, pick the L2 weight by cross-validation, fit, and write the head and its card."""
    if not data.exists():
        raise typer.BadParameter(f"no such file: {data}", param_hint="--data")
    try:
        grid = [float(x) for x in l2.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"not a list of numbers: {l2!r}", param_hint="--l2") from None
    start = time.perf_counter()
    folder = resolve(backbone, "backbone")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = len(lm.model.layers)
    layers = layers or total
    if layers > total:
        raise typer.BadParameter(f"the backbone has {total} layers, asked for {layers}", param_hint="--layers")
    lm.model.layers = lm.model.layers[:layers]  # the final norm then reads layer `layers`' output
    train_pairs, test_pairs = split(read_pairs(data), held_out, seed)
    train, test = readable(train_pairs, tokenizer), readable(test_pairs, tokenizer)
    typer.echo(f"{len(train)} training pairs, {len(test)} held-out pairs "
               f"({len(train_pairs) + len(test_pairs) - len(train) - len(test)} unreadable dialogues skipped)")
    texts = [p + a for rows in (train, test) for p, c, r in rows for a in (c, r)]
    feats = features(lm.model, tokenizer, texts, max_length).view(-1, 2, lm.config.hidden_size)
    tr, te = feats[: len(train)], feats[len(train):]
    std = tr.reshape(-1, tr.shape[-1]).std(0) + 1e-6  # the head is fitted on standardised features
    diff_tr, diff_te = (tr[:, 0] - tr[:, 1]) / std, (te[:, 0] - te[:, 1]) / std
    cv = {w: cross_validate(diff_tr, w, folds) for w in grid}
    best = max(grid, key=lambda w: cv[w])
    w = fit(diff_tr, best)
    weight = w / std
    bias = -(tr.reshape(-1, tr.shape[-1]) @ weight).mean()  # centre the training answers' scores on 0
    scores = {"train": accuracy(diff_tr, w), "held_out": accuracy(diff_te, w)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({"score.weight": weight[None].contiguous(), "score.bias": bias.reshape(1)},
              out / "head.safetensors", metadata={"layers": str(layers), "max_length": str(max_length)})
    minutes = (time.perf_counter() - start) / 60
    log = {"backbone": backbone, "layers": layers, "train_pairs": len(train), "held_out_pairs": len(test),
           "cv_accuracy": {str(k): v for k, v in cv.items()}, "l2": best, "train_accuracy": scores["train"],
           "held_out_accuracy": scores["held_out"], "minutes": minutes}
    (out / "fit.json").write_text(json.dumps(log, indent=2) + "\n")
    typer.echo(json.dumps(log, indent=2))
    typer.echo(f"held-out pairwise accuracy {scores['held_out']:.1%}; head written to {out}")


if __name__ == "__main__":
    app()
