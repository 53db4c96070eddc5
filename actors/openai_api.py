"""OpenAI request, response and stream-chunk shapes, and how a request becomes a `RequestInput`.

Constraints and decoding settings travel as two extra fields, `constraints` and `cdsl`; every
other OpenAI field the server does not use is accepted and ignored, as OpenAI-compatible servers
do, but the two CDSL objects are strict so that a misspelt option is an error, not a no-op.
Every refusal is an `ApiError` naming the field (`param`) and the limit; the checks themselves
are `cdsl.request`'s, shared with the command line and dataset jobs.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from actors.config import ServerConfig
from cdsl.config import DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.errors import RequestError
from cdsl.methods import Generation
from cdsl.models import Codec
from cdsl.request import ChatTurn, Request, RequestInput, validation_error
from cdsl.rewards import coverage


class ApiError(Exception):
    """A refused request: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"object": "error", "error": {"message": self.message, "type": self.kind, "param": self.param,
                                             "code": self.status}}


HTTP_NAMES = {"decode.max_new_tokens": "max_tokens", "decode.temperature": "temperature", "decode.seed": "seed"}
"""`RequestInput` fields under their OpenAI names; other `decode.X` fields are `cdsl.X`."""


def refusal(err: RequestError) -> ApiError:
    """A `RequestError` as a 400 whose param is the field's HTTP name."""
    param = HTTP_NAMES.get(err.field) or (f"cdsl.{err.field[7:]}" if err.field.startswith("decode.") else err.field)
    return ApiError(400, f"{param}: {err.problem}", param)


# ---- requests ----

class Constraints(BaseModel):
    """What the text must satisfy; every given field adds a reward."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    concepts: list[str] = Field(default_factory=list)
    """Concepts to use, in any inflection (CommonGen coverage)."""
    keywords: list[str] = Field(default_factory=list)
    """Words or phrases that must appear verbatim."""
    regex: str | None = Field(None, max_length=1000)
    """A pattern the text must match."""
    reward_model: str | None = None
    """A reward model by the name the server config gives it (`reward_models`)."""
    combine: Literal["mean", "all"] = "mean"
    """How several constraints combine: mean, or the weakest one."""


OPENAI_NAMED = {field[len("decode."):] for field in HTTP_NAMES}
"""`DecodeConfig` fields set through their OpenAI names (max_tokens, temperature, seed)."""
CdslOptions = create_model(
    "CdslOptions",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Decoding settings: every `DecodeConfig` field but those with OpenAI names; unset ones take the "
            "server's defaults (`pipeline.decode`). Their limits are DecodeConfig's, checked once in `to_input`.",
    **{name: (f.annotation | None, Field(None, description=f.description))
       for name, f in DecodeConfig.model_fields.items() if name not in OPENAI_NAMED},
)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    constraints: Constraints = Field(default_factory=Constraints)
    cdsl: CdslOptions = Field(default_factory=CdslOptions)


class CompletionRequest(_Common):
    prompt: str | list[str] = ""


class ChatRequest(_Common):
    messages: list[ChatTurn] = Field(min_length=1)


def parse(kind: type[_Common], data: object) -> _Common:
    """Validate a JSON body, turning the first problem into an `ApiError` naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", "body")
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        raise refusal(validation_error(err, "")) from None


def to_input(body: _Common, config: ServerConfig) -> RequestInput:
    """The `RequestInput` of a validated body: the server's model name and reward model names,
    its decoding defaults under the request's own settings."""
    if body.model is not None and body.model != config.model_name:
        raise ApiError(404, f"model: {body.model!r} is not served here (this server serves {config.model_name!r})",
                       "model", "model_not_found")
    if body.stop:
        raise ApiError(400, "stop: stop sequences are not supported; the text ends at EOS, max_tokens or "
                            "cdsl.stop", "stop")
    updates = body.cdsl.model_dump(exclude_unset=True)  # a null sent is kept: draft_max_others=null
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        updates["max_new_tokens"] = max_tokens
    for name in ("temperature", "seed"):
        if getattr(body, name) is not None:
            updates[name] = getattr(body, name)
    try:
        config.pipeline.limits.check_decode(updates)  # the server's limit, before DecodeConfig's wider bounds
        decode = DecodeConfig.model_validate({**config.pipeline.decode.model_dump(), **updates})
    except RequestError as err:
        raise refusal(err) from None
    except ValidationError as err:
        raise refusal(validation_error(err, "decode.")) from None
    source: dict = {}
    if isinstance(body, ChatRequest):
        source["messages"] = body.messages
    elif isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, f"prompt: give one prompt per request (got a list of {len(body.prompt)})", "prompt")
        source["prompt"] = body.prompt[0]
    else:
        source["prompt"] = body.prompt
    return RequestInput(**source, constraints=_constraints(body.constraints, config), decode=decode,
                        id=f"cmpl-{uuid.uuid4().hex}")


def to_request(body: _Common, config: ServerConfig, codec: Codec, has_draft: bool) -> Request:
    """The engine's request for a validated body, after the server's limits."""
    try:
        return to_input(body, config).build(codec, config.pipeline.limits, has_draft, budget_field="max_tokens")
    except RequestError as err:
        raise refusal(err) from None


def _constraints(c: Constraints, config: ServerConfig) -> RewardSpec:
    model = None
    if c.reward_model is not None:
        if c.reward_model not in config.reward_models:
            known = ", ".join(sorted(config.reward_models)) or "none configured"
            raise ApiError(400, f"constraints.reward_model: unknown name {c.reward_model!r} (known: {known})",
                           "constraints.reward_model")
        model = config.reward_models[c.reward_model]
    try:
        return RewardSpec(concepts=c.concepts, keywords=c.keywords, regex=c.regex, reward_model=model,
                          combine=c.combine)
    except ValidationError as err:
        raise refusal(validation_error(err, "constraints.")) from None


# ---- responses ----

def _unset(value: object) -> bool:
    return value is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CdslStats(BaseModel):
    """CDSL's own figures for one response (the `cdsl` field)."""

    method: str
    target_calls: int
    draft_calls: int
    reward_calls: int
    drafted_tokens: int
    accepted_tokens: int
    acceptance: float
    rounds: int
    states: dict[str, int]
    time_s: float
    coverage: float | None = Field(None, exclude_if=_unset)
    """Share of the request's concepts the text uses (only when it gave concepts)."""
    reward: float | None = Field(None, exclude_if=_unset)
    """The final text's reward under the request's constraints (only when it gave any)."""


class Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_unset)
    content: str | None = Field(None, exclude_if=_unset)


class Choice(BaseModel):
    """A completion choice; `text` for /v1/completions, `message` (or `delta` when streamed) for chat."""

    index: int = 0
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    text: str | None = Field(None, exclude_if=_unset)
    message: Message | None = Field(None, exclude_if=_unset)
    delta: Delta | None = Field(None, exclude_if=_unset)


class Completion(BaseModel):
    """A response body, or one server-sent event of a streamed one (`usage` and `cdsl` only on
    the last)."""

    id: str
    object: Literal["text_completion", "chat.completion", "chat.completion.chunk"]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage | None = Field(None, exclude_if=_unset)
    cdsl: CdslStats | None = Field(None, exclude_if=_unset)


def cdsl_stats(request: Request, gen: Generation) -> CdslStats:
    """CDSL's figures for one response; coverage is computed here, once per request."""
    s = gen.stats
    concepts = request.reward.concepts if request.reward is not None else []
    return CdslStats(method=request.config.method, target_calls=s.target_calls, draft_calls=s.draft_calls,
                     reward_calls=s.reward_calls, drafted_tokens=s.drafted, accepted_tokens=s.accepted,
                     acceptance=s.acceptance, rounds=s.rounds, states=s.states, time_s=s.time_total,
                     coverage=coverage(gen.text, concepts) if concepts else None, reward=gen.reward)


def _usage(prompt_tokens: int, gen: Generation) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=gen.stats.tokens,
                 total_tokens=prompt_tokens + gen.stats.tokens)


def _finish(gen: Generation) -> Literal["stop", "length"]:
    return "length" if gen.finish_reason == "length" else "stop"  # eos, or the end of the first sentence


def completion(request: Request, gen: Generation, stats: CdslStats, model: str, prompt_tokens: int,
               chat: bool) -> Completion:
    """The full (non-streamed) response."""
    choice = Choice(finish_reason=_finish(gen), **({"message": Message(content=gen.text)} if chat else
                                                    {"text": gen.text}))
    return Completion(id=request.id, object="chat.completion" if chat else "text_completion", model=model,
                      choices=[choice], usage=_usage(prompt_tokens, gen), cdsl=stats)


def chunk(request: Request, model: str, chat: bool, text: str | None = None, gen: Generation | None = None,
          stats: CdslStats | None = None, prompt_tokens: int = 0, first: bool = False) -> Completion:
    """One server-sent event of a streamed response; the last one (with `gen`) carries
    finish_reason, usage and `stats`."""
    finish = _finish(gen) if gen is not None else None
    if chat:
        choice = Choice(finish_reason=finish, delta=Delta(role="assistant" if first else None, content=text or None))
    else:
        choice = Choice(finish_reason=finish, text=text or "")
    return Completion(id=request.id, object="chat.completion.chunk" if chat else "text_completion", model=model,
                      choices=[choice], usage=_usage(prompt_tokens, gen) if gen is not None else None, cdsl=stats)
