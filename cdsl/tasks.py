"""Task formats: how a constraint becomes a prompt, and how datasets spell their inputs.

The bundled tiny models are trained on exactly `commongen_prompt(concepts) + " " + sentence`, so
every entry point must build prompts through this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def commongen_prompt(concepts: list[str]) -> str:
    """The CommonGen prompt: the model continues it with one sentence and EOS."""
    return f"Concepts: {', '.join(concepts)}\nSentence:"


def parse_concepts(value: str | list[str]) -> list[str]:
    """Concepts from "dog,frisbee", "dog frisbee", CommonGen's "dog_N#frisbee_N" or a list.

    CommonGen dev tags each concept with a part of speech (`field_N`); the tag is dropped
    because the coverage reward matches every inflection anyway.
    """
    if isinstance(value, str):
        sep = "#" if "#" in value else ("," if "," in value else None)
        items = value.split(sep)
    else:
        items = list(value)
    concepts = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"concepts: every concept must be a string, got {type(item).__name__}")
        word = item.strip()
        if "_" in word and word.rsplit("_", 1)[1] in {"N", "V", "A", "R", "J"}:
            word = word.rsplit("_", 1)[0]
        if word:
            concepts.append(word)
    if not concepts:
        raise ValueError("concepts: at least one non-empty concept is required")
    return concepts


def read_commongen_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows `{"concepts": [...], "references": [...]}` from a CommonGen-format jsonl file."""
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield {"concepts": parse_concepts(row["concept_set"]), "references": row.get("scene", [])}


def harmless_prompt(dialogue: str) -> str:
    """The HH-RLHF prompt: the dialogue up to and including its final "Assistant:", which the
    model continues with the assistant's answer."""
    cut = dialogue.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("dialogue: no '\\n\\nAssistant:' turn to answer")
    return dialogue[: cut + len("\n\nAssistant:")]


def read_harmless_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows `{"prompt": ..., "chosen": ..., "rejected": ...}` from an hh-rlhf jsonl file."""
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield {"prompt": harmless_prompt(row["chosen"]), "chosen": row["chosen"], "rejected": row["rejected"]}
