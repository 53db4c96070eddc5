import pytest
import torch

from cdsl.config import DecodeConfig, ModelConfig
from cdsl.generate import generate, load_pair
from cdsl.models import LM, Codec, VocabularyMismatch

from .conftest import FAMILIES, make_model, make_tokenizer


def test_mismatched_vocabularies_refused(model_dirs, tmp_path):
    other = tmp_path / "other-draft"
    tok = make_tokenizer(other, vocab_size=300, corpus=["completely different words here", "zebra quartz"])
    make_model("llama", len(tok), tok.eos_token_id, seed=0).save_pretrained(other)
    with pytest.raises(VocabularyMismatch) as err:
        load_pair(str(model_dirs["llama-target"]), str(other))
    assert str(other) in str(err.value) and str(model_dirs["llama-target"]) in str(err.value)


def test_cross_family_pair_sharing_a_tokenizer_is_accepted(model_dirs):
    target, draft = load_pair(str(model_dirs["llama-target"]), str(model_dirs["gpt2-draft"]))
    out = generate("The dog", target, draft, None, DecodeConfig(method="sd", max_new_tokens=8))
    assert out.stats.tokens > 0


def test_missing_local_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LM.load(ModelConfig(path=str(tmp_path / "nope")))


def test_method_requirements(pairs):
    target, _ = pairs["llama"]
    with pytest.raises(ValueError, match="needs a draft"):
        generate("x", target, None, None, DecodeConfig(method="sd"))
    with pytest.raises(ValueError, match="needs a reward"):
        generate("x", target, target, None, DecodeConfig(method="cdsl"))


def test_crop_and_rollout_keep_cache_consistent(pairs):
    """Decoding after truncation/adoption gives the same logits as a fresh prefill."""
    import torch

    from cdsl.decoder import Decoder
    from cdsl.stats import Stats

    target, _ = pairs["qwen2"]
    ids = target.encode("The dog throws a frisbee")
    dec = Decoder(target, ids, Stats(), "target")
    dec.step([5, 6, 7])
    dec.truncate(len(ids) + 1)
    ro = dec.rollout([9, 10], 3, lambda logits: logits.argmax(-1))
    dec.adopt(ro, 1)
    fresh = Decoder(target, ids + [5, 10], Stats(), "target").next_logits()
    assert torch.allclose(dec.next_logits(), fresh, atol=1e-9)
    assert dec.ids == ids + [5, 10]


@pytest.mark.parametrize("pending", [0, 2])
def test_score_rows_with_lead_returns_the_logits_that_predict_each_candidate(pairs, pending):
    """Branched SD checks its first tokens with the same call as the rest: row j of the lead
    logits predicts token j of [candidate, *tokens], with pending tokens fed or none left."""
    import torch

    from cdsl.decoder import Decoder
    from cdsl.stats import Stats

    target, _ = pairs["llama"]
    ids = target.encode("The dog throws a frisbee")
    dec = Decoder(target, ids, Stats(), "target")
    dec.next_logits()
    dec.push([5, 6][:pending])
    rows = dec.score_rows([9, 10], torch.tensor([[11, 12], [13, 14]]), lead=True)
    assert rows.logits.shape[:2] == (2, 4)
    for r, seq in enumerate([[9, 11, 12], [10, 13, 14]]):
        full = target.model(input_ids=torch.tensor([dec.ids + seq])).logits[0, len(dec.ids) - 1:]
        assert torch.allclose(rows.logits[r].double(), full.double(), atol=1e-4)
    assert dec.ids == ids + [5, 6][:pending]  # scoring rows emits nothing


def test_rollout_may_stop_right_after_the_candidates(pairs):
    """`least=0`: a doubtful model rolls out nothing after its candidates (one call)."""
    from cdsl.decoder import Decoder
    from cdsl.stats import Stats

    target, _ = pairs["llama"]
    dec = Decoder(target, target.encode("The dog"), Stats(), "draft")
    dec.next_logits()
    ro = dec.rollout([9, 10], 3, lambda logits: logits.argmax(-1), confidence=1.0, least=0)
    assert ro.tokens.shape == (2, 0) and dec.stats.draft_calls == 2
    ro = dec.rollout([9, 10], 3, lambda logits: logits.argmax(-1), confidence=1.0)
    assert ro.tokens.shape == (2, 1)


def test_a_rollout_told_to_stop_makes_no_further_call(pairs):
    """`stop` is asked before every call after the first: a rollout no longer needed ends there."""
    from cdsl.decoder import Decoder
    from cdsl.stats import Stats

    target, _ = pairs["llama"]
    dec = Decoder(target, target.encode("The dog"), Stats(), "target")
    dec.next_logits()
    asked = []
    ro = dec.rollout([9, 10], 4, lambda logits: logits.argmax(-1), stop=lambda: asked.append(1) or len(asked) == 2)
    assert ro.tokens.shape == (2, 2) and dec.stats.target_calls == 3 and len(asked) == 2


def test_pushed_tokens_with_known_logits_cost_no_call_until_the_next_one_feeds_them(pairs):
    """A rollout row's logits, pushed with its tokens, answer `next_logits`; the next call feeds
    the tokens and its logits are a fresh prefill's."""
    import torch

    from cdsl.decoder import Decoder
    from cdsl.stats import Stats

    target, _ = pairs["qwen2"]
    ids = target.encode("The dog throws a frisbee")
    dec = Decoder(target, ids, Stats(), "target")
    dec.next_logits()
    ro = dec.rollout([9, 10], 3, lambda logits: logits.argmax(-1))
    dec.discard(ro)
    calls = dec.stats.target_calls
    row = [10, *ro.tokens[1, :2].tolist()]
    dec.push(row, ro.logits[1, 2])
    assert torch.equal(dec.next_logits(), ro.logits[1, 2]) and dec.stats.target_calls == calls
    got = dec.verify([5])
    fresh = Decoder(target, ids + row, Stats(), "target").verify([5])
    assert torch.allclose(got, fresh[-2:], atol=1e-5) and dec.stats.target_calls == calls + 1
    dec.truncate(len(ids) + 1)
    dec.push([7])  # known logits are for the ids they came with only
    assert torch.allclose(dec.next_logits(), Decoder(target, ids + [10, 7], Stats(), "target").next_logits(),
                          atol=1e-5)


def test_prompt_ids_add_bos_where_the_tokenizer_asks_and_long_prompts_are_refused(model_dirs):
    target = LM.load(ModelConfig(path=str(model_dirs["llama-target"])))
    assert target.window == 1024
    plain = target.prompt_ids("The dog")
    assert plain == target.encode("The dog")  # this tokenizer asks for no BOS
    codec = Codec(target.tokenizer, window=target.window)
    codec.tokenizer.add_bos_token = True
    try:
        bos = codec.tokenizer.bos_token_id
        assert codec.prompt_ids("The dog") == [bos, *plain]
        assert codec.prompt_ids(codec.tokenizer.bos_token + "The dog")[:2] != [bos, bos]  # not twice
    finally:
        codec.tokenizer.add_bos_token = False
    with pytest.raises(ValueError, match="exceed the model's context window of 1024 tokens"):
        generate("dog " * 2000, target, config=DecodeConfig(method="greedy", max_new_tokens=4))


def test_a_prefill_returns_one_row_of_logits_not_one_per_prompt_token(pairs):
    """Only the last position's logits leave the model on a prefill (they cross Ray's object
    store on a cluster: [T, V] floats per prompt otherwise), and they are the same logits."""
    from cdsl.decoder import Decoder, LocalRunner
    from cdsl.stats import Stats
    from cdsl.store import Run, SeqStore

    target, _ = pairs["llama"]
    returned = []

    class Spy(LocalRunner):
        def run(self, call):
            out = super().run(call)
            returned.append(tuple(out.shape))
            return out

    ids = target.encode("The dog throws a frisbee and the child catches it in the park.")
    dec = Decoder(Spy(SeqStore(target)), ids, Stats(), "target")
    last = dec.next_logits()
    assert returned == [(1, target.vocab_size)] and len(ids) > 10
    full = LocalRunner(SeqStore(target)).run(Run("x", [ids], 0))
    assert torch.allclose(last, full[0, -1], atol=1e-9)


def test_out_of_memory_fails_only_the_run_that_cannot_fit(pairs, monkeypatch):
    """An OOM in a batched forward (injected: this machine has no GPU to exhaust) halves the
    batch until the run that cannot fit alone; it gets a MemoryError, the others their logits."""
    from cdsl.store import Run, SeqStore

    target, _ = pairs["llama"]
    store = SeqStore(target)
    real, seen = store._forward, []

    def forward(runs, caches):
        seen.append(len(runs))
        if any(r.key == "huge" for r in runs):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(runs, caches)

    monkeypatch.setattr(store, "_forward", forward)
    ids = target.encode("The dog throws a frisbee")
    out = store.run([Run(f"r{i}", [ids], 0) for i in range(3)] + [Run("huge", [ids], 0)])
    assert isinstance(out[3], MemoryError) and "out of memory" in str(out[3])
    alone = SeqStore(target).run([Run("alone", [ids], 0)])[0]
    assert all(torch.allclose(o, alone, atol=1e-9) for o in out[:3])
    assert seen[0] == 4 and "huge" not in store.caches and all(f"r{i}" in store.caches for i in range(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_onednn_packs_cpu_float32_linears_and_keeps_the_logits(model_dirs, family):
    from torch import nn

    from cdsl.kernels import PackedLinear, parameter_count

    path = str(model_dirs[f"{family}-target"])
    plain = LM.load(ModelConfig(path=path, onednn=False))
    packed = LM.load(ModelConfig(path=path))
    linears = sum(type(m) is nn.Linear for m in plain.model.modules())
    assert linears >= 1 and not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == linears
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    assert parameter_count(packed.model) >= parameter_count(plain.model)  # a tied head is packed apart
    ids = torch.tensor([plain.encode("The dog throws a frisbee"), plain.encode("A child plays in a park")[:6]])
    assert torch.allclose(packed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, atol=1e-4)
    cfg = DecodeConfig(method="greedy", max_new_tokens=12)
    assert generate("The child", packed, None, None, cfg).token_ids == generate("The child", plain, None, None,
                                                                               cfg).token_ids
    wide = LM.load(ModelConfig(path=path, dtype="float64"))  # oneDNN packs float32 only
    assert not any(isinstance(m, PackedLinear) for m in wide.model.modules())
    assert all(m.dtype == torch.float32 for m in packed.model.modules() if isinstance(m, PackedLinear))


def test_bfloat16_packed_weights_round_a_model_but_not_an_sd_output(pairs, model_dirs):
    """`packed_dtype` bfloat16 stores weights in half the bytes: logits move by rounding only,
    and as a draft the model cannot change what SD writes."""
    from cdsl.kernels import PackedLinear, _bf16_supported

    if not _bf16_supported():
        pytest.skip("oneDNN has no bfloat16 on this CPU")
    path = str(model_dirs["llama-draft"])
    plain = LM.load(ModelConfig(path=path, packed_dtype="float32"))
    half = LM.load(ModelConfig(path=path, packed_dtype="bfloat16"))
    assert all(m.dtype == torch.bfloat16 for m in half.model.modules() if isinstance(m, PackedLinear))
    ids = torch.tensor([plain.encode("The dog throws a frisbee")])
    with torch.no_grad():
        a, b = plain.model(input_ids=ids).logits, half.model(input_ids=ids).logits
    assert b.dtype == torch.float32 and 0 < float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    target, _ = pairs["llama"]
    cfg = DecodeConfig(method="greedy", max_new_tokens=16)
    ref = generate("The child", target, None, None, cfg)
    out = generate("The child", target, half, None, cfg.model_copy(update={"method": "sd", "draft_len": 3}))
    assert out.token_ids == ref.token_ids and out.stats.drafted > 0
