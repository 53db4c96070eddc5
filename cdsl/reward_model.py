"""Reward models: a Hugging Face sequence classifier scoring prompt + text, with prompt caching.

A CDLH step scores k candidates of L + 1 tokens after the same prompt and prefix, token after
token. Re-reading a 300-token dialogue k times per token would cost more than the decoding. So a
decoder-only classifier (one with a `score` head, like `LlamaForSequenceClassification`) keeps
a KV cache of each prompt it has seen plus the prefix its candidates share (as ARGS does), and a
call costs one forward over the candidates' new tokens, batched across requests and prompts by
the same `SeqStore` that runs the decoding models. Scores equal a plain forward's; text still
crosses the interface (the model re-tokenises prompt + text and reuses the longest cached part).

Importing this module registers `cdsl_reward` (`cdsl.reward_classifier`) with transformers' Auto
classes (the default harmless model's 0.5 is the middle of the hh-rlhf answers it was fitted on).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import cdsl.reward_classifier  # noqa: F401  registers the default reward model's architecture
from cdsl.kernels import use_onednn
from cdsl.pretrained import resolve
from cdsl.rewards import RewardInput
from cdsl.store import Run, SeqStore

GROW_ALONE = 8
"""Tokens a prompt's texts share beyond its cache from which one forward caches them first
(below that each text feeds them itself: cheaper than another forward)."""


class _HeadAsLM(nn.Module):
    """A decoder-only classifier seen as an LM whose vocabulary is its labels (the score head at
    every position), so `SeqStore` can cache, fork and batch it like the decoding models."""

    def __init__(self, classifier) -> None:
        super().__init__()
        self.backbone, self.head = classifier.base_model, classifier.score

    def forward(self, input_ids, cache=None, use_cache=True, attention_mask=None, position_ids=None,
                logits_to_keep: int = 0):
        out = self.backbone(input_ids=input_ids, cache=cache, use_cache=use_cache,
                            attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        return SimpleNamespace(logits=self.head(hidden), cache=out.cache)


@dataclass
class _Scorer:
    """What `SeqStore` needs of an LM."""

    model: nn.Module
    vocab_size: int
    device: torch.device


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RewardModel:
    """Any Hugging Face sequence-classification model scoring prompt + text, mapped to [0, 1].

    `label=None` takes the sigmoid of the first logit (a scalar reward head); a label name takes
    the softmax probability of that label (a classifier such as harmless/harmful). A decoder-only
    classifier caches prompts (up to `cached_prompts` of them, least recently used dropped);
    others, and texts longer than `max_length` tokens (truncated from the left, so the judged
    text is always seen), get a plain batched forward. `onednn`: on a CPU, the backbone's linear
    layers run as `cdsl.kernels.use_onednn` packs them.
    """

    monotone = False

    def __init__(self, path: str, label: str | None = None, device: str = "cpu", batch_size: int = 16,
                 max_length: int = 1024, trust_remote_code: bool = False, cached_prompts: int = 32,
                 onednn: bool = True) -> None:
        folder = resolve(path, "reward_model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"reward_model: no tokenizer to read text with in {path!r} ({err})") from err
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, trust_remote_code=trust_remote_code).to(device).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"reward_model: {path!r} is not a sequence-classification model ({err})") from err
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"
        self.max_length = min(max_length, self.tokenizer.model_max_length or max_length)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = None
        if label is not None:
            names = {v: int(k) for k, v in self.model.config.id2label.items()}
            if label not in names:
                raise ValueError(f"reward_model_label: {label!r} is not among the model's labels {sorted(names)}")
            self.label_index = names[label]
        self.device, self.batch_size = device, batch_size
        if onednn and device == "cpu":
            use_onednn(self.model.base_model)  # the backbone only: the score head stays the nn.Linear read below
        self.store: SeqStore | None = None
        if cached_prompts > 0 and isinstance(getattr(self.model, "score", None), nn.Linear):
            self.store = SeqStore(_Scorer(_HeadAsLM(self.model), self.model.config.num_labels, self.model.device))
        self.cached_prompts = cached_prompts
        self.prompts: OrderedDict[str, tuple[str, list[int]]] = OrderedDict()
        """prompt text -> (cache key, token ids that cache holds), least recently used first."""
        self._serial = 0
        self.lock = threading.Lock()  # one model, shared by every request of this process

    def _reward(self, logits: torch.Tensor) -> list[float]:
        logits = logits.float()
        if self.label_index is None:
            return torch.sigmoid(logits[:, 0]).tolist()
        return torch.softmax(logits, -1)[:, self.label_index].tolist()

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        with self.lock:
            texts = [item.prompt + item.text for item in batch]
            if self.store is None:
                return self._score_plain(texts)
            ids = [self.tokenizer(t).input_ids for t in texts]
            out: list[float | None] = [None] * len(batch)
            long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
            for i, s in zip(long, self._score_plain([texts[i] for i in long])):
                out[i] = s
            fits = [i for i, row in enumerate(ids) if len(row) <= self.max_length]
            for i, s in zip(fits, self._score_cached([batch[i].prompt for i in fits], [ids[i] for i in fits])):
                out[i] = s
            return out

    @torch.inference_mode()
    def _score_plain(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            out.extend(self._reward(self.model(**enc).logits))
        return out

    def _score_cached(self, prompts: list[str], ids: list[list[int]]) -> list[float]:
        """Batched forwards in which each text feeds only what follows the longest part of it that
        its prompt's cache holds (the prompt, and the prefix of the last call's first text)."""
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        # whole prompts at a time, about `4 * batch_size` texts per forward: every text's row
        # holds its own copy of its prompt's cache while the forward runs
        chunks, rows = [[]], 4 * self.batch_size
        for members in groups.values():
            if chunks[-1] and len(chunks[-1]) + len(members) > rows:
                chunks.append([])
            chunks[-1].extend(members)
        out: list[float] = [0.0] * len(ids)
        try:
            for chunk in chunks:
                for i, s in zip(chunk, self._score_groups([prompts[i] for i in chunk], [ids[i] for i in chunk])):
                    out[i] = s
            return out
        except BaseException:
            for key, _ in self.prompts.values():  # a failed forward may leave a cache short of its record
                self.store.release(key)
            self.prompts.clear()
            raise

    def _score_groups(self, prompts: list[str], ids: list[list[int]]) -> list[float]:
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        grown = {}
        for prompt, rows in groups.items():
            key, held = self._entry(prompt)
            shared = ids[rows[0]][: min(len(ids[i]) for i in rows) - 1]  # every text feeds at least one token
            for i in rows[1:]:
                shared = shared[: _common(shared, ids[i])]
            keep = _common(held, shared)
            if len(rows) > 1 and len(shared) - keep >= GROW_ALONE:
                grown[prompt] = (Run(self._key(), [shared[keep:]], keep, fork=key if keep else None,
                                     last_only=True), shared)
        self._run([run for run, _ in grown.values()])
        for prompt, (run, shared) in grown.items():
            self._hold(prompt, run.key, shared)
        calls, owner = [], []
        for prompt, rows in groups.items():
            key, held = self.prompts[prompt]
            # one start per prompt: its texts then feed similar widths, which batch in one forward
            keep = min(min(_common(held, ids[i]), len(ids[i]) - 1) for i in rows)
            for i in rows:
                calls.append(Run(self._key(), [ids[i][keep:]], keep, fork=key if keep else None, last_only=True))
                owner.append(i)
        try:
            logits = self._run(calls)
        except BaseException:
            for call in calls:
                self.store.release(call.key)
            raise
        firsts: dict[str, int] = {}
        for j, i in enumerate(owner):
            firsts.setdefault(prompts[i], j)
        for j, call in enumerate(calls):  # each prompt keeps its first text's cache: the next call shares most of it
            if firsts[prompts[owner[j]]] == j:
                self._hold(prompts[owner[j]], call.key, ids[owner[j]])
            else:
                self.store.release(call.key)
        while len(self.prompts) > self.cached_prompts:  # this call's prompts are the most recent
            key, _ = self.prompts.popitem(last=False)[1]
            self.store.release(key)
        out = [None] * len(ids)
        for j, i in enumerate(owner):
            out[i] = logits[j]
        return self._reward(torch.cat(out))

    def _hold(self, prompt: str, key: str, tokens: list[int]) -> None:
        """`key`'s cache, holding `tokens`, becomes `prompt`'s; the one it replaces is freed."""
        old, _ = self.prompts[prompt]
        if old != key:
            self.store.release(old)
        self.store.compact(key)
        self.prompts[prompt] = (key, tokens)

    def _key(self) -> str:
        self._serial += 1
        return f"r{self._serial}"

    def _entry(self, prompt: str) -> tuple[str, list[int]]:
        if prompt not in self.prompts:
            self.prompts[prompt] = (self._key(), [])
        self.prompts.move_to_end(prompt)
        return self.prompts[prompt]

    def _run(self, calls: list[Run]) -> list[torch.Tensor]:
        results = self.store.run(calls) if calls else []
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results


@lru_cache(maxsize=8)
def load_reward_model(path: str, label: str | None = None, device: str = "cpu") -> RewardModel:
    """One `RewardModel` per (path, label, device) in this process, shared by every request
    that names it (loading one per request would hold a copy of the weights each)."""
    return RewardModel(path, label, device)


def pairwise_accuracy(score: Callable[[list[str]], list[float]], pairs: Sequence[dict], batch: int = 32) -> float:
    """Share of `{"chosen", "rejected"}` pairs whose chosen text scores above the rejected one."""
    wins = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        s = score([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])
        wins += sum(c > r for c, r in zip(s[: len(chunk)], s[len(chunk):]))
    return wins / len(pairs) if pairs else 0.0
