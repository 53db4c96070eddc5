"""The HTTP layer alone (`actors.server.OpenAIServer`) over a small fake engine: auth, failures
inside the engine, and the shapes of what comes back. The real endpoint is tests/test_serve.py."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.testclient import TestClient

from actors.config import ServerConfig
from actors.server import OpenAIServer
from cdsl.engine import WorkerLost
from cdsl.methods import Generation
from cdsl.models import Codec
from cdsl.request import Request
from cdsl.stats import Stats

from .conftest import make_tokenizer


class FakeBackend:
    """Answers every request with the same text, or fails with `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.seen, self.cancelled = error, [], []

    async def generate(self, request: Request) -> Generation:
        self.seen.append(request)
        if self.error:
            raise self.error
        return Generation(" a man rides a horse", [1, 2, 3], "eos", Stats(tokens=3))

    async def stream(self, request: Request):
        self.seen.append(request)
        yield " a man"
        if self.error:
            raise self.error
        yield " rides"
        yield Generation(" a man rides", [1, 2], "length", Stats(tokens=2))

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def status(self) -> dict:
        return {}


@functools.cache
def tiny_codec() -> Codec:
    """The HTTP layer needs only a tokenizer: a tiny one, no model weights."""
    folder = Path(tempfile.mkdtemp(prefix="codec-"))
    make_tokenizer(folder)
    return Codec.load(str(folder))


def client_for(backend: FakeBackend, codec: Codec | None = None, **config) -> TestClient:
    server = OpenAIServer(ServerConfig(**config), backend, codec or tiny_codec(), has_draft=True)
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        return await server.handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        return await server.models(request)

    return TestClient(app)


BODY = {"prompt": "", "max_tokens": 8, "constraints": {"concepts": ["man", "ride", "horse"]}}


def test_bearer_auth_when_a_key_is_set():
    client = client_for(FakeBackend(), api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        resp = client.post("/v1/completions", json=BODY, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["param"] == "authorization"
    ok = client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/v1/models").status_code == 401
    listed = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()
    assert [m["id"] for m in listed["data"]] == ["cdsl"]


def test_the_request_the_engine_gets():
    backend = FakeBackend()
    resp = client_for(backend).post("/v1/completions", json={**BODY, "cdsl": {"method": "cdlh", "k": 3}})
    (req,) = backend.seen
    assert req.prompt == "Concepts: man, ride, horse\nSentence:"
    assert (req.config.method, req.config.k, req.config.max_new_tokens) == ("cdlh", 3, 8)
    assert req.reward.concepts == ["man", "ride", "horse"]
    body = resp.json()
    assert body["choices"][0] == {"index": 0, "finish_reason": "stop", "logprobs": None, "text": " a man rides a horse"}
    assert body["cdsl"]["coverage"] == 1.0 and body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("error,status", [(ValueError("bad thing"), 400), (WorkerLost("gone"), 503),
                                          (MemoryError("no room"), 503), (RuntimeError("boom"), 500)])
def test_engine_failures_become_json_errors(error, status):
    resp = client_for(FakeBackend(error)).post("/v1/completions", json=BODY)
    assert resp.status_code == status and resp.json()["object"] == "error"


def test_what_cannot_run_is_refused_at_the_door():
    """A prompt the model cannot hold and a regex that does not compile are 400s naming the
    field, and never reach the engine (they used to fail inside it, or answer empty text)."""
    backend = FakeBackend()
    client = client_for(backend, Codec(tiny_codec().tokenizer, window=64))
    resp = client.post("/v1/completions", json={**BODY, "prompt": "dog " * 100})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == "prompt"
    assert "+ max_tokens 8 exceed the model's context window of 64 tokens" in error["message"]
    resp = client.post("/v1/completions", json={**BODY, "prompt": "Say hi", "constraints": {"regex": "([a"}})
    assert resp.status_code == 400 and "regex" in resp.json()["error"]["message"]
    assert backend.seen == []
    assert client.post("/v1/completions", json=BODY).status_code == 200


def test_a_stream_that_fails_reports_it_in_band():
    resp = client_for(FakeBackend(RuntimeError("boom"))).post("/v1/completions", json={**BODY, "stream": True})
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == " a man"
    assert "boom" in json.loads(events[1])["error"]["message"]
    assert events[-1] == "[DONE]"


def test_responses_and_chunks_have_openai_shapes():
    """Every body the server writes parses as the `openai` package's own types."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    client = client_for(FakeBackend())
    chat_body = {"messages": [{"role": "user", "content": "Use: man, ride, horse"}], "max_tokens": 8,
                 "constraints": {"concepts": ["man", "ride", "horse"]}}
    chat = ChatCompletion.model_validate(client.post("/v1/chat/completions", json=chat_body).json())
    assert chat.choices[0].message.content == " a man rides a horse" and chat.usage.completion_tokens == 3
    assert chat.model_extra["cdsl"]["coverage"] == 1.0 and "reward" not in chat.model_extra["cdsl"]
    text = Completion.model_validate(client.post("/v1/completions", json=BODY).json())
    assert text.choices[0].text == " a man rides a horse" and text.choices[0].finish_reason == "stop"
    resp = client.post("/v1/chat/completions", json={**chat_body, "stream": True})
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].delta.role is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " a man rides"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[-1].usage.completion_tokens == 2 and chunks[0].usage is None


def test_every_decode_setting_is_accepted_over_http_under_one_set_of_limits():
    """Each `DecodeConfig` field (but the three with OpenAI names) is a `cdsl` option and reaches
    the engine; a value outside DecodeConfig's limit is a 400 naming the field."""
    from cdsl.config import DecodeConfig

    changed = {"method": "sd", "k": 3, "lookahead": 2, "draft_len": 3, "draft_confidence": 0.2, "draft_branches": 3,
               "draft_max_others": None, "branch_below": 0.5, "accept_ratio": 0.5, "gain_share": 0.5,
               "reward_range": 0.5, "tau_accept": 0.4, "tau_reward": 0.9, "reward_weight": 2.0,
               "no_repeat_ngram": 2, "stop": "eos", "policy": {"S2": "verified_prefix"},
               "lookup_len": 4, "lookup_ngram": 2, "lookup_shortest": 1}
    assert set(changed) == set(DecodeConfig.model_fields) - {"max_new_tokens", "temperature", "seed"}
    backend = FakeBackend()
    client = client_for(backend)
    assert client.post("/v1/completions", json={**BODY, "cdsl": changed}).status_code == 200
    (req,) = backend.seen
    got = req.config.model_dump(mode="json")
    assert {k: got[k] for k in changed if k != "policy"} == {k: v for k, v in changed.items() if k != "policy"}
    assert got["policy"]["S2"] == "verified_prefix"
    bad = client.post("/v1/completions", json={**BODY, "cdsl": {"draft_branches": 99}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cdsl.draft_branches"
    assert "8" in bad.json()["error"]["message"]


def test_a_concept_over_the_length_limit_is_a_400_and_the_server_keeps_serving():
    backend = FakeBackend()
    client = client_for(backend)
    bad = client.post("/v1/completions", json={**BODY, "constraints": {"concepts": ["dog", "x" * 5000]}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "constraints.concepts[1]"
    assert "5000 characters is above the limit of 100" in bad.json()["error"]["message"]
    assert client.post("/v1/completions", json=BODY).status_code == 200 and len(backend.seen) == 1
