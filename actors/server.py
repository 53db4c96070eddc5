"""The OpenAI-compatible HTTP endpoint on Ray Serve.

    client -> Serve HTTP proxy -> CDSLServer replica (OpenAIServer) -> Coordinator -> workers

`OpenAIServer` is the HTTP logic with the engine injected as a `Backend`, so it can run over a
fake; `CDSLServer` is the Serve deployment that gives it a real pipeline. Each replica owns one
pipeline (coordinator + workers), so Serve autoscaling adds model capacity. Concurrent requests
of a replica are batched by its coordinator. A client that goes away cancels its request, which
frees its caches on every worker.

    serve run ray_config.yaml      # http://127.0.0.1:8000/v1/completions
"""


import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from actors.config import ServerConfig
from actors.metrics import Metrics
from actors.openai_api import (
    ApiError,
    CdslStats,
    ChatRequest,
    Completion,
    CompletionRequest,
    cdsl_stats,
    chunk,
    completion,
    parse,
    to_request,
)
from cdsl.engine import Cancelled, WorkerLost
from cdsl.methods import Generation
from cdsl.models import Codec
from cdsl.request import Request


class Backend(Protocol):
    """What the server needs of an engine."""

    async def generate(self, request: Request) -> Generation: ...

    def stream(self, request: Request) -> AsyncIterator[str | Generation]:
        """Text pieces, then the `Generation`."""
        ...

    def cancel(self, request_id: str) -> None: ...

    async def status(self) -> dict: ...


class CoordinatorBackend:
    """A `Backend` over a `actors.pipeline.Coordinator` actor."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator

    async def generate(self, request: Request) -> Generation:
        return await self.coordinator.generate.remote(request)

    async def stream(self, request: Request) -> AsyncIterator[str | Generation]:
        async for ref in self.coordinator.stream.remote(request):
            yield await ref

    def cancel(self, request_id: str) -> None:
        self.coordinator.cancel.remote(request_id)  # fire and forget: the caller is going away

    async def status(self) -> dict:
        return await self.coordinator.status.remote()


def _sse(body: Completion | dict | str) -> str:
    if isinstance(body, Completion):
        body = body.model_dump_json()
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class OpenAIServer:
    """/v1/completions, /v1/chat/completions, /v1/models and health over any `Backend`."""

    def __init__(self, config: ServerConfig, backend: Backend, codec: Codec, has_draft: bool,
                 metrics: Metrics | None = None) -> None:
        self.config, self.backend, self.codec, self.has_draft = config, backend, codec, has_draft
        self.metrics = metrics
        self.api_key = config.api_key or os.environ.get("CDSL_API_KEY") or None

    def authorize(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            raise ApiError(401, "authorization: a valid 'Bearer <api key>' header is required", "authorization",
                           "authentication_error")

    def refusal(self, http: HttpRequest) -> Response | None:
        """The 401 response for a request without the key (when auth is on), else None."""
        try:
            self.authorize(http.headers.get("authorization"))
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        return None

    async def models(self, http: HttpRequest) -> Response:
        return self.refusal(http) or JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "cdsl"}]})

    async def status(self, http: HttpRequest) -> Response:
        return self.refusal(http) or JSONResponse(await self.backend.status())

    async def handle(self, http: HttpRequest, chat: bool) -> Response:
        """One completion request, start to end; every refusal is a 4xx JSON error."""
        try:
            self.authorize(http.headers.get("authorization"))
            try:
                data = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ApiError(400, f"body: malformed JSON ({err})", "body") from None
            body = parse(ChatRequest if chat else CompletionRequest, data)
            request = to_request(body, self.config, self.codec, self.has_draft)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        prompt_tokens = len(self.codec.prompt_ids(request.prompt))
        if body.stream:
            return StreamingResponse(self._events(request, chat, prompt_tokens), media_type="text/event-stream")
        start = time.perf_counter()
        try:
            gen = await self.backend.generate(request)
        except BaseException as err:  # CancelledError included: the client went away
            self.backend.cancel(request.id)
            self._outcome(request, err)
            if isinstance(err, Exception):
                return JSONResponse(_failure(err).body(), status_code=_failure(err).status)
            raise
        stats = self._finished(request, gen, time.perf_counter() - start)
        return JSONResponse(completion(request, gen, stats, self.config.model_name, prompt_tokens, chat).model_dump())

    async def _events(self, request: Request, chat: bool, prompt_tokens: int) -> AsyncIterator[str]:
        """Server-sent events: text pieces, a last chunk with usage and CDSL stats, [DONE]."""
        model, start, first, done = self.config.model_name, time.perf_counter(), True, False
        try:
            async for item in self.backend.stream(request):
                if isinstance(item, Generation):
                    done = True
                    stats = self._finished(request, item, time.perf_counter() - start)
                    yield _sse(chunk(request, model, chat, gen=item, stats=stats, prompt_tokens=prompt_tokens,
                                     first=first))
                else:
                    if first and self.metrics:
                        self.metrics.first(request.config.method, time.perf_counter() - start)
                    yield _sse(chunk(request, model, chat, text=item, first=first))
                    first = False
        except Exception as err:  # headers are gone already: report the failure in-band
            done = True
            self._outcome(request, err)
            yield _sse(_failure(err).body())
        finally:
            if not done:  # the client went away mid-stream
                self.backend.cancel(request.id)
                self._outcome(request, Cancelled())
        yield _sse("[DONE]")

    def _finished(self, request: Request, gen: Generation, latency_s: float) -> CdslStats:
        """The response's CDSL figures (coverage computed once, for the client and the metrics)."""
        stats = cdsl_stats(request, gen)
        if self.metrics is not None:
            self.metrics.finished(request.config.method, gen, latency_s, stats.coverage)
        return stats

    def _outcome(self, request: Request, err: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.outcome(request.config.method, "error" if isinstance(err, Exception) and
                                 not isinstance(err, Cancelled) else "cancelled")


def _failure(err: Exception) -> ApiError:
    if isinstance(err, ValueError):
        return ApiError(400, str(err))
    if isinstance(err, MemoryError):
        return ApiError(503, f"out of memory for this request (the others in its batch were answered): {err}",
                        kind="server_error")
    if isinstance(err, WorkerLost):
        return ApiError(503, f"a model worker was lost and the retries ran out: {err}", kind="server_error")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")


app = FastAPI(title="CDSL: constrained decoding with speculative lookaheads")


@serve.deployment(name="CDSLServer", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class CDSLServer:
    """One replica: a pipeline on the cluster and the HTTP logic in front of it."""

    def __init__(self, config: dict) -> None:
        from actors.pipeline import Pipeline  # Ray actors are created at replica start, not import

        cfg = ServerConfig.model_validate(config)
        self.pipeline = Pipeline(cfg.pipeline)
        self.server = OpenAIServer(cfg, CoordinatorBackend(self.pipeline.coordinator), Codec.load(cfg.pipeline.target),
                                   cfg.pipeline.draft is not None, Metrics(cfg.model_name))

    @app.post("/v1/completions")
    async def completions(self, request: HttpRequest) -> Response:
        return await self.server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self.server.handle(request, chat=True)

    @app.get("/v1/models")
    async def models(self, request: HttpRequest) -> Response:
        return await self.server.models(request)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/cdsl/status")
    async def status(self, request: HttpRequest) -> Response:
        """Requests in flight, cancelled, resumed, and the caches each worker holds."""
        return await self.server.status(request)

    async def check_health(self) -> None:
        """Serve restarts the replica when its coordinator stops answering."""
        await self.pipeline.coordinator.ready.remote()


def build_app(args: dict) -> serve.Application:
    """The Serve application of ray_config.yaml (`import_path: actors.server:build_app`); `args`
    is a `ServerConfig`, checked here so a bad config fails at `serve run`, naming the field."""
    return CDSLServer.bind(ServerConfig.model_validate(args or {}).model_dump())
