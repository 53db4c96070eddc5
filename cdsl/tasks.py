"""Task formats: how a constraint becomes a prompt, and how datasets spell their inputs.

Every entry point (CLI, HTTP, dataset job, benchmarks, distillation) builds its prompts here. A
model whose tokenizer has a chat template gets the task as chat messages through that template;
one without keeps a plain-text prompt that it continues.
"""

from __future__ import annotations

import json
import random
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


def split_dialogue(dialogue: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, answer): an hh-rlhf dialogue as the model would see it being answered, and its
    final Assistant turn as the model would write it. A reward model reads prompt + answer, in
    the same form as prompt + generated text at decoding time."""
    prompt = harmless_prompt(dialogue, tokenizer)
    answer = dialogue[dialogue.rfind("\n\nAssistant:") + len("\n\nAssistant:"):]
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    return prompt, answer.strip() if chat else answer  # a plain prompt ends at "Assistant:", before a space


def read_harmless_jsonl(path: str | Path, tokenizer=None, held_out: bool = False) -> Iterator[dict]:
    """Rows `{"prompt": ..., "chosen": ..., "rejected": ...}` from an hh-rlhf jsonl file, skipping
    the few dialogues that do not end in a Human turn and an Assistant answer; `held_out`: only
    the pairs the default reward model was not fitted on (`held_out_split`)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if held_out:
        rows = [rows[i] for i in held_out_split(len(rows))[1]]
    for row in rows:
        try:
            prompt = harmless_prompt(row["chosen"], tokenizer)
        except ValueError:
            continue
        yield {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


HELD_OUT, SPLIT_SEED = 0.2, 0
"""The default harmless reward model's split of harmless-dev.jsonl (see jobs/train_reward.py)."""


def held_out_split(n: int, share: float = HELD_OUT, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(training, held-out) row indices: a seeded shuffle, the first `share` of it held out."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(n * share)
    return order[cut:], order[:cut]
