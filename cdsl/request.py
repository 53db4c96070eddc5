"""One request, however it arrives: the command line, the HTTP server and the dataset job each
build a `RequestInput` and call `build`, so they share one prompt rule, one set of `Limits` and
one error format (`RequestError`: "<field>: <problem>"). `build` gives the engine's `Request`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cdsl.config import DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.errors import RequestError
from cdsl.methods import check_inputs
from cdsl.models import Codec
from cdsl.tasks import chat_prompt, commongen_prompt, harmless_prompt


@dataclass
class Request:
    """One generation asked of the engine: the rendered prompt, checked."""

    prompt: str
    config: DecodeConfig = field(default_factory=DecodeConfig)
    reward: RewardSpec | None = None
    """The constraints; needed by cdlh, cdlh-appx and cdsl."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Limits(BaseModel):
    """What one request may ask for, wherever it comes from (`cdsl.limits` in ray_config.yaml
    for the server and the dataset job; these defaults on the command line)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_tokens: int = Field(1024, ge=1, le=4096)
    """Largest `max_new_tokens` (`max_tokens` over HTTP)."""
    max_prompt_chars: int = Field(8000, ge=1)
    """Longest prompt, dialogue or chat messages together, in characters."""
    max_concepts: int = Field(32, ge=1, le=64)
    """Most concepts (and, separately, keywords) per request."""
    max_concept_chars: int = Field(100, ge=1, le=1000)
    """Longest single concept or keyword, in characters."""
    max_k: int = Field(16, ge=1, le=64)
    """Largest `k` (CDLH candidates per step)."""
    max_lookahead: int = Field(16, ge=1, le=64)
    """Largest `lookahead`."""
    max_draft_len: int = Field(16, ge=1, le=64)
    """Largest `draft_len`."""

    def check_decode(self, values: Mapping[str, Any]) -> None:
        """RequestError naming the first decoding setting over its limit. Takes raw values too, so
        a front end can say "above the limit of 16" before `DecodeConfig`'s own wider bounds."""
        for name, limit in (("max_new_tokens", self.max_tokens), ("k", self.max_k),
                            ("lookahead", self.max_lookahead), ("draft_len", self.max_draft_len)):
            value = values.get(name)
            if isinstance(value, int) and value > limit:
                raise RequestError(f"decode.{name}", f"{value} is above the limit of {limit}")


class ChatTurn(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


def validation_error(err: ValidationError, prefix: str = "") -> RequestError:
    """The first problem pydantic found, as a `RequestError` whose field is its location
    (union-member tags such as `prompt.str` dropped) under `prefix`."""
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in {"str", "int", "float", "bool"}
                                                                         or "[" in p))]
    where = ".".join(parts)
    return RequestError(f"{prefix}{where}" if where else prefix.rstrip(".") or "request",
                        first["msg"].removeprefix("Value error, "))


class RequestInput(BaseModel):
    """What a user asks, before the prompt is rendered and the limits applied. Give at most one
    of `prompt`, `messages` and `dialogue`; with none (or an empty prompt) the prompt is the
    CommonGen prompt of `constraints.concepts`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    prompt: str | None = None
    """Text the model continues as it is."""
    messages: list[ChatTurn] | None = Field(None, min_length=1)
    """Chat turns, rendered with the target's chat template."""
    dialogue: str | None = None
    """An hh-rlhf dialogue ending in "Assistant:" (the harmless task), sent as chat turns."""
    constraints: RewardSpec = Field(default_factory=RewardSpec)
    """What the text must satisfy; empty: no reward (greedy and sd only)."""
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    """How to decode."""
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    """Names the request's caches and its place in logs."""

    @model_validator(mode="after")
    def _one_source(self) -> RequestInput:
        given = [name for name in ("prompt", "messages", "dialogue") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of prompt, messages, dialogue (got {' and '.join(given)})")
        return self

    def check_limits(self, limits: Limits) -> None:
        """RequestError naming the first field over its limit."""
        c = self.constraints
        source, size = self._source_size()
        limits.check_decode(self.decode.model_dump())
        for name, value, limit, unit in (
                ("constraints.concepts", len(c.concepts), limits.max_concepts, " concepts"),
                ("constraints.keywords", len(c.keywords), limits.max_concepts, " keywords"),
                (source, size, limits.max_prompt_chars, " characters")):
            if value > limit:
                raise RequestError(name, f"{value}{unit} is above the limit of {limit}{unit}")
        for name, items in (("constraints.concepts", c.concepts), ("constraints.keywords", c.keywords)):
            for i, item in enumerate(items):
                if len(item) > limits.max_concept_chars:
                    raise RequestError(f"{name}[{i}]", f"{len(item)} characters is above the limit of "
                                                       f"{limits.max_concept_chars} characters")

    def _source_size(self) -> tuple[str, int]:
        if self.messages is not None:
            return "messages", sum(len(m.content) for m in self.messages)
        if self.dialogue is not None:
            return "dialogue", len(self.dialogue)
        return "prompt", len(self.prompt or "")

    def render(self, tokenizer=None) -> str:
        """The prompt text: the one rule every front end follows."""
        if self.messages is not None:
            return chat_prompt([m.model_dump() for m in self.messages], tokenizer)
        if self.dialogue is not None:
            try:
                return harmless_prompt(self.dialogue, tokenizer)
            except ValueError as err:
                raise RequestError("dialogue", str(err).removeprefix("dialogue: ")) from None
        if self.prompt and self.prompt.strip():
            return self.prompt
        if not self.constraints.concepts:
            raise RequestError("prompt", "must not be empty unless constraints.concepts is given")
        return commongen_prompt(self.constraints.concepts, tokenizer)

    def build(self, codec: Codec, limits: Limits, has_draft: bool, budget_field: str = "max_new_tokens") -> Request:
        """The engine's request, or a RequestError: over a limit, no prompt, a method without
        the draft or constraint it needs, or a prompt + output the model's window cannot hold."""
        self.check_limits(limits)
        prompt = self.render(codec.tokenizer)
        try:
            check_inputs(self.decode.method, has_draft, self.constraints.given)
        except RequestError as err:
            raise RequestError("decode.method" if err.field == "method" else err.field, err.problem) from None
        try:
            codec.check_fits(len(codec.prompt_ids(prompt)), self.decode.max_new_tokens, budget_field)
        except ValueError as err:
            raise RequestError(self._source_size()[0], str(err).removeprefix("prompt: ")) from None
        return Request(prompt, self.decode, self.constraints if self.constraints.given else None, self.id)
