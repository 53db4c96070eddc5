"""Tiny random-weight models of three families, saved to disk and loaded through `LM.load`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cdsl.config import ModelConfig
from cdsl.models import LM

EOS = "<|endoftext|>"
SENTENCES = [
    "The dog throws a frisbee and the child catches it in the park.",
    "Children threw stones into the river while a cat was sleeping.",
    "A man is cooking dinner in the kitchen and his wife sets the table.",
    "Concepts: dog, frisbee, catch, throw\nSentence: A dog catches the frisbee.",
]
FAMILIES = ("llama", "qwen2", "gpt2")


def make_tokenizer(folder: Path, vocab_size: int = 320, corpus: list[str] = SENTENCES) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 5, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    tok.save_pretrained(folder)
    return tok


def make_model(family: str, vocab: int, eos: int, seed: int, hidden: int = 32, layers: int = 2):
    torch.manual_seed(seed)
    # a wide init makes logits peaky, so argmax ties (which float noise could flip) do not occur
    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, initializer_range=0.5)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024, **common)
        return GPT2LMHeadModel(cfg)
    cls_cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    cfg = cls_cfg(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, **common)
    return cls(cfg)


def save_model(folder: Path, family: str, seed: int, tokenizer_folder: Path | None = None, **size) -> Path:
    tok = make_tokenizer(folder) if tokenizer_folder is None else PreTrainedTokenizerFast.from_pretrained(
        tokenizer_folder)
    tok.save_pretrained(folder)
    make_model(family, len(tok), tok.eos_token_id, seed, **size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """For each family a target and a (differently seeded, smaller) draft sharing a tokenizer."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family in FAMILIES:
        target = save_model(root / f"{family}-target", family, seed=1)
        dirs[f"{family}-target"] = target
        dirs[f"{family}-draft"] = save_model(root / f"{family}-draft", family, seed=2, tokenizer_folder=target,
                                             hidden=16, layers=1)
    return dirs


@pytest.fixture(scope="session")
def pairs(model_dirs) -> dict[str, tuple[LM, LM]]:
    """Loaded (target, draft) per family, in float64 so equality tests compare exact argmaxes."""
    return {
        f: (LM.load(ModelConfig(path=str(model_dirs[f"{f}-target"]), dtype="float64")),
            LM.load(ModelConfig(path=str(model_dirs[f"{f}-draft"]), dtype="float64")))
        for f in FAMILIES
    }


@pytest.fixture(scope="session")
def reward_model_dir(model_dirs, tmp_path_factory) -> Path:
    """A tiny random-weight Llama sequence classifier (one score head) with the llama tokenizer."""
    from transformers import LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward-model")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dirs["llama-target"])
    tok.save_pretrained(folder)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=1, pad_token_id=tok.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder
