"""Task formats: how a constraint becomes a prompt, and how datasets spell their inputs.

Every entry point (CLI, HTTP, dataset job, benchmarks, distillation) builds its prompts here. A
model whose tokenizer has a chat template gets the task as chat messages through that template;
one without keeps a plain-text prompt that it continues.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

COMMONGEN_INSTRUCTION = "Write one short sentence that uses all of these words: {words}."


def chat_prompt(messages: list[dict[str, str]], tokenizer=None, plain: str | None = None) -> str:
    """`messages` through the tokenizer's chat template, ready for the assistant's answer; `plain`
    (or the messages' text) when there is no template."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if plain is not None:
        return plain
    names = {"system": "System", "user": "Human", "assistant": "Assistant"}  # HH-RLHF's turn names
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def commongen_prompt(concepts: list[str], tokenizer=None) -> str:
    """The CommonGen prompt: the instruction as a chat message, or "Concepts: ...\nSentence:"
    for a model without a chat template; the model answers with one sentence and EOS."""
    words = ", ".join(concepts)
    return chat_prompt([{"role": "user", "content": COMMONGEN_INSTRUCTION.format(words=words)}], tokenizer,
                       plain=f"Concepts: {words}\nSentence:")


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


def dialogue_messages(dialogue: str) -> list[dict[str, str]]:
    """An hh-rlhf dialogue ("\n\nHuman: ...\n\nAssistant: ...") as chat messages, up to (not
    including) its final Assistant turn, which is the one to answer."""
    cut = dialogue.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("dialogue: no '\\n\\nAssistant:' turn to answer")
    turns = re.split(r"\n\n(Human|Assistant):", "\n\n" + dialogue[:cut].lstrip("\n"))
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(turns[1::2], turns[2::2])]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("dialogue: the turn before the final 'Assistant:' must be a 'Human:' turn")
    return messages


def harmless_prompt(dialogue: str, tokenizer=None) -> str:
    """The HH-RLHF prompt: the dialogue as chat messages, or (without a chat template) the text up
    to and including its final "Assistant:", which the model continues with the answer."""
    messages = dialogue_messages(dialogue)
    return chat_prompt(messages, tokenizer, plain=dialogue[: dialogue.rfind("\n\nAssistant:") + 12])


def read_harmless_jsonl(path: str | Path, tokenizer=None) -> Iterator[dict]:
    """Rows `{"prompt": ..., "chosen": ..., "rejected": ...}` from an hh-rlhf jsonl file."""
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield {"prompt": harmless_prompt(row["chosen"], tokenizer), "chosen": row["chosen"],
                       "rejected": row["rejected"]}
