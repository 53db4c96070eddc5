"""jobs.generate: bad rows recorded and skipped, fail-fast errors, and a real `ray start --head` +
`ray job submit` run that is stopped midway and resumed to the same dataset."""

import functools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cdsl.errors import RequestError
from cdsl.models import Codec
from cdsl.request import Limits
from jobs.generate import BATCH_SIZE, shard_size
from jobs.rows import read_rows, row_input

from .conftest import make_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def write_config(path: Path, model_dirs, **decode) -> Path:
    cfg = {"cdsl": {"target": {"path": str(model_dirs["llama-target"]), "dtype": "float64"},
                    "draft": {"path": str(model_dirs["llama-draft"]), "dtype": "float64"},
                    "decode": {"method": "greedy", "max_new_tokens": 10, **decode}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@functools.cache
def codec() -> Codec:
    folder = Path(tempfile.mkdtemp(prefix="codec-"))
    make_tokenizer(folder)
    return Codec.load(str(folder))


def check_row(row: dict):
    """A row's request as the dataset job builds it (the shared rules of `cdsl.request`)."""
    return row_input(row).build(codec(), Limits(), has_draft=True)


def test_rows_checked_with_field_and_limit(tmp_path):
    src = tmp_path / "in.jsonl"
    items = [{"concepts": ["dog", "cat"]}, {"concepts": []}, None, {"concepts": "dog_N#run_V"},
             {"concepts": ["a"], "prompt": "x" * 9000}, {"concepts": ["w"] * 40}, {"concepts": ["w"] * 65},
             {"concepts": ["a"], "prompt": 7}, {"concepts": None}, {"concepts": ["x" * 5000]}]
    src.write_text("\n".join("{oops" if i is None else json.dumps(i) for i in items))
    rows, schema = read_rows(src)
    assert [r["row"] for r in rows] == list(range(10))
    assert check_row(rows[0]).reward.concepts == ["dog", "cat"]
    assert check_row(rows[3]).reward.concepts == ["dog", "run"]
    for row, message in [(rows[1], "concepts: at least one"), (rows[2], "row: line 3: invalid JSON"),
                         (rows[4], "prompt: 9000 characters is above the limit of 8000 characters"),
                         (rows[5], "constraints.concepts: 40 concepts is above the limit of 32 concepts"),
                         (rows[6], "concepts: List should have at most 64 items"),
                         (rows[7], "prompt: must be a string, got int"), (rows[8], "concepts: missing"),
                         (rows[9], r"constraints.concepts\[0\]: 5000 characters is above the limit of 100 characters")]:
        with pytest.raises(RequestError, match=message):
            check_row(row)


def run_job(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", "jobs.generate", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.slow
def test_fails_fast_on_missing_input_or_config(tmp_path):
    res = run_job("--input", tmp_path / "nope.jsonl", "--output", tmp_path / "out")
    assert res.returncode == 2 and "input file not found" in res.stderr
    (tmp_path / "in.jsonl").write_text('{"concepts": ["dog"]}\n')
    (tmp_path / "bad.yaml").write_text("cdsl:\n  decode:\n    k: 0\n")
    res = run_job("--input", tmp_path / "in.jsonl", "--output", tmp_path / "out", "--config", tmp_path / "bad.yaml")
    assert res.returncode == 2 and "decode.k" in res.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(folder: Path) -> list[dict]:
    keep = ("row", "id", "error", "text", "tokens", "coverage", "replica")
    return sorted(({k: r[k] for k in keep} for r in pq.read_table(folder).to_pylist()), key=lambda r: r["row"])


@pytest.mark.slow
def test_ray_job_submit_stopped_midway_resumes_to_the_same_dataset(tmp_path, model_dirs):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "concepts": c}) for i, c in
             enumerate([["dog", "frisbee"], ["child", "river"], ["cook", "dinner"], ["cat", "sleep"]] * 24)]
    lines[5] = json.dumps({"id": "r5", "concepts": []})  # a bad row: recorded, skipped
    src.write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, method="cdlh", max_new_tokens=24, k=6, lookahead=6)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port, dash = free_port(), free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "4", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    job = [str(BIN / "python"), "-m", "jobs.generate", "--input", str(src), "--output", str(out), "--config", str(cfg),
           "--batch-size", "4", "--replicas", "2", "--shards-per-replica", "1"]
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
              "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "runs", "*.png"]})]
    try:
        first = subprocess.run([*submit, "--no-wait", "--", *job], env=env, capture_output=True, text=True,
                               timeout=300, check=True)
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", first.stdout).group()  # the CLI may colour it
        deadline = time.monotonic() + 300
        while not list((out / "cdlh").glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.5)
        first_seen = len(list((out / "cdlh").glob("part-*.parquet")))
        stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job_id], env=env,
                              capture_output=True, text=True, timeout=120)
        at_stop = len(list((out / "cdlh").glob("part-*.parquet")))
        before, stable = None, time.monotonic()
        while time.monotonic() - stable < 3:  # the stopped job's replicas are gone once nothing new appears
            now = {p: p.stat().st_mtime_ns for p in (out / "cdlh").glob("part-*.parquet")}
            if now != before:
                before, stable = now, time.monotonic()
            time.sleep(0.5)
        written = len(before)
        assert 1 <= written < 24, (first_seen, at_stop, written, stop.stdout, stop.stderr)  # stopped midway
        second = subprocess.run([*submit, "--", *job], env=env, capture_output=True, text=True, timeout=600)
        logs = second.stdout + second.stderr
        assert second.returncode != 0, logs  # exit code says a row failed
        assert "| cdlh | 96 | 1 |" in logs, logs
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    got = rows_of(out / "cdlh")
    assert [r["row"] for r in got] == list(range(96))  # every row exactly once
    assert got[5]["error"] and got[5]["text"] is None
    assert len({r["replica"] for r in got}) >= 2  # answered by both replicas (of either run)
    summary = json.loads((out / "summary.json").read_text())["methods"]["cdlh"]
    assert summary["errors"] == 1
    resumed = sum(r["rows"] for r in summary["replicas_this_run"].values())
    assert resumed == 96 - 4 * written  # the second run computed only the shards the first did not write
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # and rewrote none
    # the resumed dataset equals a clean run's
    clean = run_job("--input", src, "--output", tmp_path / "clean", "--config", cfg, "--batch-size", "4",
                    env={**os.environ, "RAY_ADDRESS": ""})
    assert clean.returncode == 1, clean.stderr
    drop = lambda rows: [{k: v for k, v in r.items() if k != "replica"} for r in rows]  # noqa: E731
    assert drop(rows_of(tmp_path / "clean" / "cdlh")) == drop(got)


def test_parquet_input_columns_kept_in_output(tmp_path):
    import pyarrow as pa

    from cdsl.methods import Generation
    from cdsl.rewards import coverage
    from jobs.rows import output_row, to_table

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "concepts": [["dog", "cat"], []], "source": ["x", "y"]}), src)
    rows, schema = read_rows(src)
    request = check_row(rows[0])
    spec = request.reward
    assert request.prompt.startswith("Concepts: dog, cat")
    with pytest.raises(ValueError, match="concepts"):
        check_row(rows[1])
    text = " a dog and a cat"
    done = Generation(text, [1], "eos", reward=coverage(text, spec.concepts))
    out = [output_row(rows[0], schema, "cdsl", done, None),
           output_row(rows[1], schema, "cdsl", None, "concepts: empty")]
    table = to_table(out, schema)
    assert table.column_names[:4] == ["row", "id", "concepts", "source"]
    got = table.to_pylist()
    assert got[0]["source"] == "x" and got[0]["coverage"] == 1.0 and got[1]["error"] == "concepts: empty"


def test_shards_read_back_the_whole_input_in_order(tmp_path):
    import pyarrow as pa

    from jobs.rows import plan_input, read_shard

    src = tmp_path / "in.jsonl"
    items = [json.dumps({"concepts": ["dog", f"w{i}"], "n": i}) for i in range(11)]
    items[4] = "{oops"
    src.write_text("\n\n".join(items) + "\n")  # blank lines between rows are not rows
    whole, _ = read_rows(src)
    plan = plan_input(src, shard_size=3)
    assert plan.rows == 11 and [(s["start"], s["stop"]) for s in plan.shards] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert [r for s in plan.shards for r in read_shard(src, s)] == whole
    assert whole[4]["_error"] == "line 9: invalid JSON (Expecting property name enclosed in double quotes)"
    assert plan_input(src, shard_size=3, limit=5).rows == 5

    pq_src = tmp_path / "in.parquet"
    table = pa.table({"concepts": [["dog", f"w{i}"] for i in range(10)], "n": list(range(10))})
    pq.write_table(table, pq_src, row_group_size=4)  # shards cut across row groups
    plan = plan_input(pq_src, shard_size=3)
    rows = [r for s in plan.shards for r in read_shard(pq_src, s)]
    assert [r["n"] for r in rows] == list(range(10)) and [r["row"] for r in rows] == list(range(10))


@pytest.mark.slow
def test_bad_replicas_option_exits_2(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"concepts": ["dog"]}\n')
    for bad in ("0", "3,2", "x", "1,2,3"):
        res = run_job("--input", tmp_path / "in.jsonl", "--output", tmp_path / "out", "--replicas", bad)
        assert res.returncode == 2 and "--replicas" in res.stderr, (bad, res.stderr)


def test_shard_size_gives_every_replica_its_shards():
    assert shard_size(64, 2, 2) == 16  # 64 rows in one shard of 64 would leave one replica idle
    assert shard_size(10_000, 2, 2) == BATCH_SIZE
    assert shard_size(3, 4, 2) == 1


@pytest.mark.slow
def test_two_replicas_both_answer_rows_at_the_default_batch_size(tmp_path, model_dirs):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "concepts": ["dog", f"w{i}"]}) + "\n" for i in range(16)))
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, max_new_tokens=4)
    env = {**os.environ, "RAY_ADDRESS": ""}
    res = run_job("--input", src, "--output", tmp_path / "out", "--config", cfg, "--replicas", "2", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = rows_of(tmp_path / "out" / "greedy")
    assert [r["row"] for r in got] == list(range(16))
    assert len({r["replica"] for r in got}) == 2, res.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["methods"]["greedy"]
    assert len(summary["replicas_this_run"]) == 2
    # a rerun with another pool size resumes the same shards instead of refusing the folder
    again = run_job("--input", src, "--output", tmp_path / "out", "--config", cfg, "--replicas", "1", env=env)
    assert again.returncode == 0 and "shard(s) of 4" in again.stderr, again.stderr[-3000:]


@pytest.mark.slow
def test_a_row_that_kills_its_replica_is_recorded_and_the_job_finishes(tmp_path, model_dirs):
    src = tmp_path / "in.jsonl"
    concepts = [["dog", "frisbee"], ["child", "river"], ["cook", "poison"], ["cat", "sleep"]] * 2
    src.write_text("".join(json.dumps({"id": f"r{i}", "concepts": c}) + "\n" for i, c in enumerate(concepts)))
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs)
    env = {**os.environ, "RAY_ADDRESS": ""}
    res = subprocess.run([str(BIN / "python"), "-m", "tests.chaos_generate", "poison", "--input", str(src), "--output",
                          str(tmp_path / "out"), "--config", str(cfg), "--batch-size", "4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr  # a row failed, the job did not
    got = rows_of(tmp_path / "out" / "greedy")
    assert [r["row"] for r in got] == list(range(8))
    failed = [r["row"] for r in got if r["error"]]
    assert failed == [2, 6] and "killed its replica" in got[2]["error"]
    assert all(r["text"] for r in got if not r["error"])


@pytest.mark.slow
def test_each_method_gets_a_pool_after_the_last_one_freed_its_resources(tmp_path, model_dirs):
    """A local Ray sized for one replica: the second method's pool can only start if the first
    pool's placement groups were released."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"concepts": ["dog", f"w{i}"]}) + "\n" for i in range(6)))
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs)
    res = run_job("--input", src, "--output", tmp_path / "out", "--config", cfg, "--method", "greedy,cdsl",
                  "--batch-size", "3", env={**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["methods"]
    assert [summary[m]["rows"] for m in ("greedy", "cdsl")] == [6, 6]
    assert set(summary["greedy"]["replicas_this_run"]).isdisjoint(summary["cdsl"]["replicas_this_run"])
