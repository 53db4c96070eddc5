"""Rewards behind one protocol: R(prompt, text) in [0, 1], batched, text in and scores out.

Every reward sees the generated prefix and the lookahead separately (`RewardInput`), because a
constraint on a whole sentence says little about an unfinished one. `score` is the paper's
R(x, y + l), used to rank CDLH candidates and as the final metric; `progress` is what the CDSL
gate compares with tau_r while the text is still growing. Text, not token ids, crosses this
interface so a reward can live in another process or on another machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

from lemminflect import getAllInflections, getAllInflectionsOOV, getAllLemmas
from pydantic import BaseModel, ConfigDict, Field, field_validator

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
PROGRESS_MODES = ("fraction", "coverable", "pace")


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
    length: int = 0
    """Tokens generated so far, continuation included."""

    @property
    def text(self) -> str:
        return self.prefix + self.continuation


@runtime_checkable
class Reward(Protocol):
    """Optionally a reward also says `monotone = True` when adding text never lowers its score
    (coverage, keywords, a regex search): then the prefix's score bounds what any continuation
    can gain, which lets CDSL skip searches that cannot change the choice."""

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
    """CommonGen coverage: the fraction of concepts the text uses.

    progress modes, for unfinished text:
    - "fraction": the plain fraction (low early in every sentence);
    - "coverable": 1 while the missing concepts still fit in the remaining budget
      (`tokens_per_concept` each), else the fraction; final text gets the fraction;
    - "pace": 1 while the text keeps up a pace of one new concept per `tokens_per_concept`
      tokens generated (and the missing ones still fit), else the fraction.
    """

    monotone = True
    """Added text never un-covers a concept, bar a token that extends the prefix's last word
    ("cat" + "alog"); CDSL's exactness w.r.t. CDLH rests on this and ignores that case."""

    def __init__(self, concepts: Sequence[str], progress_mode: str = "coverable", tokens_per_concept: int = 3):
        if progress_mode not in PROGRESS_MODES:
            raise ValueError(f"progress_mode must be one of {PROGRESS_MODES}, got {progress_mode!r}")
        self.concepts = list(concepts)
        self.mode, self.tokens_per_concept = progress_mode, tokens_per_concept

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        return [coverage(item.text, self.concepts) for item in batch]

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        scores = self.score(batch)
        if self.mode == "fraction":
            return scores
        out = []
        n = len(self.concepts)
        for item, s in zip(batch, scores):
            missing = round((1 - s) * n)
            ok = missing * self.tokens_per_concept <= item.budget
            if self.mode == "pace":
                ok = ok and n - missing >= min(n, item.length // self.tokens_per_concept)
            out.append(s if item.final or not ok else 1.0)
        return out


class Keywords(Coverage):
    """Given keywords present verbatim (whole words or phrases, case-insensitive)."""

    def __init__(self, keywords: Sequence[str], progress_mode: str = "coverable", tokens_per_concept: int = 3):
        super().__init__(keywords, progress_mode, tokens_per_concept)
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

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        # an unfinished text may still come to match, so only a final one can fail
        return [s if item.final else 1.0 for item, s in zip(batch, self.score(batch))]


class Combined:
    """Several rewards at once: weighted mean ("mean") or the weakest of them ("all")."""

    def __init__(self, parts: Sequence[tuple[Reward, float]], how: Literal["mean", "all"] = "mean") -> None:
        if not parts:
            raise ValueError("a combined reward needs at least one part")
        self.parts, self.how = list(parts), how
        self.monotone = all(getattr(r, "monotone", False) for r, _ in self.parts)

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
    reward_model: str | None = None
    """Local folder or hub id of a sequence-classification reward model."""
    reward_model_label: str | None = None
    """Label whose softmax probability is the reward; None: sigmoid of the first logit."""
    progress: Literal["fraction", "coverable", "pace"] = "coverable"
    """How coverage judges unfinished text (see `Coverage`)."""
    combine: Literal["mean", "all"] = "mean"
    """How several constraints combine: weighted mean, or the weakest one."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return pattern

    @property
    def monotone(self) -> bool:
        """Whether the built reward is monotone (every part but a reward model is)."""
        return self.reward_model is None

    def build(self, device: str = "cpu") -> Reward:
        """The reward; a reward model is loaded once per process and `device`, whatever the
        other constraints (see `load_reward_model`)."""
        parts: list[tuple[Reward, float]] = []
        if self.concepts:
            parts.append((Coverage(self.concepts, self.progress), 1.0))
        if self.keywords:
            parts.append((Keywords(self.keywords, self.progress), 1.0))
        if self.regex is not None:
            parts.append((Regex(self.regex), 1.0))
        if self.reward_model is not None:
            parts.append((load_reward_model(self.reward_model, self.reward_model_label, device), 1.0))
        if not parts:
            raise ValueError("constraints: give at least one of concepts, keywords, regex, reward_model")
        return parts[0][0] if len(parts) == 1 else Combined(parts, self.combine)


class RewardModel:
    """Any Hugging Face sequence-classification model scoring prompt + text, mapped to [0, 1].

    `label=None` takes the sigmoid of the first logit (a scalar reward head); a label name takes
    the softmax probability of that label (a classifier such as harmless/harmful). Batched: one
    forward per `batch_size` texts. The model may sit on any device; text crosses the interface.
    """

    monotone = False

    def __init__(self, path: str, label: str | None = None, device: str = "cpu", batch_size: int = 16,
                 max_length: int = 512, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code).to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the text being judged is at the end of prompt + text: never truncate it away
        self.tokenizer.truncation_side = "left"
        max_length = min(max_length, self.tokenizer.model_max_length or max_length)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = None
        if label is not None:
            names = {v: int(k) for k, v in self.model.config.id2label.items()}
            if label not in names:
                raise ValueError(f"label {label!r} not among the model's labels {sorted(names)}")
            self.label_index = names[label]
        self.device, self.batch_size, self.max_length, self.torch = device, batch_size, max_length, torch

    def score(self, batch: Sequence[RewardInput]) -> list[float]:
        torch = self.torch
        out: list[float] = []
        texts = [item.prompt + item.text for item in batch]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if self.label_index is None:
                out.extend(torch.sigmoid(logits[:, 0]).tolist())
            else:
                out.extend(torch.softmax(logits, -1)[:, self.label_index].tolist())
        return out

    def progress(self, batch: Sequence[RewardInput]) -> list[float]:
        return self.score(batch)


@lru_cache(maxsize=8)
def load_reward_model(path: str, label: str | None = None, device: str = "cpu") -> RewardModel:
    """One `RewardModel` per (path, label, device) in this process, shared by every request
    that names it (loading one per request would hold a copy of the weights each)."""
    return RewardModel(path, label, device)


def pairwise_accuracy(score: Callable[[list[str]], list[float]], pairs: Sequence[dict], batch: int = 32) -> float:
    """Share of `{"chosen", "rejected"}` pairs whose chosen text scores above the rejected one."""
    wins = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        s = score([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])
        wins += sum(c > r for c, r in zip(s[: len(chunk)], s[len(chunk):]))
    return wins / len(pairs) if pairs else 0.0
