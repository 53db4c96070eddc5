import json

from typer.testing import CliRunner

from jobs.bench_oracle import app

runner = CliRunner()


def test_oracles_write_the_texts_they_bound(model_dirs, tmp_path):
    data = tmp_path / "dev.jsonl"
    data.write_text('{"concept_set": "cat_N#sofa_N"}\n{"concept_set": "dog_N#run_V#park_N"}\n'
                    '{"concept_set": "sun_N#sky_N"}\n')
    out = tmp_path / "oracle.json"
    res = runner.invoke(app, ["--dataset", str(data), "--limit", "2", "--warmup", "1", "--threads", "1",
                              "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    found = json.loads(out.read_text())
    assert found["n"] == 2
    # the oracle CDSL writes exact CDSL's (CDLH's) text; the oracle stop writes greedy's
    assert found["same_text"] == {"oracle cdsl": 2, "oracle sd d=4": 2}
    t = found["totals"]
    # a perfect stop only ever proposes a wrong token as a round's first (a round proposes >= 1)
    oracle = t["oracle sd d=4"]
    assert oracle["drafted"] - oracle["accepted"] <= oracle["rounds"]
    assert t["oracle cdsl"]["score"] == t["cdsl"]["score"] and t["cdsl"]["score"] == t["cdlh"]["score"]
    assert "| oracle cdsl |" in res.output


def test_unknown_task(model_dirs):
    res = runner.invoke(app, ["--task", "poetry", "--target", str(model_dirs["llama-target"]),
                              "--draft", str(model_dirs["llama-draft"])])
    assert res.exit_code == 2 and "task" in res.output

def test_lookup_runs_beside_the_oracles_and_keep_their_texts(model_dirs, tmp_path):
    """`--lookup-len`: cdsl, oracle cdsl and sd also run with prompt lookup's rows, and the
    target's check keeps their texts (exact CDSL's, greedy's)."""
    data = tmp_path / "dev.jsonl"
    data.write_text('{"concept_set": "cat_N#sofa_N"}\n{"concept_set": "dog_N#run_V#park_N"}\n')
    out = tmp_path / "oracle.json"
    res = runner.invoke(app, ["--dataset", str(data), "--limit", "1", "--warmup", "1", "--threads", "1",
                              "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]),
                              "--lookup-len", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    found = json.loads(out.read_text())
    names = ("cdsl, lookup 3", "oracle cdsl, lookup 3", "sd d=4, lookup 3")
    assert all(found["same_text"][name] == 1 for name in names)
    assert all(found["totals"][name]["tokens"] > 0 for name in names)
    assert "| oracle cdsl, lookup 3 |" in res.output
