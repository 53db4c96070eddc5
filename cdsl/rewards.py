"""Rewards behind one protocol: R(prompt, text) in [0, 1], batched, text in and scores out.

Every reward sees the generated prefix and the lookahead separately (`RewardInput`), because a
constraint on a whole sentence says little about an unfinished one. `score` is the paper's
R(x, y + l): it ranks CDLH candidates, gates CDSL rounds and is the final metric. Text, not
token ids, crosses this interface so a reward can live in another process or on another machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

from lemminflect import getAllInflections, getAllInflectionsOOV, getAllLemmas

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class RewardInput:
    prompt: str
    prefix: str
    """Text generated so far."""
    continuation: str = ""
    """Lookahead or draft text being judged."""
    final: bool = False
    """True when the text ends after the continuation (EOS or token budget reached)."""

    @property
    def text(self) -> str:
        return self.prefix + self.continuation


@runtime_checkable
class Reward(Protocol):
    """Optionally a reward also says `monotone = True` when adding text never lowers its score
    (coverage, keywords, a regex search): then the prefix's score bounds what any continuation
    can gain, which lets CDSL skip searches that cannot change the choice; and
    `one_sentence = True` when the task's answer is one sentence (CommonGen), which ends the text
    at its first sentence end under `DecodeConfig.stop` "auto"."""

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        """R(prompt, prefix + continuation) in [0, 1] for each input."""
        ...


@lru_cache(maxsize=65536)
def _forms(concept: str) -> frozenset[str]:
    """The concept and all its inflections (regular ones guessed for words lemminflect lacks)."""
    forms = {concept}
    inflections = getAllInflections(concept)
    if not inflections:
        inflections = {**getAllInflectionsOOV(concept, "NOUN"), **getAllInflectionsOOV(concept, "VERB")}
    for values in inflections.values():
        forms.update(values)
    return frozenset(forms)


@lru_cache(maxsize=65536)
def lemmas(word: str) -> frozenset[str]:
    """The lemmas lemminflect knows for a word, of any part of speech (empty for unknown words)."""
    return frozenset(lemma for values in getAllLemmas(word).values() for lemma in values)


def covered(text: str, concepts: Sequence[str]) -> list[bool]:
    """Which concepts `text` uses, in any inflection, as whole words, ignoring case."""
    words = set(WORD.findall(text.lower()))
    text_lemmas = set().union(*(lemmas(w) for w in words)) if words else set()
    out = []
    for concept in concepts:
        parts = concept.lower().split()
        out.append(all(p in text_lemmas or not words.isdisjoint(_forms(p)) for p in parts))
    return out


def coverage(text: str, concepts: Sequence[str]) -> float:
    """Fraction of `concepts` used in `text`."""
    hits = covered(text, concepts)
    return sum(hits) / len(hits) if hits else 1.0


class Coverage:
    """CommonGen coverage: the fraction of concepts the text uses."""

    one_sentence = True
    """The task's answer is one sentence (see `DecodeConfig.stop`)."""
    monotone = True
    """Added text never un-covers a concept, bar a token that extends the prefix's last word
    ("cat" + "alog"); CDSL's exactness w.r.t. CDLH rests on this and ignores that case."""

    def __init__(self, concepts: Sequence[str]) -> None:
        self.concepts = list(concepts)

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return [coverage(item.text, self.concepts) for item in batch]


class Keywords(Coverage):
    """Given keywords present verbatim (whole words or phrases, case-insensitive)."""

    one_sentence = False
    def __init__(self, keywords: Sequence[str]) -> None:
        super().__init__(keywords)
        # compiled once: score runs on every CDLH candidate
        self.patterns = [re.compile(r"(?<![A-Za-z])" + re.escape(k) + r"(?![A-Za-z])", re.I) for k in self.concepts]

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        pats = self.patterns
        return [sum(bool(p.search(item.text)) for p in pats) / len(pats) for item in batch]


class Regex:
    """1 when the text matches a regular expression (re.search), else 0."""

    monotone = True

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return [float(bool(self.pattern.search(item.text))) for item in batch]


class Combined:
    """Several rewards at once: weighted mean ("mean") or the weakest of them ("all")."""

    def __init__(self, parts: Sequence[tuple[Reward, float]], how: Literal["mean", "all"] = "mean") -> None:
        if not parts:
            raise ValueError("a combined reward needs at least one part")
        self.parts, self.how = list(parts), how
        self.monotone = all(getattr(r, "monotone", False) for r, _ in self.parts)
        self.one_sentence = any(getattr(r, "one_sentence", False) for r, _ in self.parts)

    def _combine(self, columns: list[list[float]]) -> list[float]:
        if self.how == "all":
            return [min(vals) for vals in zip(*columns)]
        total = sum(w for _, w in self.parts)
        return [sum(w * v for (_, w), v in zip(self.parts, vals)) / total for vals in zip(*columns)]

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return self._combine([r.score(batch) for r, _ in self.parts])
