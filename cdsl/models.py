"""Models behind a small interface: load any Hugging Face causal LM and its tokenizer.

A model path is a local folder, a hub id, a `.gguf` file (converted once into a cached folder,
see `cdsl.pretrained`) or one of the `BUILTIN` names of the default models.

`LM` is the loaded model plus its tokenizer; `Codec` is the tokenizer alone, which is all a
coordinator needs when the weights live in other processes. Running sequences over KV caches is
`cdsl.store` (many caches, one batched forward) and `cdsl.decoder` (one sequence's view).
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import cdsl.draft_model  # also registers the default draft's architecture
from cdsl import pretrained
from cdsl.config import BUILTIN_DRAFT, BUILTIN_HARMLESS, BUILTIN_TARGET, ModelConfig
from cdsl.rules import WordKeys, sentence_ends

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class VocabularyMismatch(ValueError):
    """Draft and target do not share a tokenizer, so their token ids mean different things."""


BUILTIN = {BUILTIN_TARGET: pretrained.default_target, BUILTIN_DRAFT: pretrained.default_draft,
           BUILTIN_HARMLESS: pretrained.default_harmless}
"""Names of the default models -> the function that returns (and on first use makes) its folder."""


def resolve(path: str, role: str = "model") -> str:
    """The folder or hub id `from_pretrained` should read for a configured path; `role` names
    the config field in errors ("target", "draft")."""
    try:
        if path in BUILTIN:
            return str(BUILTIN[path]())
        if path.endswith(".gguf"):
            gguf = Path(path).expanduser()
            if not gguf.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            return str(pretrained.convert_gguf(gguf, pretrained.gguf_cache_folder(gguf)))
    except (OSError, ValueError) as err:
        raise type(err)(f"{role}.path: {err}") from err
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"{role}.path: model folder not found: {path} (give a local folder, a hub id, "
                                f"a .gguf file or one of {sorted(BUILTIN)})")
    return path


class PackedLinear(nn.Module):
    """An `nn.Linear` that computes through oneDNN with its weight packed once (CPU). The packed
    weight may be bfloat16, half the bytes a forward streams; inputs and outputs stay float32."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not buffers: state_dict() and .to() would not know the packed layout.
        # The weight is reordered once into the blocked layout oneDNN's linear wants, and the
        # fused op takes and returns dense tensors: no per-call conversion of weights or inputs.
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a dense float32 tensor (a copy: forwards use the packed one)."""
        return self.packed.to_dense().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == x.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)


def _has_fused_linear() -> bool:
    """Whether this torch build has the oneDNN linear ops `PackedLinear` calls (the private ones
    torch.compile's CPU weight freezing uses; a build without them keeps plain `nn.Linear`)."""
    try:
        return bool(torch.ops.mkldnn._reorder_linear_weight and torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def packed_dtype(model: nn.Module, setting: str = "auto") -> torch.dtype:
    """The dtype `use_onednn` packs `model`'s weights in (`ModelConfig.packed_dtype`): "auto" is
    bfloat16 for the project's draft architecture on a CPU oneDNN runs bfloat16 on, else float32.
    A draft's every token is checked by the target, so rounding its weights can cost acceptance
    but never change an output; the target and reward models keep float32."""
    if setting != "auto":
        return DTYPES[setting]
    draft = getattr(getattr(model, "config", None), "model_type", None) == cdsl.draft_model.DraftConfig.model_type
    return torch.bfloat16 if draft and _bf16_supported() else torch.float32


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_onednn(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Swap every plain `nn.Linear` of `model` that holds a CPU float32 weight for a
    `PackedLinear` whose weight is packed in `dtype`; returns how many were swapped.

    A small model's forward on a CPU streams every weight from memory once, and MKL's matrix
    multiply runs 2 or 3 rows as that many passes over the weights; oneDNN's packed weights do
    not, so a forward over 2-5 new tokens (verifying a draft, a k-row search step) costs little
    more than one over a single token, with the same logits to rounding. `python -m
    jobs.bench_kernels` measures it (the README has the figures). A tied output head gets its own
    packed copy (one more head's worth of memory). A model DeepSpeed will split must keep its
    `nn.Linear`s, which AutoTP looks for."""
    if not torch.backends.mkldnn.is_available() or not _has_fused_linear():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child, dtype))
                swapped += 1
    return swapped


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, counting the weights `use_onednn` packed."""
    packed = sum(m.packed.numel() + (0 if m.bias is None else m.bias.numel())
                 for m in model.modules() if isinstance(m, PackedLinear))
    return packed + sum(p.numel() for p in model.parameters())


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
