"""The library's front door: `generate(prompt, target, draft, reward, config)`."""

from __future__ import annotations

import time

from cdsl.config import DecodeConfig, ModelConfig
from cdsl.methods import METHODS, Context, Generation, check_inputs
from cdsl.models import LM, check_same_vocab
from cdsl.rewards import Reward


def load_pair(target: ModelConfig | str, draft: ModelConfig | str | None) -> tuple[LM, LM | None]:
    """Load the target and (optionally) the draft, refusing a pair that does not share a vocabulary."""
    target_lm = LM.load(target, "target")
    draft_lm = LM.load(draft, "draft") if draft is not None else None
    if draft_lm is not None:
        check_same_vocab(draft_lm, target_lm)
    return target_lm, draft_lm


def generate(prompt: str, target: LM, draft: LM | None = None, reward: Reward | None = None,
             config: DecodeConfig | None = None) -> Generation:
    """Continue `prompt` with `config.method`; the result carries the text and its stats."""
    config = config or DecodeConfig()
    check_inputs(config.method, draft is not None, reward is not None)
    ctx = Context(prompt, target, draft, reward, config)
    start = time.perf_counter()
    try:
        METHODS[config.method].run(ctx)
    finally:
        ctx.close()
    ctx.stats.time_total = time.perf_counter() - start
    return ctx.result()
