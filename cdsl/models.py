"""Models behind a small interface: load any Hugging Face causal LM, run it over a KV cache.

`LM` is the loaded model plus its tokenizer. `Decoder` is one sequence's view of an LM: its
token ids, the KV cache covering a prefix of them, and the next-token logits once everything is
cached. Tokens appended but not yet run through the model are "pending": the next call feeds
them together with any new ones, so the first call of a generation is the prefill.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from cdsl.config import ModelConfig
from cdsl.stats import Stats

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class VocabularyMismatch(ValueError):
    """Draft and target do not share a tokenizer, so their token ids mean different things."""


class LM:
    """A causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, name: str = "model") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.eos_id: int | None = tokenizer.eos_token_id
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, config: ModelConfig | str) -> LM:
        """Load from a local folder or a hub id (`from_pretrained` for model and tokenizer)."""
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(path=config)
        local = Path(cfg.path).expanduser()
        if not local.exists() and (cfg.path.startswith(("/", ".", "~")) or cfg.path.count("/") > 1):
            raise FileNotFoundError(f"model folder not found: {cfg.path} (give a local folder or a hub id)")
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        ).to(cfg.device)
        return cls(model, tokenizer, name=cfg.path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        """Batched forward of `ids` [B, T] after `cache`; float32 logits [B, T, V] and the cache."""
        cache = DynamicCache() if cache is None else cache
        out = self.model(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True)
        return out.logits[..., : self.vocab_size].float().cpu(), out.past_key_values


def check_same_vocab(draft: LM, target: LM) -> None:
    """Refuse a pair whose tokenizers disagree, naming both."""
    dv, tv = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if dv != tv:
        only = sorted(set(dv.items()) ^ set(tv.items()), key=str)[:3]
        raise VocabularyMismatch(
            f"draft model {draft.name!r} (vocabulary of {len(dv)} tokens) and target model "
            f"{target.name!r} (vocabulary of {len(tv)} tokens) do not share a tokenizer "
            f"(e.g. {only}); speculative lookaheads need a draft with the target's vocabulary"
        )


def _crop(cache: DynamicCache, length: int) -> None:
    """Shorten the cache to `length` tokens (a negative count works across transformers 4 and 5)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)


@dataclass
class Rollout:
    """k candidate tokens, each followed by `steps` rolled-out tokens, on a forked cache."""

    candidates: list[int]
    tokens: torch.Tensor
    """[k, steps] rolled-out tokens after each candidate."""
    first_logits: torch.Tensor
    """[k, V] next-token logits right after each candidate."""
    cache: DynamicCache


class Decoder:
    """One sequence on one LM: token ids, KV cache over a prefix of them, call accounting."""

    def __init__(self, lm: LM, ids: list[int], stats: Stats, role: str) -> None:
        self.lm, self.stats, self.role = lm, stats, role
        self.ids = list(ids)
        self.cache: DynamicCache | None = None
        self.n_cached = 0
        self.logits: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor, cache: DynamicCache | None):
        with self.stats.timed(self.role):
            logits, cache = self.lm.forward(ids, cache)
        setattr(self.stats, f"{self.role}_calls", getattr(self.stats, f"{self.role}_calls") + 1)
        return logits, cache

    def step(self, new: list[int] = ()) -> torch.Tensor:
        """Append `new`, run every uncached token; logits [T, V] for the positions fed."""
        self.ids.extend(new)
        fed = self.ids[self.n_cached:]
        if not fed:
            return self.logits[None]
        logits, self.cache = self._forward(torch.tensor([fed]), self.cache)
        self.n_cached = len(self.ids)
        self.logits = logits[0, -1]
        return logits[0]

    def verify(self, new: list[int]) -> torch.Tensor:
        """Append `new`; logits [len(new) + 1, V] predicting each new token and the one after."""
        known = self.logits if self.n_cached == len(self.ids) else None
        rows = self.step(new)
        if known is not None:
            rows = torch.cat([known[None], rows])
        return rows[-(len(new) + 1):]

    def next_logits(self) -> torch.Tensor:
        """Logits [V] for the token after `ids`."""
        return self.step()[-1]

    def truncate(self, length: int, logits: torch.Tensor | None = None) -> None:
        """Keep the first `length` tokens and crop the cache to match. `logits`, the known
        next-token logits after them, saves a call; without it the last token stays pending."""
        del self.ids[length:]
        if length < self.n_cached or (length == self.n_cached and self.logits is None):
            keep = length if logits is not None else length - 1
            _crop(self.cache, keep)
            self.n_cached, self.logits = keep, logits

    def rollout(self, candidates: list[int], steps: int, pick) -> Rollout:
        """Roll each candidate out `steps` tokens in one batched call per step, sharing the
        prefix cache. `pick(logits [k, V]) -> [k]` chooses each next token."""
        self.next_logits()  # the prefix must be fully cached before it is shared
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(candidates))
        feed = torch.tensor(candidates)[:, None]
        out, first = [], None
        for _ in range(steps):
            logits, cache = self._forward(feed, cache)
            first = logits[:, -1] if first is None else first
            feed = pick(logits[:, -1])[:, None]
            out.append(feed)
        return Rollout(list(candidates), torch.cat(out, dim=1), first, cache)

    def adopt(self, rollout: Rollout, row: int) -> None:
        """Continue from candidate `row` of a rollout: reuse its cache instead of a new call."""
        cache = rollout.cache
        cache.batch_select_indices(torch.tensor([row]))
        _crop(cache, len(self.ids) + 1)
        self.ids.append(rollout.candidates[row])
        self.cache, self.n_cached, self.logits = cache, len(self.ids), rollout.first_logits[row]
