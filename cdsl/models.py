"""Models behind a small interface: load any Hugging Face causal LM and its tokenizer.

`LM` is the loaded model plus its tokenizer; `Codec` is the tokenizer alone, which is all a
coordinator needs when the weights live in other processes. Running sequences over KV caches is
`cdsl.store` (many caches, one batched forward) and `cdsl.decoder` (one sequence's view).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cdsl.config import ModelConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class VocabularyMismatch(ValueError):
    """Draft and target do not share a tokenizer, so their token ids mean different things."""


class Codec:
    """Text <-> token ids with one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id: int | None = tokenizer.eos_token_id

    @classmethod
    def load(cls, config: ModelConfig | str) -> Codec:
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(path=config)
        _check_path(cfg.path)
        return cls(AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _check_path(path: str) -> None:
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"model folder not found: {path} (give a local folder or a hub id)")


class LM(Codec):
    """A causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, name: str = "model") -> None:
        super().__init__(tokenizer)
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, config: ModelConfig | str) -> LM:
        """Load from a local folder or a hub id (`from_pretrained` for model and tokenizer)."""
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(path=config)
        _check_path(cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        ).to(cfg.device)
        return cls(model, tokenizer, name=cfg.path)


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
