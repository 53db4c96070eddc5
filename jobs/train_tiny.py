"""Train the bundled tiny draft/target pair on CommonGen train, on CPU.

    python -m jobs.train_tiny --out cdsl/bundled
    ray job submit --working-dir . -- python -m jobs.train_tiny --out runs/tiny

Trains one byte-level BPE tokenizer and two Llama-architecture causal LMs (Llama so that
DeepSpeed AutoTP can split the target) on the same batches. The loss covers only the sentence,
not the prompt: the concept list is the input, not something to imitate.

CommonGen train is small (28.7k distinct sentences over 27k concept sets), and a 12M-parameter
target memorises it: the first bundled target reached a train loss of 1.8 nats but 3.9 on dev.
So each epoch re-draws the prompts (concept order shuffled, and for `--augment` of the rows a new
concept set drawn from the sentence's own content words), the target trains with residual
dropout, and the models kept are those with the lowest loss on concept sets held out from train.
Checkpoints are standard Hugging Face folders written whenever the held-out loss improves, so an
interrupted run still leaves usable models; the loss history goes to `loss.csv`.

Nine in ten CommonGen train sentences are stock-photo captions ("actor attends the premiere of
film ."); the rest, and nearly all dev references, are plain sentences written by crowd workers.
`--style-tags` prompts caption rows with `Caption:` instead of the task's `Sentence:` (see
`style_prompt`), so that the task prompt asks for the crowd style; measured, it did not make
greedy output more fluent (README, "The bundled models"), so it is off by default.
"""

from __future__ import annotations

import csv
import math
import random
import re
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from cdsl.rewards import lemmas
from cdsl.tasks import commongen_prompt
from jobs.recipe import command_line

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commongen"
EOS = "<|endoftext|>"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
app = typer.Typer(add_completion=False)


def load_pairs(data: Path) -> list[tuple[list[str], str]]:
    src = (data / "train.src.txt").read_text().splitlines()
    tgt = (data / "train.tgt.txt").read_text().splitlines()
    return [(s.split(), t.strip()) for s, t in zip(src, tgt) if s.strip() and t.strip()]


def is_caption(sentence: str) -> bool:
    """Stock-photo caption style: lower-case start or a detached final period ("... festival .")."""
    return sentence[:1].islower() or sentence.endswith(" .")


def style_prompt(concepts: list[str], sentence: str, tags: bool = True) -> str:
    """The task prompt, or with `tags` the caption cue for caption-style sentences."""
    prompt = commongen_prompt(concepts)
    if tags and is_caption(sentence):
        return prompt.removesuffix("Sentence:") + "Caption:"
    return prompt


def train_tokenizer(pairs: list[tuple[list[str], str]], vocab_size: int, out: Path, tags: bool = False):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = [style_prompt(c, t, tags) + " " + t for c, t in pairs]
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                  pad_token=EOS, unk_token=EOS, model_max_length=256)
    tok.save_pretrained(out)
    return tok


def split_heldout(pairs: list[tuple[list[str], str]], n_sets: int, rng: random.Random):
    """(train, held-out) with whole concept sets held out, so held-out prompts are new combinations,
    as on CommonGen dev."""
    sets = sorted({" ".join(c) for c, _ in pairs})
    held = set(rng.sample(sets, min(n_sets, len(sets) // 10)))
    return ([p for p in pairs if " ".join(p[0]) not in held], [p for p in pairs if " ".join(p[0]) in held])


def content_words(pairs: list[tuple[list[str], str]]) -> list[list[str]]:
    """Per sentence, the distinct lemmas of its words that occur as concepts somewhere in train."""
    vocab = {c for concepts, _ in pairs for c in concepts}
    out = []
    for _, sentence in pairs:
        found: list[str] = []
        for word in re.findall(r"[a-z]+", sentence.lower()):
            hits = sorted((lemmas(word) | {word}) & vocab)  # sorted: a set's order varies per process
            if hits and hits[0] not in found:
                found.append(hits[0])
        out.append(found)
    return out


def draw_prompts(pairs, words: list[list[str]], augment: float, rng: random.Random,
                 distract: float = 0.0) -> list[list[str]]:
    """One epoch's concept lists: shuffled, and with probability `augment` a fresh 3-5 word set from
    the sentence itself, so a prompt cannot be memorised as a key to one sentence. With probability
    `distract` one concept of another set that the sentence does not use is added (up to five in
    all), so the model learns that a sentence may leave out a concept it cannot fit."""
    prompts = []
    for (concepts, _), found in zip(pairs, words):
        if len(found) >= 3 and rng.random() < augment:
            concepts = rng.sample(found, min(len(found), rng.choice((3, 3, 3, 4, 5))))
        else:
            concepts = concepts[:]
            rng.shuffle(concepts)
        # Checked first so that distract=0 draws nothing: earlier recipes keep their prompts.
        if distract and len(concepts) < 5 and rng.random() < distract:
            other = rng.choice(rng.choice(pairs)[0])
            if other not in found and other not in concepts:
                concepts.insert(rng.randrange(len(concepts) + 1), other)
        prompts.append(concepts)
    return prompts


def encode(tok, prompts: list[list[str]], pairs, tags: bool = False) -> list[tuple[list[int], int]]:
    """Token ids and the prompt length (loss starts after it)."""
    heads = tok([style_prompt(c, s, tags) for c, (_, s) in zip(prompts, pairs)])["input_ids"]
    bodies = tok([" " + s for _, s in pairs])["input_ids"]
    return [(h + b + [tok.eos_token_id], len(h)) for h, b in zip(heads, bodies)]


def batches(rows, batch_size: int, pad: int, rng: random.Random, shuffle: bool = True):
    """Padded batches of rows of similar length (sorted within windows of 50 batches), since
    padding is pure waste on CPU."""
    order = list(range(len(rows)))
    if shuffle:
        rng.shuffle(order)
    window = batch_size * 50
    order = [j for w in range(0, len(order), window)
             for j in sorted(order[w:w + window], key=lambda j: len(rows[j][0]))]
    starts = list(range(0, len(order), batch_size))
    if shuffle:
        rng.shuffle(starts)
    for i in starts:
        chunk = [rows[j] for j in order[i:i + batch_size]]
        if shuffle and len(chunk) < batch_size:
            continue
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, (row, n_prompt) in enumerate(chunk):
            ids[b, :len(row)] = torch.tensor(row)
            labels[b, n_prompt:len(row)] = torch.tensor(row[n_prompt:])
            mask[b, :len(row)] = 1
        yield ids, labels, mask


def oversample_plain(pairs, words: list[list[str]], repeat: int):
    """Pairs (and their content words) with each plain, non-caption sentence `repeat` times."""
    keep = [i for i, (_, s) in enumerate(pairs) for _ in range(1 if is_caption(s) else repeat)]
    return [pairs[i] for i in keep], [words[i] for i in keep]


def save(model, folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained with the weights stored in `dtype` (the config keeps float32, so a plain
    from_pretrained loads float32); float16 halves the folder for the 60 MB bundle."""
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the copy would not be shared storage, so it would be written twice
    model.save_pretrained(folder, state_dict=state)


def make_model(vocab: int, hidden: int, layers: int, heads: int, eos: int, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=eos,
                      eos_token_id=eos, pad_token_id=eos)
    model = LlamaForCausalLM(cfg)
    if dropout:
        add_residual_dropout(model, dropout)
    return model


def add_residual_dropout(model, p: float) -> None:
    """Dropout on each attention and MLP output before it joins the residual stream. Llama has
    none built in; hooks keep the saved model a plain Llama, and they act only in train mode."""

    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True),) + tuple(output[1:])
        return torch.nn.functional.dropout(output, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor, exempt: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al., 2020): -log(1 - p) of every token the sentence has
    already used, at each next-token position, except the gold token and the `exempt` ids
    (articles, punctuation: reuse of those is normal). Tiny LMs fall into loops under greedy
    decoding ("a dog with a dog with a dog"); this teaches the model itself that a repeat is unlikely."""
    vocab = logits.shape[-1]
    used = labels.clamp(min=0)
    onehot = torch.nn.functional.one_hot(used, vocab) * (labels != -100).unsqueeze(-1)
    seen = onehot.cumsum(1)[:, :-1] > 0  # tokens of the sentence up to position t
    gold = labels[:, 1:]
    cand = seen & ~torch.nn.functional.one_hot(gold.clamp(min=0), vocab).bool()
    cand[..., exempt] = False
    cand &= (gold != -100).unsqueeze(-1)
    probs = torch.softmax(logits[:, :-1].float(), -1)
    loss = -torch.log((1 - probs).clamp(min=1e-5)) * cand
    return loss.sum() / (gold != -100).sum().clamp(min=1)


def frequent_tokens(rows: list[tuple[list[int], int]], n: int) -> torch.Tensor:
    """The n most frequent sentence tokens: the ones a sentence may repeat."""
    counts: dict[int, int] = {}
    for ids, n_prompt in rows:
        for t in ids[n_prompt:]:
            counts[t] = counts.get(t, 0) + 1
    return torch.tensor(sorted(counts, key=counts.get, reverse=True)[:n], dtype=torch.long)


@torch.inference_mode()
def heldout_loss(model, rows, pad: int, unlikelihood: float = 0.0, exempt: torch.Tensor | None = None) -> float:
    """The training objective (cross-entropy plus any unlikelihood term) per sentence token of
    held-out rows."""
    model.eval()
    total = count = 0.0
    for ids, labels, mask in batches(rows, 64, pad, random.Random(0), shuffle=False):
        n = (labels[:, 1:] != -100).sum().item()
        result = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = result.loss
        if unlikelihood:
            loss = loss + unlikelihood * unlikelihood_loss(result.logits, labels, exempt)
        total += loss.item() * n
        count += n
    model.train()
    return total / count


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
    augment: float = typer.Option(0.5, help="Share of rows per epoch prompted with concepts drawn from "
                                  "the sentence instead of its CommonGen set."),
    dropout: float = typer.Option(0.1, help="Residual dropout of the target (the draft is too small to overfit)."),
    heldout_sets: int = typer.Option(500, help="Train concept sets held out to pick the best checkpoint."),
    eval_every: int = typer.Option(250, help="Steps between held-out evaluations (and saves on improvement)."),
    target_lr: float = typer.Option(5e-4, help="Peak learning rate of the target (cosine decay)."),
    draft_lr: float = typer.Option(2e-3, help="Peak learning rate of the draft (smaller models take more)."),
    limit: int = typer.Option(0, help="Use only the first N pairs (0: all)."),
    unlikelihood: float = typer.Option(0.0, help="Weight of the token-level unlikelihood loss on repeats."),
    exempt_tokens: int = typer.Option(64, help="This many most frequent tokens may repeat freely."),
    init: Path = typer.Option(None, help="Continue from this folder's tokenizer, target/ and draft/ "
                              "(a fine-tuning stage) instead of training from scratch."),
    style_tags: bool = typer.Option(False, help="Prompt caption-style train sentences with `Caption:` "
                                    "so the task's `Sentence:` asks for the plain style (tried, not bundled: "
                                    "see the README)."),
    plain_repeat: int = typer.Option(1, help="Times each plain (non-caption) sentence appears per epoch."),
    save_dtype: str = typer.Option("float32", help="Dtype the weights are stored in: float32, or float16 "
                                   "for half the folder size (the config stays float32)."),
) -> None:
    if save_dtype not in SAVE_DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(SAVE_DTYPES)}, not {save_dtype!r}",
                                 param_hint="--save-dtype")
    store = SAVE_DTYPES[save_dtype]
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    pairs = load_pairs(data)
    if limit:
        pairs = pairs[:limit]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_command.txt").write_text(command_line("jobs.train_tiny") + "\n")
    pairs, heldout = split_heldout(pairs, heldout_sets, rng)
    if init:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(init / "target")
        models = {name: AutoModelForCausalLM.from_pretrained(init / name) for name in ("target", "draft")}
        if dropout:
            add_residual_dropout(models["target"], dropout)
        tok.save_pretrained(out / "target")
    else:
        tok = train_tokenizer(pairs, vocab_size, out / "target", style_tags)
        models = {
            "target": make_model(len(tok), target_hidden, target_layers, target_heads, tok.eos_token_id, dropout),
            "draft": make_model(len(tok), draft_hidden, draft_layers, draft_heads, tok.eos_token_id),
        }
    tok.save_pretrained(out / "draft")
    words = content_words(pairs)
    pairs, words = oversample_plain(pairs, words, plain_repeat)
    held_rows = encode(tok, [c for c, _ in heldout], heldout, style_tags)
    eos = tok.eos_token_id
    exempt = frequent_tokens(encode(tok, [c for c, _ in pairs], pairs), exempt_tokens) if unlikelihood else None
    for name, m in models.items():
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters", flush=True)
    print(f"{len(pairs)} training rows per epoch ({sum(not is_caption(s) for _, s in pairs)} plain), "
          f"{len(heldout)} held out; "
          f"{sum(len(w) >= 3 for w in words) / len(words):.0%} can be re-prompted", flush=True)
    steps_per_epoch = len(pairs) // batch_size
    total = int(steps_per_epoch * epochs)
    peak = {"target": target_lr, "draft": draft_lr}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=peak[n], weight_decay=0.05) for n, m in models.items()}
    warmup = min(200, total // 10)

    def lr_at(step: int, elapsed: float, lr: float) -> float:
        # Cosine over whichever budget runs out first (steps or minutes), so a run cut by
        # --max-minutes still ends at a low learning rate instead of mid-schedule.
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = max((step - warmup) / max(1, total - warmup), elapsed / (max_minutes * 60))
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    log = open(out / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "epoch", "target_loss", "draft_loss", "seconds",
                     "target_heldout", "draft_heldout"])
    best = {name: math.inf for name in models}
    start, step = time.time(), 0
    bar = tqdm(total=total, desc="train", mininterval=30)
    done = False
    while not done:
        rows = encode(tok, draw_prompts(pairs, words, augment, rng), pairs, style_tags)
        for ids, labels, mask in batches(rows, batch_size, eos, rng):
            losses = {}
            for name, m in models.items():
                for g in opts[name].param_groups:
                    g["lr"] = lr_at(step, time.time() - start, peak[name])
                result = m(input_ids=ids, attention_mask=mask, labels=labels)
                loss = result.loss
                if unlikelihood:
                    loss = loss + unlikelihood * unlikelihood_loss(result.logits, labels, exempt)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                losses[name] = loss.item()
            step += 1
            elapsed = time.time() - start
            done = step >= total or elapsed > max_minutes * 60
            held = {}
            if step % eval_every == 0 or done:
                held = {name: heldout_loss(m, held_rows, eos, unlikelihood, exempt) for name, m in models.items()}
                for name, m in models.items():
                    if held[name] < best[name]:
                        best[name] = held[name]
                        save(m, out / name, store)
                tqdm.write(f"step {step}: held-out loss target {held['target']:.3f} draft {held['draft']:.3f}")
            writer.writerow([step, f"{step / steps_per_epoch:.3f}", f"{losses['target']:.4f}",
                             f"{losses['draft']:.4f}", f"{elapsed:.0f}",
                             *(f"{held[n]:.4f}" if held else "" for n in ("target", "draft"))])
            log.flush()
            bar.set_postfix(target=f"{losses['target']:.3f}", draft=f"{losses['draft']:.3f}", refresh=False)
            bar.update(1)
            if done:
                break
    bar.close()
    log.close()
    print(f"trained {step} steps ({step / steps_per_epoch:.2f} epochs) in {(time.time() - start) / 60:.1f} min; "
          f"best held-out loss target {best['target']:.3f} draft {best['draft']:.3f}", flush=True)


if __name__ == "__main__":
    app()
