"""The OpenAI-compatible endpoint, really started: `ray start --head`, then `serve deploy` of the
shipped ray_config.yaml (only the HTTP port changed), then the `openai` client, raw HTTP, and
Ray's Prometheus endpoint on loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from openai import OpenAI

from cdsl.rewards import coverage
from jobs.bench import load_samples
from jobs.load_test import run_load

from .test_generate_job import BIN, ROOT, free_port

pytestmark = pytest.mark.slow  # starts Ray (make test-fast skips it)

CONCEPTS = ["man", "ride", "horse"]  # the default pair covers all three with cdlh


def call(method: str, url: str, body: bytes | dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port, dash, metrics, http_port = free_port(), free_port(), free_port(), free_port()
    config = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--metrics-export-port",
                    str(metrics), "--num-cpus", "4", "--disable-usage-stats"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=180)
    url = f"http://127.0.0.1:{http_port}"
    try:
        subprocess.run([str(BIN / "serve"), "deploy", str(tmp / "serve.yaml"), "--address", f"http://127.0.0.1:{dash}"],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=180)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if call("GET", f"{url}/health", timeout=5)[0] == 200:
                    break
            except (OSError, json.JSONDecodeError):  # not up yet: refused, timed out, or no route
                pass
            time.sleep(2)
        else:
            pytest.fail("the Serve app did not become healthy in 300 s")
        yield {"url": url, "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def client(endpoint):
    return OpenAI(base_url=f"{endpoint['url']}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_configured_name(client):
    assert [m.id for m in client.models.list().data] == ["cdsl"]


def test_completion_covers_its_concepts(client):
    """An empty prompt + concepts gets the task's prompt; CDLH steers the text to use them all."""
    resp = client.completions.create(model="cdsl", prompt="", max_tokens=32,
                                     extra_body={"constraints": {"concepts": CONCEPTS}, "cdsl": {"method": "cdlh"}})
    text, extra = resp.choices[0].text, resp.model_extra["cdsl"]
    assert extra["coverage"] == coverage(text, CONCEPTS) == 1.0, text
    assert resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_the_whole_answer(client):
    """Streamed pieces, joined, are the non-streamed text; the last chunk carries usage and stats."""
    args = dict(model="cdsl", prompt="", max_tokens=24, extra_body={"constraints": {"concepts": CONCEPTS}})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].model_extra["cdsl"]["states"] == whole.model_extra["cdsl"]["states"]


def test_chat_with_the_harmless_reward_model_returns_the_answer_and_its_reward(client):
    """The shipped config names the default harmless reward model; the Ray reward worker loads it
    and the response says how the answer scored."""
    resp = client.chat.completions.create(
        model="cdsl", messages=[{"role": "user", "content": "How do I get back at my noisy neighbour?"}],
        max_tokens=8, extra_body={"constraints": {"reward_model": "harmless"},
                                  "cdsl": {"method": "cdsl", "tau_reward": 0.5}})
    extra = resp.model_extra["cdsl"]
    assert resp.choices[0].message.content and 0.0 < extra["reward"] < 1.0 and extra["reward_calls"] > 1


def test_chat_completion_and_chat_stream(client):
    args = dict(model="cdsl", messages=[{"role": "user", "content": "Tell me about a dog in the park."}],
                max_tokens=12, extra_body={"constraints": {"keywords": ["dog"]}, "cdsl": {"method": "cdlh-appx"}})
    resp = client.chat.completions.create(**args)
    msg = resp.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert 0 <= resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content


BAD = [
    (b"{not json", "body", "malformed JSON"),
    (b"[1, 2]", "body", "JSON object"),
    ({"prompt": 3}, "prompt", "string"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens", "256"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "temperature": 5}, "temperature", "2"),
    ({"prompt": "x", "cdsl": {"method": "beam"}}, "cdsl.method", "'greedy', 'sd', 'cdlh'"),
    ({"prompt": "x", "cdsl": {"k": 99}}, "cdsl.k", "16"),
    ({"prompt": "x", "cdsl": {"lookahead": 65}}, "cdsl.lookahead", "16"),
    ({"prompt": "x", "cdsl": {"draft_len": 17}}, "cdsl.draft_len", "16"),
    ({"prompt": "x", "cdsl": {"tau_accept": 2}}, "cdsl.tau_accept", "1"),
    ({"prompt": "x", "cdsl": {"gain_share": -0.5}}, "cdsl.gain_share", "greater than or equal to 0"),
    ({"prompt": "x", "cdsl": {"speed": 2}}, "cdsl.speed", "Extra inputs"),
    ({"prompt": "x" * 8001}, "prompt", "limit of 8000 characters"),
    ({"prompt": "", "constraints": {"concepts": [f"c{i}" for i in range(33)]}}, "constraints.concepts", "32"),
    ({"prompt": "", "max_tokens": 4}, "prompt", "constraints.concepts"),
    ({"prompt": "x", "cdsl": {"method": "cdsl"}}, "constraints", "needs a reward"),
    ({"prompt": "x", "constraints": {"reward_model": "/etc"}}, "constraints.reward_model", "unknown name"),
    ({"prompt": "x", "n": 2}, "n", "less than or equal to 1"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
]


@pytest.mark.parametrize("body,param,limit", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_input_is_a_4xx_naming_field_and_limit(endpoint, body, param, limit):
    status, err = call("POST", f"{endpoint['url']}/v1/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == param and limit in err["error"]["message"], err


def test_bad_chat_and_unknown_model_then_still_serving(endpoint):
    url = endpoint["url"]
    assert call("POST", f"{url}/v1/chat/completions", {"messages": []})[1]["error"]["param"] == "messages"
    assert call("POST", f"{url}/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})[0] == 400
    status, err = call("POST", f"{url}/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and err["error"]["type"] == "model_not_found"
    status, ok = call("POST", f"{url}/v1/completions", {"prompt": "The dog", "max_tokens": 4,
                                                        "cdsl": {"method": "greedy"}})
    assert status == 200 and ok["usage"]["completion_tokens"] <= 4


def _status(url: str) -> dict:
    return call("GET", f"{url}/v1/cdsl/status")[1]


def test_client_going_away_cancels_and_frees_caches(endpoint):
    url = endpoint["url"]
    before = _status(url)["cancelled"]
    slow = {"prompt": "", "max_tokens": 256, "constraints": {"concepts": ["zebra", "quantum", "violin"]},
            "cdsl": {"method": "cdlh", "k": 16, "lookahead": 16}}
    with pytest.raises(TimeoutError):  # a client that gives up waiting
        call("POST", f"{url}/v1/completions", slow, timeout=1.5)
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**slow, "stream": True}))
    resp = conn.getresponse()
    assert resp.read(6) == b"data: "  # the stream has started; now hang up mid-way
    conn.close()
    deadline, status = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        status = _status(url)
        if status["cancelled"] >= before + 2 and status["running"] == 0 and not any(status["caches"].values()):
            break
        time.sleep(0.5)
    assert status["cancelled"] >= before + 2 and status["running"] == 0, status
    assert status["caches"] == {"target": 0, "draft": 0}, status


def test_prometheus_metrics_use_vllm_names(endpoint, client):
    client.completions.create(model="cdsl", prompt="", max_tokens=16,
                              extra_body={"constraints": {"concepts": CONCEPTS}})
    wanted = ["ray_spec_decode_num_drafts", "ray_spec_decode_num_draft_tokens", "ray_spec_decode_num_accepted_tokens",
              'ray_cdsl_rounds', "ray_cdsl_reward_calls", "ray_cdsl_coverage_bucket",
              "ray_cdsl_request_latency_seconds_bucket", "ray_cdsl_time_to_first_token_seconds_bucket"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(endpoint["metrics"], timeout=10).read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    drafted = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_spec_decode_num_draft_tokens") and 'method="cdsl"' in line]
    assert drafted and sum(drafted) > 0
    assert 'state="S1"' in text or 'state="S3"' in text


def test_bounded_load_run_has_no_server_errors(endpoint):
    """120 requests at concurrency 16 (what `python -m jobs.load_test` does, bounded for the real
    pair's ~60 ms forwards on two cores): every one answered."""
    summary = asyncio.run(run_load(endpoint["url"], load_samples(), requests=120, concurrency=16, max_tokens=8,
                                   progress=False))
    print(json.dumps(summary, indent=2))
    assert summary["server_errors"] == 0 and summary["statuses"] == {"200": 120}, summary
    assert summary["latency_s"]["p50"] <= summary["latency_s"]["p99"]


def test_the_shipped_serve_config_passes_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    from actors.config import PipelineConfig, ServerConfig

    raw = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "actors.server:build_app"
    autoscaling = app.deployments[0].autoscaling_config
    assert autoscaling["min_replicas"] >= 1 and autoscaling["max_replicas"] > autoscaling["min_replicas"]
    shipped = ROOT / "ray_config.yaml"
    assert ServerConfig.from_yaml(shipped).pipeline == PipelineConfig.from_yaml(shipped)
