"""Load test for the OpenAI-compatible endpoint: N completions at a fixed concurrency, then
status counts, latency percentiles and throughput.

    python -m jobs.load_test --url http://127.0.0.1:8000 --requests 500 --concurrency 16

Each request asks for the CommonGen task prompt of one concept set (the bundled samples, or
`--dataset` in CommonGen jsonl), cycling through them. Exits 1 if any request got a 5xx or no
answer, so it can gate a deployment.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path

import aiohttp
import typer
from tqdm import tqdm

from cdsl.tasks import read_commongen_jsonl
from jobs.bench import load_samples

app = typer.Typer(add_completion=False)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def _one(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> dict:
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as err:
        return {"status": 0, "latency_s": time.perf_counter() - start, "error": repr(err)}
    out = {"status": status, "latency_s": time.perf_counter() - start}
    if status == 200:
        out["tokens"] = data["usage"]["completion_tokens"]
        out["coverage"] = data["cdsl"].get("coverage")
    else:
        out["error"] = data.get("error", {}).get("message") if isinstance(data, dict) else str(data)
    return out


async def run_load(url: str, concept_sets: list[list[str]], requests: int, concurrency: int, max_tokens: int,
                   method: str | None = None, api_key: str | None = None, timeout_s: float = 300.0,
                   progress: bool = True) -> dict:
    """Send `requests` completions, `concurrency` at a time; a summary dict of what came back."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = itertools.cycle(concept_sets)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=requests, desc="requests", disable=not progress)

    async def bounded(session: aiohttp.ClientSession, concepts: list[str]) -> dict:
        body: dict = {"prompt": "", "max_tokens": max_tokens, "constraints": {"concepts": concepts}}
        if method:
            body["cdsl"] = {"method": method}
        async with gate:
            result = await _one(session, url, body, headers)
        bar.update()
        return result

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        results = await asyncio.gather(*(bounded(session, next(bodies)) for _ in range(requests)))
    wall = time.perf_counter() - start
    bar.close()
    return summarise(results, wall, concurrency)


def summarise(results: list[dict], wall_s: float, concurrency: int) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    coverages = [r["coverage"] for r in ok if r.get("coverage") is not None]
    tokens = sum(r.get("tokens", 0) for r in ok)
    return {
        "requests": len(results), "concurrency": concurrency, "statuses": statuses,
        "server_errors": sum(1 for r in results if r["status"] >= 500 or r["status"] == 0),
        "wall_s": wall_s, "requests_per_s": len(results) / wall_s if wall_s else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)} | {"max": max(latencies, default=0.0)},
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        "mean_coverage": statistics.fmean(coverages) if coverages else None,
        "errors": sorted({r["error"] for r in results if r.get("error")})[:5],
    }


@app.command()
def main(
    url: str = typer.Option("http://127.0.0.1:8000", help="Base URL of the endpoint."),
    requests: int = typer.Option(500, min=1, help="Requests to send."),
    concurrency: int = typer.Option(16, min=1, help="Requests in flight at once."),
    max_tokens: int = typer.Option(16, min=1, help="max_tokens of each request."),
    method: str | None = typer.Option(None, help="cdsl.method of each request (default: the server's)."),
    dataset: Path | None = typer.Option(None, help="CommonGen jsonl of concept sets (default: bundled samples)."),
    api_key: str | None = typer.Option(None, envvar="CDSL_API_KEY", help="Bearer token, if the server wants one."),
) -> None:
    """Load-test a running endpoint and print the figures as JSON."""
    if dataset is not None and not dataset.exists():
        raise typer.BadParameter(f"no such file: {dataset}", param_hint="--dataset")
    sets = [r["concepts"] for r in read_commongen_jsonl(dataset)] if dataset else load_samples()
    summary = asyncio.run(run_load(url.rstrip("/"), sets, requests, concurrency, max_tokens, method, api_key))
    typer.echo(json.dumps(summary, indent=2))
    raise typer.Exit(1 if summary["server_errors"] else 0)


if __name__ == "__main__":
    app()
