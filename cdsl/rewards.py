"""Rewards behind one protocol: R(prompt, text) in [0, 1], batched, text in and scores out.

Every reward sees the generated prefix and the lookahead separately (`RewardInput`), because a
constraint on a whole sentence says little about an unfinished one. `score` is the paper's
R(x, y + l), used to rank CDLH candidates and as the final metric; `progress` is what the CDSL
gate compares with tau_r while the text is still growing. Text, not token ids, crosses this
interface so a reward can live in another process or on another machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

from lemminflect import getAllInflections, getAllInflectionsOOV, getAllLemmas
from pydantic import BaseModel, ConfigDict, Field

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
    budget: int = 0
    """Tokens still allowed after the continuation."""

    @property
    def text(self) -> str:
        return self.prefix + self.continuation


@runtime_checkable
class Reward(Protocol):
    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        """R(prompt, prefix + continuation) in [0, 1] for each input."""
        ...

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        """Score of an unfinished text, in [0, 1]; equals `score` when the input is final."""
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
def _lemmas(word: str) -> frozenset[str]:
    return frozenset(lemma for values in getAllLemmas(word).values() for lemma in values)


def covered(text: str, concepts: Sequence[str]) -> list[bool]:
    """Which concepts `text` uses, in any inflection, as whole words, ignoring case."""
    words = set(WORD.findall(text.lower()))
    lemmas = set().union(*(_lemmas(w) for w in words)) if words else set()
    out = []
    for concept in concepts:
        parts = concept.lower().split()
        out.append(all(p in lemmas or not words.isdisjoint(_forms(p)) for p in parts))
    return out


def coverage(text: str, concepts: Sequence[str]) -> float:
    """Fraction of `concepts` used in `text`."""
    hits = covered(text, concepts)
    return sum(hits) / len(hits) if hits else 1.0


class Coverage:
    """CommonGen coverage: the fraction of concepts the text uses.

    progress modes, for unfinished text:
    - "fraction": the plain fraction (low early in every sentence);
    - "coverable": 1 while the missing concepts still fit in the remaining budget
      (`tokens_per_concept` each), else the fraction; final text gets the fraction.
    """

    def __init__(self, concepts: Sequence[str], progress_mode: str = "coverable", tokens_per_concept: int = 3):
        if progress_mode not in ("fraction", "coverable"):
            raise ValueError(f"progress_mode must be 'fraction' or 'coverable', got {progress_mode!r}")
        self.concepts = list(concepts)
        self.mode, self.tokens_per_concept = progress_mode, tokens_per_concept

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return [coverage(item.text, self.concepts) for item in batch]

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        scores = self.score(batch)
        if self.mode == "fraction":
            return scores
        out = []
        for item, s in zip(batch, scores):
            missing = round((1 - s) * len(self.concepts))
            fits = missing * self.tokens_per_concept <= item.budget
            out.append(s if item.final or not fits else 1.0)
        return out


class Keywords(Coverage):
    """Given keywords present verbatim (whole words or phrases, case-insensitive)."""

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        pats = [re.compile(r"(?<![A-Za-z])" + re.escape(k) + r"(?![A-Za-z])", re.I) for k in self.concepts]
        return [sum(bool(p.search(item.text)) for p in pats) / len(pats) for item in batch]


class Regex:
    """1 when the text matches a regular expression (re.search), else 0."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return [float(bool(self.pattern.search(item.text))) for item in batch]

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        # an unfinished text may still come to match, so only a final one can fail
        return [s if item.final else 1.0 for item, s in zip(batch, self.score(batch))]


class Combined:
    """Several rewards at once: weighted mean ("mean") or the weakest of them ("all")."""

    def __init__(self, parts: Sequence[tuple[Reward, float]], how: Literal["mean", "all"] = "mean") -> None:
        if not parts:
            raise ValueError("a combined reward needs at least one part")
        self.parts, self.how = list(parts), how

    def _combine(self, columns: list[list[float]]) -> list[float]:
        if self.how == "all":
            return [min(vals) for vals in zip(*columns)]
        total = sum(w for _, w in self.parts)
        return [sum(w * v for (_, w), v in zip(self.parts, vals)) / total for vals in zip(*columns)]

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return self._combine([r.score(batch) for r, _ in self.parts])

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        return self._combine([r.progress(batch) for r, _ in self.parts])


class RewardSpec(BaseModel):
    """The constraints of one request; every given field adds a reward."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    concepts: list[str] = Field(default_factory=list, max_length=64)
    """CommonGen concepts, matched in any inflection."""
    keywords: list[str] = Field(default_factory=list, max_length=64)
    """Words or phrases that must appear verbatim."""
    regex: str | None = Field(None, max_length=1000)
    """A pattern the text must match (re.search)."""
    progress: Literal["fraction", "coverable"] = "coverable"
    """How coverage judges unfinished text (see `Coverage`)."""
    combine: Literal["mean", "all"] = "mean"
    """How several constraints combine: weighted mean, or the weakest one."""

    def build(self) -> Reward:
        parts: list[tuple[Reward, float]] = []
        if self.concepts:
            parts.append((Coverage(self.concepts, self.progress), 1.0))
        if self.keywords:
            parts.append((Keywords(self.keywords, self.progress), 1.0))
        if self.regex is not None:
            parts.append((Regex(self.regex), 1.0))
        if not parts:
            raise ValueError("constraints: give at least one of concepts, keywords, regex")
        return parts[0][0] if len(parts) == 1 else Combined(parts, self.combine)
