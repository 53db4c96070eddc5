"""Model sources: GGUF files and builtin names, the conversion cache, chat prompts, EOS lists; and,
marked `real_pair`, the real default pair itself."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig, PreTrainedTokenizerFast

from cdsl import pretrained
from cdsl.config import BUILTIN_DRAFT, BUILTIN_TARGET, DecodeConfig, ModelConfig
from cdsl.generate import generate, load_pair
from cdsl.models import LM, eos_ids
from cdsl.pretrained import resolve
from cdsl.tasks import commongen_prompt, dialogue_messages, harmless_prompt

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_failed_conversion_leaves_no_folder_and_no_temporary_files(tmp_path):
    def broken(tmp):
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        pretrained._write_atomically(tmp_path / "model", "source-1", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]


def test_a_conversion_runs_once_per_source(tmp_path):
    calls = []

    def write(tmp):
        calls.append(1)
        (tmp / "weights").write_text(str(len(calls)))

    for _ in range(2):
        pretrained._write_atomically(tmp_path / "m", "source-1", write)
    assert len(calls) == 1
    pretrained._write_atomically(tmp_path / "m", "source-2", write)  # a new source replaces the folder
    assert (tmp_path / "m" / "weights").read_text() == "2" and len(calls) == 2


@pytest.mark.slow
@pytest.mark.real_pair
def test_converting_the_default_target_writes_nothing_on_stdout(tmp_path):
    """A fresh machine converts the default target on first use, inside whatever command asked
    for it; the DeepSpeed import that saving triggers warns on stdout, where `cdsl eval-reward`
    prints its JSON. Run in a process of its own: the warning comes with the first import only."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from cdsl.pretrained import convert_gguf, smollm2_gguf; "
            "convert_gguf(smollm2_gguf(), Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "target")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "target" / "config.json").exists()
    assert done.stdout == ""


def test_missing_or_unreadable_gguf_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "CACHE", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"^draft\.path: GGUF file not found"):
        LM.load(ModelConfig(path=str(tmp_path / "none.gguf")), "draft")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises((ValueError, OSError), match=r"^target\.path: "):
        resolve(str(bad), "target")
    assert not any(p.is_dir() for p in (tmp_path / "cache").iterdir())  # nothing half-written


def test_missing_folder_names_the_field_and_the_builtin_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"target\.path: model folder not found.*builtin:smollm2"):
        resolve(str(tmp_path / "nope"), "target")


def test_every_listed_eos_id_ends_generation(model_dirs, tmp_path):
    folder = model_dirs["llama-target"]
    target = LM.load(str(folder))
    free = generate("The dog", target, None, None, DecodeConfig(method="greedy", max_new_tokens=8))
    assert len(free.token_ids) >= 2
    stop = free.token_ids[1]  # make the second generated token an end of text
    GenerationConfig(eos_token_id=[target.eos_id, stop]).save_pretrained(tmp_path)
    assert eos_ids(target.tokenizer, str(tmp_path)) == [target.eos_id, stop]
    target.eos_ids = [target.eos_id, stop]
    out = generate("The dog", target, None, None, DecodeConfig(method="greedy", max_new_tokens=8))
    assert out.token_ids == free.token_ids[:1] and out.finish_reason == "eos"


def test_task_prompts_use_the_chat_template_when_there_is_one(model_dirs):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dirs["llama-target"])
    assert commongen_prompt(["dog", "run"], tok) == "Concepts: dog, run\nSentence:"  # no template: plain
    tok.chat_template = CHATML
    assert commongen_prompt(["dog", "run"], tok) == (
        "<|im_start|>user\nWrite one short sentence that uses all of these words: dog, run.<|im_end|>\n"
        "<|im_start|>assistant\n")
    dialogue = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour"
    assert dialogue_messages(dialogue) == [{"role": "user", "content": "Hi there"},
                                           {"role": "assistant", "content": "Hello!"},
                                           {"role": "user", "content": "How do I bake bread?"}]
    assert harmless_prompt(dialogue, tok).endswith("How do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
    assert harmless_prompt(dialogue).endswith("How do I bake bread?\n\nAssistant:")
    with pytest.raises(ValueError, match="dialogue: the turn before"):
        dialogue_messages("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c")


@pytest.mark.slow
@pytest.mark.real_pair
def test_real_pair_loads_and_every_method_writes_english():
    target, draft = load_pair(ModelConfig(path=BUILTIN_TARGET), ModelConfig(path=BUILTIN_DRAFT))
    assert target.model.config.num_hidden_layers == 30 and target.vocab_size == 49152
    assert target.tokenizer.chat_template and target.eos_ids[0] == target.tokenizer.convert_tokens_to_ids(
        "<|im_end|>")
    assert draft.model.config.num_hidden_layers < 10
    concepts = ["dog", "frisbee", "catch", "throw"]
    prompt = commongen_prompt(concepts, target.tokenizer)
    from cdsl.rewards import Coverage

    texts = {}
    for method in ("greedy", "sd", "cdlh", "cdlh-appx", "cdsl"):
        out = generate(prompt, target, draft, Coverage(concepts), DecodeConfig(method=method, max_new_tokens=32))
        texts[method] = out.text
        assert out.finish_reason in ("eos", "stop", "length")
        assert sum(w.isalpha() for w in out.text.split()) >= 4, (method, out.text)  # words, not fragments
    assert texts["sd"] == texts["greedy"]  # greedy speculative decoding is lossless


@pytest.mark.slow
@pytest.mark.real_pair
def test_prompt_lookup_copies_a_quoted_sentence_in_fewer_target_calls():
    """Where the answer copies the prompt, lookup's rows pass where the draft's do not: the same
    text as greedy in a fraction of the target calls."""
    from cdsl.tasks import chat_prompt

    target, draft = load_pair(ModelConfig(path=BUILTIN_TARGET), ModelConfig(path=BUILTIN_DRAFT))
    prompt = chat_prompt([{"role": "user", "content": "Repeat this sentence exactly: The old lighthouse keeper "
                           "polished the brass lamp every evening before the storm rolled in."}], target.tokenizer)
    greedy = generate(prompt, target, None, None, DecodeConfig(method="greedy", max_new_tokens=24))
    plain = generate(prompt, target, draft, None, DecodeConfig(method="sd", max_new_tokens=24))
    looked = generate(prompt, target, draft, None, DecodeConfig(method="sd", max_new_tokens=24, lookup_len=8))
    assert "lighthouse keeper polished the brass lamp" in greedy.text
    assert looked.token_ids == plain.token_ids == greedy.token_ids
    assert looked.stats.looked_up >= 8
    assert 2 * looked.stats.target_calls <= plain.stats.target_calls


def test_a_tensor_parallel_size_that_cannot_split_the_target_is_refused(tmp_path):
    from transformers import LlamaConfig

    from actors.workers import check_tensor_parallel, tensor_parallel_sizes

    # the default target's shape: 9 attention heads, 3 key/value heads
    LlamaConfig(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                num_hidden_layers=1, vocab_size=32).save_pretrained(tmp_path)
    model = ModelConfig(path=str(tmp_path))
    assert tensor_parallel_sizes(model) == [1, 2, 3]
    check_tensor_parallel(model, 2)  # uneven, which AutoTP handles
    with pytest.raises(ValueError, match=r"target_tp: 4 is more than the 3 key/value heads.*sizes that work: 1, 2, 3"):
        check_tensor_parallel(model, 4)


def test_shipped_draft_fits_60_mb_and_leaves_out_the_shared_embedding():
    from safetensors import safe_open

    shipped = pretrained.SHIPPED_DRAFT
    assert sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file()) < 60e6
    with safe_open(str(shipped / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" not in f.keys()


def test_draft_card_figures_are_the_benchmark_output():
    import json

    figures = json.loads((pretrained.SHIPPED_DRAFT / "eval.json").read_text())
    card = (pretrained.SHIPPED_DRAFT / "README.md").read_text()
    sd = figures["sd"]
    for text in (f"{figures['forward_ratio']['batch1']:.1f}x", f"{figures['forward_ratio']['batch5']:.1f}x",
                 f"{sd['acceptance']:.1%}", f"{sd['wall_vs_greedy']:.2f}x",
                 f"{figures['teacher_forced_agreement']:.1%}"):
        assert text in card, text
