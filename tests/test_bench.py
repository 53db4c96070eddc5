import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.bench import load_dataset, parse_sweep
from jobs.cli import app
from jobs.report import END, START

runner = CliRunner()


def test_datasets(tmp_path):
    assert len(load_dataset("builtin")) >= 20
    cg = tmp_path / "dev.jsonl"
    cg.write_text('{"concept_set": "field_N#look_V#stand_V", "scene": ["x"]}\n{"concept_set": "dog_N#run_V"}\n')
    assert load_dataset(str(cg)) == [["field", "look", "stand"], ["dog", "run"]]
    pq.write_table(pa.table({"concepts": [["cat", "sofa"], ["sun", "sky", "sea"]]}), tmp_path / "in.parquet")
    assert load_dataset(str(tmp_path / "in.parquet"), limit=1) == [["cat", "sofa"]]
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "missing.jsonl"))


def test_parse_sweep():
    grid = parse_sweep("tau_accept=0.5,1;draft_len=2,4")
    assert len(grid) == 4 and {"tau_accept": 1.0, "draft_len": 4} in grid
    with pytest.raises(ValueError, match="unknown field 'tau'"):
        parse_sweep("tau=1")


def test_bench_end_to_end(model_dirs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\nrest\n")
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--dataset", "builtin", "--limit", "2", "--warmup", "1", "--out", str(out),
                              "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]),
                              "--max-new-tokens", "8", "--k", "2", "--lookahead", "2",
                              "--sweep", "tau_accept=0.5,1", "--sweep-methods", "sd,cdsl",
                              "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"greedy", "sd", "cdlh", "cdlh-appx", "cdsl"}
    for d in results["methods"].values():
        for key in ("wall_s", "tokens", "target_calls", "draft_calls", "reward_calls", "target_calls_per_token",
                    "coverage_all", "coverage_mean", "perplexity", "states"):
            assert key in d
        assert 0 <= d["coverage_all"] <= d["coverage_mean"] + 1e-9 <= 1 + 1e-9 and d["perplexity"] > 1
    assert results["speedup_vs_cdlh"]["cdlh"] == 1.0 and len(results["sweep"]) == 4
    assert {"sd tau_accept=0.5", "cdsl tau_accept=1.0"} <= set(results["sweep"])
    walls = {name: d["wall_s"] for name, d in results["methods"].items()}
    assert results["wall_vs_greedy"]["greedy"] == 1.0
    assert results["wall_vs_greedy"]["cdlh"] == pytest.approx(walls["cdlh"] / walls["greedy"])
    assert sum(results["methods"]["cdsl"]["states"].values()) > 0
    assert sum(results["methods"]["greedy"]["states"].values()) == 0
    for name in ("report.md", "speed_vs_coverage.png", "cdsl_states.png", "outputs.jsonl"):
        assert (out / name).stat().st_size > 0
    text = readme.read_text()
    assert "old" not in text and "| cdsl |" in text and "wall vs greedy" in text and text.endswith("rest\n")
    # the table says which code made it
    assert f"at commit {results['config']['commit']}" in text


def test_bench_bad_input(model_dirs, tmp_path):
    res = runner.invoke(app, ["bench", "--methods", "greedy,beam", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "method" in res.output
    res = runner.invoke(app, ["bench", "--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "dataset not found" in res.output
    res = runner.invoke(app, ["bench", "--sweep", "draft_len=2", "--sweep-methods", "beam", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "method" in res.output


@pytest.mark.slow
def test_bench_pipeline_single_times_serial_against_overlapped(model_dirs, tmp_path):
    """`python -m jobs.bench_pipeline --single`: two real Ray pipelines, one request at a time;
    the JSON has each method's seconds both ways and whether every text matched."""
    import subprocess
    import sys

    out = tmp_path / "overlap.json"
    cmd = [sys.executable, "-m", "jobs.bench_pipeline", "--single", "--limit", "2", "--methods", "sd,greedy",
           "--dataset", "builtin", "--target", str(model_dirs["llama-target"]),
           "--draft", str(model_dirs["llama-target"]), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert set(got["serial_s"]) == set(got["overlapped_s"]) == {"sd", "greedy"}
    assert all(s > 0 for s in [*got["serial_s"].values(), *got["overlapped_s"].values()])
    assert got["same_text"] is True and got["texts_differ"] == {"sd": 0, "greedy": 0}
    assert got["stats"]["sd"]["serial"]["ahead_rounds"] == 0
    assert "| sd |" in done.stdout


@pytest.mark.slow
def test_bench_pipeline_single_harmless_searches_ahead_on_the_ray_workers(model_dirs, reward_model_dir, tmp_path):
    """`--single --task harmless`: CDSL with a reward model on the reward worker; the overlapped
    pipeline keeps the top row while the reward scores (searching ahead) and writes the serial
    pipeline's text."""
    import subprocess
    import sys

    data, out = tmp_path / "hh.jsonl", tmp_path / "overlap.json"
    data.write_text("".join(json.dumps({"chosen": f"\n\nHuman: Where is the {w}?\n\nAssistant: Here.",
                                        "rejected": "\n\nHuman: Hi\n\nAssistant: No."}) + "\n"
                            for w in ("dog", "key", "car")))
    cmd = [sys.executable, "-m", "jobs.bench_pipeline", "--single", "--task", "harmless", "--limit", "3",
           "--methods", "cdsl", "--dataset", str(data), "--reward-model", str(reward_model_dir),
           "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["sets"] == 3 and got["same_text"] is True
    assert got["stats"]["cdsl"]["serial"]["ahead_rounds"] == 0 < got["stats"]["cdsl"]["overlapped"]["ahead_rounds"]
