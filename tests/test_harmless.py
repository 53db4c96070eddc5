"""The harmless task: hh-rlhf prompts, reward-model rewards (alone and combined with concepts),
prompt-cached scoring, pairwise accuracy (`cdsl eval-reward`), the default harmless reward model
(marked real_pair), bad input, and `cdsl bench --task harmless` on tiny random models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cdsl.config import BUILTIN_HARMLESS, DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.generate import generate
from cdsl.pretrained import SHIPPED_HARMLESS
from cdsl.reward_model import RewardModel, load_reward_model, pairwise_accuracy
from cdsl.rewards import Combined, Coverage, RewardInput
from cdsl.tasks import harmless_prompt, split_dialogue
from jobs.bench import HARMLESS_DATA

from .test_generate_job import BIN, ROOT

DIALOGUE = ("\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out."
            "\n\nAssistant: Call a locksmith.")


def test_prompt_is_the_dialogue_up_to_the_last_assistant_turn():
    assert harmless_prompt(DIALOGUE) == DIALOGUE[: DIALOGUE.rindex(" Call a locksmith.")]
    with pytest.raises(ValueError, match="dialogue"):
        harmless_prompt("\n\nHuman: hi")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cdsl"), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_reward_prints_pairwise_accuracy(tmp_path, reward_model_dir):
    """Accuracy counts strict wins: swapping every pair gives 1 - accuracy, ties give 0."""
    texts = [f"{DIALOGUE} Option {i}: {'stay calm ' * (i % 3)}" for i in range(12)]
    pairs = [{"chosen": a, "rejected": b} for a, b in zip(texts[::2], texts[1::2])]
    for name, rows in {"pairs": pairs, "swapped": [{"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs],
                       "ties": [{"chosen": p["chosen"], "rejected": p["chosen"]} for p in pairs]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {}
    for name in ("pairs", "swapped", "ties"):
        run = cli("eval-reward", "--pairs", str(tmp_path / f"{name}.jsonl"), "--model", str(reward_model_dir))
        assert run.returncode == 0, run.stderr
        got[name] = json.loads(run.stdout)
    assert got["pairs"]["pairs"] == 6
    assert got["pairs"]["accuracy"] + got["swapped"]["accuracy"] == pytest.approx(1.0)
    assert got["ties"]["accuracy"] == 0.0
    rm = RewardModel(str(reward_model_dir))
    direct = pairwise_accuracy(lambda t: rm.score([RewardInput("", "", x, True) for x in t]), pairs)
    assert direct == got["pairs"]["accuracy"]


@pytest.mark.slow
def test_eval_reward_refuses_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"chosen": "a"}\n')
    run = cli("eval-reward", "--pairs", str(tmp_path / "bad.jsonl"))
    assert run.returncode == 2 and "line 1" in run.stderr and "rejected" in run.stderr
    run = cli("eval-reward", "--pairs", str(tmp_path / "missing.jsonl"))
    assert run.returncode == 2 and "no such file" in run.stderr


@pytest.mark.slow
@pytest.mark.real_pair
@pytest.mark.skipif(not HARMLESS_DATA.exists(), reason="../shared/data/hh-rlhf is not beside this checkout")
def test_default_harmless_model_generalises_to_its_held_out_split():
    """The goal (at least 62% on pairs it never saw), through the scoring path requests use, and
    the model card quotes this very figure."""
    from jobs.train_reward import read_pairs, split

    _, held_out = split(read_pairs(HARMLESS_DATA), 0.2, 0)
    run = cli("eval-reward", "--pairs", str(HARMLESS_DATA), "--held-out")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["pairs"] == len(held_out) - got["skipped"] and got["accuracy"] >= 0.62
    card = (SHIPPED_HARMLESS / "README.md").read_text()
    assert f"{got['accuracy']:.1%}" in card


def test_dialogue_splits_into_what_the_model_reads_and_answers(model_dirs):
    from transformers import AutoTokenizer

    prompt, answer = split_dialogue(DIALOGUE)
    assert prompt + answer == DIALOGUE and answer == " Call a locksmith."
    chat = AutoTokenizer.from_pretrained(model_dirs["llama-target"])
    chat.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    prompt, answer = split_dialogue(DIALOGUE, chat)
    assert prompt == "<user>How do I pick a lock?\n<assistant>Why?\n<user>I'm locked out.\n<assistant>"
    assert answer == "Call a locksmith."


def test_reward_model_steers_cdlh_and_combines_with_concepts(pairs, reward_model_dir):
    """A reward-model reward steers CDLH off the greedy path (its candidates are scored by the
    model); a request may combine it with concepts (the per-request RewardSpec)."""
    target, draft = pairs["llama"]
    rm = RewardModel(str(reward_model_dir))
    prompt = harmless_prompt(DIALOGUE)
    cfg = DecodeConfig(max_new_tokens=12, k=5, lookahead=3, reward_weight=1000.0)  # the reward decides
    greedy = generate(prompt, target, draft, rm, cfg.model_copy(update={"method": "greedy"}))
    cdlh = generate(prompt, target, draft, rm, cfg.model_copy(update={"method": "cdlh"}))

    assert cdlh.token_ids != greedy.token_ids and cdlh.stats.reward_calls >= 5 * cdlh.stats.tokens
    spec = RewardSpec(concepts=["dog"], reward_model=str(reward_model_dir))
    combined = spec.build()
    assert isinstance(combined, Combined)
    item = RewardInput(prompt, "", " the dog", True)
    expected = (Coverage(["dog"]).score([item])[0] + rm.score([item])[0]) / 2
    assert combined.score([item])[0] == pytest.approx(expected)
    out = generate(prompt, target, draft, combined, cfg.model_copy(update={"method": "cdsl", "tau_reward": 0.5}))
    assert out.stats.reward_calls > 0


@pytest.mark.slow
def test_bench_harmless_task_on_tiny_models(tmp_path, model_dirs, reward_model_dir):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps({"chosen": DIALOGUE.replace("locksmith", f"locksmith {i}"),
                                        "rejected": DIALOGUE}) + "\n" for i in range(3)))
    run = cli("bench", "--task", "harmless", "--dataset", str(data), "--reward-model", str(reward_model_dir),
              "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]),
              "--methods", "greedy,cdlh,cdsl", "--limit", "2", "--warmup", "1", "--max-new-tokens", "6",
              "--tau-reward", "0.5", "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert "mean reward" in run.stdout and "reward >= 0.5" in run.stdout
    results = json.loads(Path(tmp_path / "out" / "results.json").read_text())
    assert results["config"]["task"] == "harmless" and results["config"]["n"] == 2
    for d in results["methods"].values():
        assert 0.0 <= d["ok_share"] <= 1.0 and 0.0 < d["score_mean"] < 1.0 and "coverage_all" not in d
    outputs = [json.loads(line) for line in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert outputs[0]["prompt"].endswith("Assistant:") and set(outputs[0]) >= {"greedy", "cdlh", "cdsl"}


def test_requests_share_one_reward_model_load_and_one_batch(reward_model_dir):
    """Two requests with different concepts and the same reward model: the weights load once,
    and the calls of requests with different prompts are scored in one batch."""
    from cdsl.engine import RewardCall, RewardTable

    load_reward_model.cache_clear()
    specs = [RewardSpec(concepts=["dog"], reward_model=str(reward_model_dir)),
             RewardSpec(concepts=["cat"], reward_model=str(reward_model_dir))]
    parts = [spec.build().parts[1][0] for spec in specs]
    assert parts[0] is parts[1] and load_reward_model.cache_info().misses == 1
    rm = parts[0]
    only_rm = RewardSpec(reward_model=str(reward_model_dir))
    calls = [RewardCall(only_rm, tuple(RewardInput(f"Q: hi {who}:", f" hello there{end}") for end in "!?"))
             for who in ("A", "B")]
    lengths = [len(rm.tokenizer(c.items[0].prompt + c.items[0].text).input_ids) for c in calls]
    assert lengths[0].bit_length() == lengths[1].bit_length()  # one width class: SeqStore batches them
    forwards = []
    hook = rm.model.base_model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        together = RewardTable().execute(calls, [])
        # one forward caches both prompts (with what their texts share), one scores all four texts
        assert len(forwards) == 2 and [len(s) for s in together] == [2, 2]
        alone = [RewardModel(str(reward_model_dir)).score(list(c.items)) for c in calls]
    finally:
        hook.remove()
    assert sum(together, []) == pytest.approx(sum(alone, []), abs=1e-5)


def test_prompt_cache_scores_equal_a_plain_forward_and_feed_only_new_tokens(reward_model_dir):
    """CDLH-like calls (k candidates after a growing prefix, two prompts at once): the cached
    model's scores equal the plain forward's, and after the first call each call feeds the
    candidates' tokens and the prefix's growth only, never the prompt again."""
    cached, plain = RewardModel(str(reward_model_dir)), RewardModel(str(reward_model_dir), cached_prompts=0)
    assert cached.store is not None and plain.store is None
    fed = []
    hook = cached.model.base_model.register_forward_hook(lambda _m, args, kw, out: fed.append(kw["input_ids"].numel()),
                                                         with_kwargs=True)
    prompts = [harmless_prompt(DIALOGUE), harmless_prompt(DIALOGUE.replace("lock", "car"))]
    words = ["call", "the", "locksmith", "now", "please", "or", "wait", "outside"]
    prefix = ""
    try:
        for step in range(4):
            batch = [RewardInput(p, prefix, f" {w} {words[(i + step) % 8]}") for p in prompts for i, w in
                     enumerate(words[:5])]
            fed.clear()
            assert cached.score(batch) == pytest.approx(plain.score(batch), abs=1e-5)
            full = sum(len(cached.tokenizer(b.prompt + b.text).input_ids) for b in batch)
            if step:
                assert sum(fed) < full / 4
            prefix += f" {words[step]}"
    finally:
        hook.remove()
    assert len(cached.prompts) == 2
    small = RewardModel(str(reward_model_dir), cached_prompts=1)  # one prompt at a time: the other is dropped
    assert small.score(batch) == pytest.approx(plain.score(batch), abs=1e-5) and len(small.store) == 1


@pytest.mark.parametrize("models,message", [
    ({"harmless": "/no/such/folder"}, "reward_models.harmless: reward model folder not found"),
    ({"harmless": "builtin:nope"}, "reward_models.harmless: unknown builtin model"),
    ({"harmless": ""}, "must not be empty"),
])
def test_server_config_refuses_reward_models_it_cannot_load(models, message):
    from pydantic import ValidationError

    from actors.config import ServerConfig

    with pytest.raises(ValidationError, match=message):
        ServerConfig(reward_models=models)
    assert ServerConfig(reward_models={"harmless": BUILTIN_HARMLESS}).reward_models["harmless"] == BUILTIN_HARMLESS


def test_reward_model_errors_name_the_field(tmp_path, reward_model_dir):
    import shutil

    with pytest.raises(FileNotFoundError, match="reward_model.path"):
        RewardModel(str(tmp_path / "missing"))
    (tmp_path / "weights-only").mkdir()
    for f in reward_model_dir.iterdir():
        if f.name.startswith(("config", "model")):
            shutil.copy(f, tmp_path / "weights-only" / f.name)
    with pytest.raises(ValueError, match="reward_model: no tokenizer"):
        RewardModel(str(tmp_path / "weights-only"))
    with pytest.raises(ValueError, match="reward_model"):
        RewardSpec(reward_model="")


def test_generate_answers_a_dialogue_and_reports_its_reward(model_dirs, reward_model_dir):
    from typer.testing import CliRunner

    from jobs.cli import app

    base = ["generate", "--target", str(model_dirs["llama-target"]), "--draft", str(model_dirs["llama-draft"]),
            "--reward-model", str(reward_model_dir), "--method", "cdsl", "--tau-reward", "0.5",
            "--max-new-tokens", "6", "--json"]
    res = CliRunner().invoke(app, [*base, "--dialogue", DIALOGUE[: DIALOGUE.rindex(" Call")]])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert 0.0 < out["reward"] < 1.0 and out["stats"]["reward_calls"] > 0
    res = CliRunner().invoke(app, [*base, "--dialogue", "\n\nHuman: How do I pick a lock?"])
    assert res.exit_code == 2 and "dialogue: no" in res.output


def test_cdsl_with_a_reward_model_is_cdlh_at_full_range_and_greedy_at_none(pairs, reward_model_dir):
    """`reward_range` bounds what a reward model can add: at 1 CDSL searches wherever CDLH's
    choice could change (its text is CDLH's), at 0 nowhere (greedy's text, fewer target calls)."""
    target, draft = pairs["llama"]
    rm = RewardModel(str(reward_model_dir))
    prompt = harmless_prompt(DIALOGUE)
    cfg = DecodeConfig(max_new_tokens=16, k=4, lookahead=3, reward_weight=1000.0)  # the reward decides
    runs = {name: generate(prompt, target, draft, rm, cfg.model_copy(update=update)) for name, update in {
        "cdlh": {"method": "cdlh"}, "greedy": {"method": "greedy"}, "full": {"method": "cdsl"},
        "none": {"method": "cdsl", "reward_range": 0.0}}.items()}
    assert runs["cdlh"].token_ids != runs["greedy"].token_ids  # the reward does steer here
    assert runs["full"].token_ids == runs["cdlh"].token_ids
    assert runs["none"].token_ids == runs["greedy"].token_ids
    assert runs["none"].stats.target_calls < runs["full"].stats.target_calls


def test_a_large_reward_call_is_cut_into_forwards_of_whole_prompts(reward_model_dir):
    """Many requests at once: forwards of about 4 x batch_size texts, never splitting a prompt's
    texts, with the scores of one text at a time."""
    rm = RewardModel(str(reward_model_dir), batch_size=2)  # 8 texts per forward
    batch = [RewardInput(f"Q: {who} A:", f" hello there{end}") for who in "ABCDEF" for end in "!?."]
    sizes = []
    hook = rm.model.base_model.register_forward_hook(lambda _m, args, kw, out: sizes.append(kw["input_ids"].shape[0]),
                                                     with_kwargs=True)
    try:
        scores = rm.score(batch)
    finally:
        hook.remove()
    assert max(sizes) <= 8 and sum(sizes) >= len(batch)  # 18 texts in several forwards of whole prompts
    alone = RewardModel(str(reward_model_dir), cached_prompts=0)
    assert scores == pytest.approx([alone.score([item])[0] for item in batch], abs=1e-5)
