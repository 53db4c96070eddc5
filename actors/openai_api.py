"""OpenAI request and response shapes, and how a request becomes a `cdsl.engine.Request`.

Constraints and decoding settings travel as two extra fields, `constraints` and `cdsl`; every
other OpenAI field the server does not use is accepted and ignored, as OpenAI-compatible servers
do, but the two CDSL objects are strict so that a misspelt option is an error, not a no-op.
Every refusal is an `ApiError` naming the field (`param`) and the limit.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.config import ServerConfig
from cdsl.config import METHODS, DecodeConfig
from cdsl.engine import Request
from cdsl.generate import check_inputs
from cdsl.methods import Generation
from cdsl.models import Codec
from cdsl.rewards import RewardSpec, coverage
from cdsl.tasks import chat_prompt, commongen_prompt


class ApiError(Exception):
    """A refused request: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"object": "error", "error": {"message": self.message, "type": self.kind, "param": self.param,
                                             "code": self.status}}


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

    def given(self) -> bool:
        return bool(self.concepts or self.keywords or self.regex is not None or self.reward_model)


class CdslOptions(BaseModel):
    """Decoding settings; unset ones take the server's defaults (`pipeline.decode`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    method: str | None = None
    """greedy, sd, cdlh, cdlh-appx or cdsl."""
    k: int | None = None
    lookahead: int | None = None
    draft_len: int | None = None
    tau_accept: float | None = None
    tau_reward: float | None = None
    gain_share: float | None = None
    reward_range: float | None = None
    accept_ratio: float | None = None
    reward_weight: float | None = None


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


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


def parse(kind: type[_Common], data: object) -> _Common:
    """Validate a JSON body, turning the first problem into an `ApiError` naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", "body")
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"]) or "body"
        raise ApiError(400, f"{param}: {first['msg']}", param) from None


def _param(loc: tuple) -> str:
    """A pydantic error location as a field path, without the union-member tags it adds
    (`prompt.str` -> `prompt`)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in {"str", "int", "float", "bool"}
                                                                          or "[" in p)))


def _limit(value: int | None, limit: int, param: str, unit: str = "") -> None:
    if value is not None and value > limit:
        raise ApiError(400, f"{param}: {value}{unit} is above this server's limit of {limit}{unit}", param)


def to_request(body: _Common, config: ServerConfig, codec: Codec, has_draft: bool) -> Request:
    """The engine request for a validated body, after the server's limits and model names."""
    if body.model is not None and body.model != config.model_name:
        raise ApiError(404, f"model: {body.model!r} is not served here (this server serves {config.model_name!r})",
                       "model", "model_not_found")
    if body.stop:
        raise ApiError(400, "stop: stop sequences are not supported; the text ends at EOS or max_tokens", "stop")
    c, opts = body.constraints, body.cdsl
    _limit(len(c.concepts), config.max_concepts, "constraints.concepts", " concepts")
    _limit(len(c.keywords), config.max_concepts, "constraints.keywords", " keywords")
    max_tokens = body.max_completion_tokens or body.max_tokens
    _limit(max_tokens, config.max_tokens, "max_tokens")
    _limit(opts.k, config.max_k, "cdsl.k")
    _limit(opts.lookahead, config.max_lookahead, "cdsl.lookahead")
    _limit(opts.draft_len, config.max_draft_len, "cdsl.draft_len")
    if opts.method is not None and opts.method not in METHODS:
        raise ApiError(400, f"cdsl.method: unknown method {opts.method!r}; use one of {', '.join(METHODS)}",
                       "cdsl.method")

    if isinstance(body, ChatRequest):
        size, prompt = sum(len(m.content) for m in body.messages), chat_prompt(
            [m.model_dump() for m in body.messages], codec.tokenizer)
        param = "messages"
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: give one prompt per request (got a list of {len(prompt)})", "prompt")
            prompt = prompt[0]
        if not prompt.strip():
            if not c.concepts:
                raise ApiError(400, "prompt: must not be empty unless constraints.concepts is given", "prompt")
            prompt = commongen_prompt(c.concepts, codec.tokenizer)  # the task's own prompt
        size, param = len(prompt), "prompt"
    _limit(size, config.max_prompt_chars, param, " characters")

    updates = {k: v for k, v in opts.model_dump().items() if v is not None}
    if max_tokens is not None:
        updates["max_new_tokens"] = max_tokens
    for name in ("temperature", "seed"):
        if getattr(body, name) is not None:
            updates[name] = getattr(body, name)
    try:
        decode = DecodeConfig.model_validate({**config.pipeline.decode.model_dump(), **updates})
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "cdsl"
        param = {"max_new_tokens": "max_tokens", "temperature": "temperature", "seed": "seed"}.get(name, f"cdsl.{name}")
        raise ApiError(400, f"{param}: {first['msg']}", param) from None
    reward = _reward(c, config) if c.given() else None
    try:
        check_inputs(decode, has_draft, reward is not None)
    except ValueError as err:
        raise ApiError(400, f"constraints: {err}", "constraints") from None
    return Request(prompt, decode, reward, id=f"cmpl-{uuid.uuid4().hex}")


def _reward(c: Constraints, config: ServerConfig) -> RewardSpec:
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
        first = err.errors()[0]
        param = "constraints." + _param(first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}", param) from None


def usage(prompt_tokens: int, gen: Generation) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen.stats.tokens,
            "total_tokens": prompt_tokens + gen.stats.tokens}


def cdsl_stats(request: Request, gen: Generation) -> dict:
    """CDSL's own figures for one response."""
    s = gen.stats
    out = {"method": request.config.method, "target_calls": s.target_calls, "draft_calls": s.draft_calls,
           "reward_calls": s.reward_calls, "drafted_tokens": s.drafted, "accepted_tokens": s.accepted,
           "acceptance": s.acceptance, "rounds": s.rounds, "states": s.states, "time_s": s.time_total}
    if request.reward is not None and request.reward.concepts:
        out["coverage"] = coverage(gen.text, request.reward.concepts)
    if gen.reward is not None:
        out["reward"] = gen.reward
    return out


def completion(request: Request, gen: Generation, model: str, prompt_tokens: int, chat: bool) -> dict:
    """The full (non-streamed) response body."""
    choice: dict = {"index": 0, "finish_reason": _finish(gen), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": gen.text}
    else:
        choice["text"] = gen.text
    return {"id": request.id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, gen), "cdsl": cdsl_stats(request, gen)}


def chunk(request: Request, model: str, chat: bool, text: str | None = None, gen: Generation | None = None,
          prompt_tokens: int = 0, first: bool = False) -> dict:
    """One server-sent event of a streamed response; the last one carries finish_reason, usage, cdsl."""
    choice: dict = {"index": 0, "finish_reason": _finish(gen) if gen else None, "logprobs": None}
    if chat:
        delta = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": request.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if gen is not None:
        body.update(usage=usage(prompt_tokens, gen), cdsl=cdsl_stats(request, gen))
    return body


def _finish(gen: Generation) -> str:
    return "stop" if gen.finish_reason == "eos" else "length"
