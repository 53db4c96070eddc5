import json

import pytest
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


def invoke(model_dirs, *args):
    base = ["generate", "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"])]
    return runner.invoke(app, base + list(args))


def test_generate_json(model_dirs):
    res = invoke(model_dirs, "--concepts", "dog,frisbee,catch,throw", "--method", "cdsl", "--json",
                 "--max-new-tokens", "12", "--k", "3", "--lookahead", "2", "--draft-len", "3")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert isinstance(out["text"], str)
    stats = out["stats"]
    assert stats["tokens"] > 0 and stats["target_calls"] > 0 and sum(stats["states"].values()) == stats["rounds"]
    assert 0.0 <= out["reward"] <= 1.0


def test_generate_plain_text_with_every_method(model_dirs):
    for method in ("greedy", "sd", "cdlh", "cdlh-appx", "cdsl"):
        res = invoke(model_dirs, "--concepts", "dog,cat", "--method", method, "--max-new-tokens", "6")
        assert res.exit_code == 0, (method, res.output)


def test_bad_options_name_the_field(model_dirs):
    res = invoke(model_dirs, "--concepts", "dog", "--k", "0")
    assert res.exit_code == 2 and "k:" in res.output and "greater than or equal to 1" in res.output
    res = invoke(model_dirs, "--concepts", "dog", "--method", "beam")
    assert res.exit_code == 2 and "method" in res.output
    res = invoke(model_dirs, "--concepts", "dog", "--tau-reward", "1.5")
    assert res.exit_code == 2 and "tau_reward" in res.output
    res = invoke(model_dirs, "--concepts", "dog", "--accept-ratio", "1.5")
    assert res.exit_code == 2 and "accept_ratio" in res.output
    res = invoke(model_dirs, "--method", "cdsl", "--prompt", "hello")
    assert res.exit_code == 2 and "constraints: method 'cdsl' needs a reward" in res.output
    res = runner.invoke(app, ["generate", "--concepts", "dog", "--target", "/no/such/model"])
    assert res.exit_code == 2 and "model folder not found" in res.output
    res = invoke(model_dirs, "--concepts", "dog", "--prompt", "dog " * 1900)  # was: exit 0, empty text
    assert res.exit_code == 2 and "exceed the model's context window of 1024 tokens" in res.output, res.output
    res = invoke(model_dirs, "--concepts", "dog", "--prompt", "dog " * 20000)
    assert res.exit_code == 2 and "prompt: 80000 characters is above the limit of 8000" in res.output, res.output
    res = invoke(model_dirs, "--concepts", "dog," + "x" * 5000)
    assert res.exit_code == 2 and "constraints.concepts[1]: 5000 characters is above the limit of 100" in res.output
    res = invoke(model_dirs, "--prompt", "Hi", "--dialogue", "\n\nHuman: Hi\n\nAssistant:")
    assert res.exit_code == 2 and "give one of prompt, messages, dialogue" in res.output, res.output
    res = invoke(model_dirs, "--concepts", "dog", "--regex", "([a")
    assert res.exit_code == 2 and "regex" in res.output and "not a valid regular expression" in res.output


@pytest.mark.slow
def test_backend_ray_gives_the_local_answer(model_dirs):
    args = ["--concepts", "dog,frisbee,catch,throw", "--method", "cdsl", "--json", "--max-new-tokens", "12",
            "--k", "3", "--lookahead", "2", "--draft-len", "3", "--dtype", "float64"]
    local = json.loads(invoke(model_dirs, *args).stdout)
    res = invoke(model_dirs, *args, "--backend", "ray")
    assert res.exit_code == 0, res.output
    remote = json.loads(res.stdout.strip().splitlines()[-1])
    assert remote["text"] == local["text"] and remote["stats"]["states"] == local["stats"]["states"]


def test_bad_backend_options(model_dirs):
    res = invoke(model_dirs, "--concepts", "dog", "--backend", "spark")
    assert res.exit_code == 2 and "--backend" in res.output
    res = invoke(model_dirs, "--concepts", "dog", "--backend", "ray", "--target-tp", "0")
    assert res.exit_code == 2 and "target_tp" in res.output
