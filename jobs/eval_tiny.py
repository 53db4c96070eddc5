"""Measure a draft/target pair on CommonGen dev and write the figures for its model card.

    python -m jobs.eval_tiny --models cdsl/bundled --limit 200

Writes MODELS/eval.json and MODELS/loss.png (from the training job's loss.csv). Figures:
target perplexity of the first human reference, draft/target next-token agreement (teacher
forced on references, and SD acceptance on the target's own greedy text), all-concepts coverage
of greedy and CDLH outputs, the fluency rule check (`fluency_flaws`) on them and on the references,
the rule check of batched greedy output on every dev set, and each model's time per single-token
forward.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from cdsl.config import DecodeConfig
from cdsl.evaluate import run_methods
from cdsl.generate import load_pair
from cdsl.models import LM
from cdsl.rewards import coverage
from cdsl.tasks import commongen_prompt, read_commongen_jsonl

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commongen" / "dev.jsonl"
app = typer.Typer(add_completion=False)


@torch.inference_mode()
def teacher_forced(target: LM, draft: LM, rows: list[dict]) -> dict:
    """Reference perplexity under the target, and how often the draft's argmax equals the target's."""
    nll, count, agree = 0.0, 0, 0
    for row in tqdm(rows, desc="teacher-forced", mininterval=5):
        prompt = target.encode(commongen_prompt(row["concepts"]))
        body = target.encode(" " + row["references"][0]) + [target.eos_id]
        ids = torch.tensor([prompt + body])
        t_logits = target.model(ids).logits[0, len(prompt) - 1:-1, : target.vocab_size].float()
        d_logits = draft.model(ids).logits[0, len(prompt) - 1:-1, : draft.vocab_size].float()
        gold = torch.tensor(body)
        nll += torch.nn.functional.cross_entropy(t_logits, gold, reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        count += len(body)
    return {"reference_perplexity": math.exp(nll / count), "agreement_teacher_forced": agree / count}


FLAWS = ("unknown word", "repeated phrase", "looping word", "punctuation run")
PUNCTUATION = r"[^\w\s]"
PUNCTUATION_RUN = re.compile(PUNCTUATION + "{4,}")
STOPWORDS = frozenset("a an the of in on at to and with is are was his her their its for by from up".split())


def training_words(data: Path = DEV.parent) -> set[str]:
    """Every lower-cased word of the training sentences: the words the models could have learned."""
    return set(re.findall(r"[a-z]+", (data / "train.tgt.txt").read_text().lower()))


def fluency_flaws(text: str, vocab: set[str]) -> list[str]:
    """What makes a sentence read as broken, by rules that a human reference almost never breaks:
    a word the training data never has (a BPE splice such as "carcycle"), a repeated two-word
    phrase with a content word ("a dog ... a dog"), a content word three times (a loop), or four
    punctuation marks in a row ("dance-----"; CommonGen train has "..." but never four)."""
    words = re.findall(r"[a-z]+", text.lower())
    flaws = []
    if not words:
        flaws.append("empty")
    if any(w not in vocab for w in words):
        flaws.append("unknown word")
    pairs = [p for p in zip(words, words[1:]) if not set(p) <= STOPWORDS]
    if len(pairs) != len(set(pairs)):
        flaws.append("repeated phrase")
    content = [w for w in words if w not in STOPWORDS]
    if any(content.count(w) >= 3 for w in set(content)):
        flaws.append("looping word")
    if PUNCTUATION_RUN.search(text):
        flaws.append("punctuation run")
    return flaws


def fluency(texts: list[str], vocab: set[str]) -> dict[str, float]:
    """Share of texts with no flaw, and the share with each flaw."""
    flaws = [fluency_flaws(t, vocab) for t in texts]
    out = {"fluent": sum(not f for f in flaws) / len(texts)}
    for name in FLAWS:
        out[name] = sum(name in f for f in flaws) / len(texts)
    return out


@torch.inference_mode()
def batched_greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, cut at end of text) of a batch of prompts, with Hugging Face
    `generate` on a left-padded batch: many times faster on CPU than one prompt at a time, so it can
    check every dev set. The model's mode and the tokenizer's padding side are put back after."""
    training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model.train(training)
    tok.padding_side = side
    rows = []
    for seq in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(seq[:seq.index(tok.eos_token_id)] if tok.eos_token_id in seq else seq)
    return rows


def judge(model, tok, sets: list[list[str]], vocab: set[str], max_new_tokens: int = 48) -> dict[str, float]:
    """Rule-check fluency and mean coverage of batched greedy outputs for concept sets."""
    texts: list[str] = []
    for i in range(0, len(sets), 32):
        chunk = sets[i:i + 32]
        conts = batched_greedy(model, tok, [commongen_prompt(c) for c in chunk], max_new_tokens)
        texts += [tok.decode(c).strip() for c in conts]
    result = fluency(texts, vocab)
    result["coverage"] = sum(coverage(t, c) for t, c in zip(texts, sets)) / len(sets)
    return result


@torch.inference_mode()
def forward_ms(lm: LM, repeats: int = 50) -> float:
    """Milliseconds per one-token forward after a 16-token prefix (the decode-step cost)."""
    from transformers import DynamicCache

    ids = torch.randint(0, lm.vocab_size, (1, 16))
    cache = DynamicCache()
    lm.model(ids, past_key_values=cache, use_cache=True)
    one = ids[:, :1]
    start = time.perf_counter()
    for _ in range(repeats):
        lm.model(one, past_key_values=cache, use_cache=True)
        cache.crop(-1)
    return (time.perf_counter() - start) / repeats * 1000


def plot_loss(models: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(models / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    epoch = [float(r["epoch"]) for r in rows]

    def smooth(key: str, w: int = 50) -> list[float]:
        vals = [float(r[key]) for r in rows]
        return [sum(vals[max(0, i - w):i + 1]) / len(vals[max(0, i - w):i + 1]) for i in range(len(vals))]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("target", "draft"):
        line, = ax.plot(epoch, smooth(f"{name}_loss"), label=f"{name} train (50-step mean)")
        held = [(float(r["epoch"]), float(r[f"{name}_heldout"])) for r in rows if r.get(f"{name}_heldout")]
        if held:
            ax.plot(*zip(*held), "o", ms=3, color=line.get_color(), label=f"{name} held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Tiny CommonGen pair: training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def block(command_file: Path) -> str:
    """A recorded command file (one line per stage) as a fenced code block."""
    return "```\n" + command_file.read_text().strip() + "\n```"


def model_card(f: dict, models: Path) -> str:
    """The model card, with every figure taken from this run's measurements."""
    train = (models / "train_command.txt").read_text().strip() if (models / "train_command.txt").exists() else ""
    training = f"`{train}`"
    tuned = models / "target" / "unlikelihood_command.txt"
    if tuned.exists():  # a target fine-tuned against its own greedy flaws after the joint run
        training += ("\n\nThen the target was fine-tuned against the flaws of its own greedy output "
                     "(sequence-level unlikelihood on the tokens where it repeats a phrase, loops on a word or "
                     f"splices a non-word, alternating with data cross-entropy), in stages:\n{block(tuned)}")
    distill = models / "draft" / "distill_command.txt"
    if distill.exists():  # a draft distilled from the trained target after the joint run
        training += ("\n\nThen the draft was distilled from the target (KL to its next-token distribution plus "
                     f"data cross-entropy):\n{block(distill)}")
    g, s, c, fl = f["greedy"], f["sd"], f["cdlh"], f["fluency"]
    fluent = " / ".join(f"{fl[m]['fluent']:.1%}" for m in ("greedy", "cdlh", "references"))
    flaws = " / ".join(f"{fl['greedy'][name]:.1%}" for name in FLAWS)
    fa = f["fluency_all"]
    every = f"{fa['greedy']['fluent']:.1%} / {fa['references']['fluent']:.1%}; {fa['greedy']['coverage']:.1%}"
    kl = f"k = {f['k']}, L = {f['lookahead']}"
    examples = "\n".join(f"| {', '.join(e['concepts'])} | {e['greedy']} | {e['cdlh']} |" for e in f["greedy_examples"])
    return f"""---
license: mit
datasets: [allenai/common_gen]
language: [en]
library_name: transformers
pipeline_tag: text-generation
---
# Tiny CommonGen draft/target pair

The default models of this project: a target and a draft causal LM (Llama architecture, so that
DeepSpeed AutoTP can split the target) and their shared byte-level BPE tokenizer, trained from
scratch on CPU by `jobs/train_tiny.py` so that CDSL's effect can be seen offline on a laptop.
They write one short everyday sentence for a prompt `Concepts: dog, frisbee, catch, throw\nSentence:`.
They know nothing else; do not use them for anything but demos and tests.

## Data
CommonGen v1.0 training set (39,068 concept-set/sentence pairs; INK-USC/CommonGen, MIT licence),
less the pairs of a few hundred concept sets held out to choose the checkpoint (the saved models
are those with the lowest loss on them). The loss covers the sentence and EOS, not the prompt.
CommonGen train is small enough for the target to memorise (28.7k distinct sentences), so each
epoch re-draws the prompts: concept order shuffled, and for half the rows a new 3-5 concept set
drawn from the sentence's own words that are CommonGen concepts; the target trains with residual
dropout 0.1.

## Sizes
| model | parameters | layers x hidden | one-token forward on this CPU |
|---|---|---|---|
| target | {f["target_parameters_M"]:.1f}M | {f["target_shape"]} | {f["target_forward_ms"]:.2f} ms |
| draft | {f["draft_parameters_M"]:.2f}M | {f["draft_shape"]} | {f["draft_forward_ms"]:.2f} ms |

The draft has {f["target_parameters_M"] / f["draft_parameters_M"]:.0f}x fewer parameters; per forward pass on
this 2-core CPU it is {f["target_forward_ms"] / f["draft_forward_ms"]:.1f}x cheaper (fixed per-call overhead
dominates tiny models on CPU, so the wall-time ratio is smaller than the FLOP ratio).

## Training
{training}

![loss](loss.png)

## Figures on CommonGen dev ({f["dev_rows"]} concept sets; `python -m jobs.eval_tiny`, {f["threads"]} torch thread)
| figure | value |
|---|---|
| target perplexity of the first human reference | {f["reference_perplexity"]:.1f} |
| fluent by the rule check, greedy / CDLH / first human reference | {fluent} |
| greedy flaws: {" / ".join(FLAWS)} | {flaws} |
| all {f["all_dev_rows"]} dev sets, batched greedy: rule check greedy / human; greedy mean coverage | {every} |
| draft/target next-token agreement, teacher-forced on references | {f["agreement_teacher_forced"]:.1%} |
| SD acceptance (draft tokens the target accepts, d = 4) | {f["sd_acceptance"]:.1%} |
| greedy: all concepts covered / mean coverage | {g["coverage_all"]:.1%} / {g["coverage_mean"]:.1%} |
| CDLH ({kl}): all concepts covered / mean coverage | {c["coverage_all"]:.1%} / {c["coverage_mean"]:.1%} |
| wall time greedy / SD / CDLH | {g["wall_s"]:.1f} s / {s["wall_s"]:.1f} s / {c["wall_s"]:.1f} s |

The rule check (`jobs.eval_tiny.fluency_flaws`) calls a sentence broken if it has a word that no
training sentence has (a BPE splice such as "carcycle"), repeats a two-word phrase that has a
content word ("a dog ... a dog"), uses one content word three times, or has four punctuation
marks in a row ("dance-----"). It is a proxy: it cannot see bad grammar without repetition, so
read the examples too. Human references pass it nearly always, which is what makes it a fair bar.

Examples, the first {len(f["greedy_examples"])} dev concept sets (greedy, then CDLH):

| concepts | greedy | CDLH |
|---|---|---|
{examples}
"""


@app.command()
def main(
    models: Path = typer.Option(Path("cdsl/bundled"), help="Folder with target/ and draft/."),
    dev: Path = typer.Option(DEV, help="CommonGen dev.jsonl."),
    limit: int = typer.Option(200, help="Concept sets to evaluate (0: all)."),
    k: int = 5, lookahead: int = 4, threads: int = 2,
) -> None:
    torch.set_num_threads(threads)
    target, draft = load_pair(str(models / "target"), str(models / "draft"))
    every = list(read_commongen_jsonl(dev))
    rows = every[: limit or None]
    figures: dict = {"dev_rows": len(rows), "k": k, "lookahead": lookahead, "threads": threads}
    for name, lm in (("target", target), ("draft", draft)):
        figures[f"{name}_parameters_M"] = sum(p.numel() for p in lm.model.parameters()) / 1e6
        figures[f"{name}_forward_ms"] = forward_ms(lm)
        cfg = lm.model.config
        figures[f"{name}_shape"] = f"{cfg.num_hidden_layers} x {cfg.hidden_size}, vocab {cfg.vocab_size}"
    figures.update(teacher_forced(target, draft, rows))
    config = DecodeConfig(k=k, lookahead=lookahead, draft_len=4)
    results = run_methods([r["concepts"] for r in rows], ["greedy", "sd", "cdlh"], target, draft, config)
    for method, summary in results.items():
        figures[method] = summary.to_dict()
    figures["sd_acceptance"] = results["sd"].totals.acceptance
    vocab = training_words()
    figures["fluency"] = {"greedy": fluency(results["greedy"].texts, vocab),
                          "cdlh": fluency(results["cdlh"].texts, vocab),
                          "references": fluency([r["references"][0] for r in rows], vocab)}
    # CDLH is too slow for every dev set on CPU, but batched greedy is not: the rule check on all of
    # them is the steadier fluency figure (200 sets give about +-3.5 points of sampling error).
    figures["all_dev_rows"] = len(every)
    figures["fluency_all"] = {
        "greedy": judge(target.model, target.tokenizer, [r["concepts"] for r in every], vocab),
        "references": fluency([r["references"][0] for r in every], vocab)}
    figures["greedy_examples"] = [{"concepts": r["concepts"], "greedy": g.strip(), "cdlh": c.strip()}
                                  for r, g, c in zip(rows[:20], results["greedy"].texts, results["cdlh"].texts)]
    (models / "eval.json").write_text(json.dumps(figures, indent=2))
    if (models / "loss.csv").exists():
        plot_loss(models, models / "loss.png")
    (models / "README.md").write_text(model_card(figures, models))
    print(json.dumps({k: v for k, v in figures.items() if k != "greedy_examples"}, indent=2))


if __name__ == "__main__":
    app()
