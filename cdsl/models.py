"""Models behind a small interface: load any Hugging Face causal LM and its tokenizer.

A model path is a local folder, a hub id, a `.gguf` file (converted once into a cached folder,
see `cdsl.pretrained`) or one of the `cdsl.pretrained.BUILTIN` names of the default models.

`LM` is the loaded model plus its tokenizer; `Codec` is the tokenizer alone, which is all a
coordinator needs when the weights live in other processes. Running sequences over KV caches is
`cdsl.store` (many caches, one batched forward) and `cdsl.decoder` (one sequence's view).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import cdsl.draft_model  # noqa: F401  registers the default draft's architecture
from cdsl.config import ModelConfig
from cdsl.kernels import DTYPES, packed_dtype, use_onednn
from cdsl.pretrained import resolve
from cdsl.rules import WordKeys, sentence_ends


class VocabularyMismatch(ValueError):
    """Draft and target do not share a tokenizer, so their token ids mean different things."""


def eos_ids(tokenizer, folder: str | None = None) -> list[int]:
    """Every id that ends generation: the tokenizer's EOS and all those the generation config lists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if folder is not None:
        try:
            listed = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:
            listed = None
        ids += [listed] if isinstance(listed, int) else list(listed or [])
    return list(dict.fromkeys(ids))


def context_window(model_config) -> int | None:
    """Positions the model can attend over, from its config (None where it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Codec:
    """Text <-> token ids with one tokenizer."""

    def __init__(self, tokenizer, eos: list[int] | None = None, window: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_ids: list[int] = eos if eos is not None else eos_ids(tokenizer)
        """Token ids that end generation; the first is the one written where an EOS is needed."""
        self.eos_id: int | None = self.eos_ids[0] if self.eos_ids else None
        self.window = window
        """The model's context window in tokens (prompt + output), None if unknown."""

    @classmethod
    def load(cls, config: ModelConfig | str, role: str = "model") -> Codec:
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(path=config)
        folder = resolve(cfg.path, role)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        try:
            window = context_window(AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code))
        except (OSError, ValueError):  # a tokenizer-only folder: no config to read
            window = None
        return cls(tokenizer, eos_ids(tokenizer, folder), window)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a generation starts from: BOS first where the tokenizer asks for one (and the
        prompt, e.g. from a chat template, does not already start with it)."""
        ids = self.encode(prompt)
        bos = self.tokenizer.bos_token_id
        if getattr(self.tokenizer, "add_bos_token", False) and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids or [self.eos_id]

    def check_fits(self, prompt_tokens: int, max_new_tokens: int, budget_field: str = "max_new_tokens") -> None:
        """ValueError naming the prompt and the limit in tokens if prompt + output cannot fit."""
        if self.window is not None and prompt_tokens + max_new_tokens > self.window:
            raise ValueError(f"prompt: {prompt_tokens} tokens + {budget_field} {max_new_tokens} exceed the model's "
                             f"context window of {self.window} tokens")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @cached_property
    def sentence_end_ids(self) -> frozenset[int]:
        """Token ids that end a sentence (`cdsl.rules.sentence_ends`), found once."""
        return sentence_ends(self.tokenizer)

    @cached_property
    def word_keys(self) -> WordKeys:
        """Each token's word for the no-repeat rule (`cdsl.rules.WordKeys`), found once."""
        return WordKeys(self.tokenizer)


class LM(Codec):
    """A causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, name: str = "model", eos: list[int] | None = None) -> None:
        super().__init__(tokenizer, eos, context_window(model.config))
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, config: ModelConfig | str, role: str = "model") -> LM:
        """Load a configured model (`from_pretrained` for model and tokenizer)."""
        cfg = config if isinstance(config, ModelConfig) else ModelConfig(path=config)
        folder = resolve(cfg.path, role)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        ).to(cfg.device)
        if cfg.onednn:
            use_onednn(model, packed_dtype(model, cfg.packed_dtype))
        return cls(model, tokenizer, name=cfg.path, eos=eos_ids(tokenizer, folder))

    @torch.inference_mode()
    def perplexity(self, prompt: str, text: str) -> float:
        """This model's perplexity of `text` (+ EOS) after `prompt`: the fluency check on outputs."""
        p = self.encode(prompt)
        body = self.encode(text) + [self.eos_id]  # the first EOS id is the one a text ends with
        logits = self.model(torch.tensor([p + body]).to(self.device)).logits[0, len(p) - 1:-1, : self.vocab_size]
        return math.exp(torch.nn.functional.cross_entropy(logits.float().cpu(), torch.tensor(body)).item())


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
