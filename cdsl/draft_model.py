"""The default draft's architecture: a Llama whose output head covers only frequent tokens.

At SmolLM2-135M's size the 49,152 x 576 output head is a third of a forward's work, and most of
a few-layer draft's. A draft only has to propose the tokens the target is likely to write, so
its head keeps the rows of the most frequent answer tokens (FR-Spec's idea) and every other
token gets the lowest logit: it is never drafted, and the target writes it itself. The input
embedding stays whole, because the draft must read every prompt token.

Importing this module registers the architecture with transformers' Auto classes
(`model_type: cdsl_draft`), so `from_pretrained` loads a saved draft like any other model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast


class DraftConfig(LlamaConfig):
    """A Llama config plus `head_ids`, the token ids the output head scores (sorted)."""

    model_type = "cdsl_draft"

    def __init__(self, head_ids: list[int] | None = None, **kwargs) -> None:
        self.head_ids = list(head_ids or [])
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


class DraftForCausalLM(LlamaForCausalLM):
    """Llama layers; logits over the full vocabulary, computed for `config.head_ids` only."""

    config_class = DraftConfig
    _tied_weights_keys: dict = {}

    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, len(config.head_ids), bias=False)
        self._head_ids: torch.Tensor | None = None

    @property
    def head_ids(self) -> torch.Tensor:
        """`config.head_ids` as a tensor on the head's device (not a buffer: `from_pretrained`
        builds models on the meta device, where a buffer made in `__init__` would be lost)."""
        device = self.model.embed_tokens.weight.device  # the head's may be packed (cdsl.kernels.use_onednn)
        if self._head_ids is None or self._head_ids.device != device:
            self._head_ids = torch.tensor(self.config.head_ids, dtype=torch.long, device=device)
        return self._head_ids

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        scores = self.lm_head(hidden)
        logits = scores.new_full((*scores.shape[:-1], self.config.vocab_size), torch.finfo(scores.dtype).min)
        logits.index_copy_(-1, self.head_ids, scores)
        return CausalLMOutputWithPast(logits=logits, cache=out.cache)


AutoConfig.register(DraftConfig.model_type, DraftConfig, exist_ok=True)
AutoModelForCausalLM.register(DraftConfig, DraftForCausalLM, exist_ok=True)


def draft_from_target(target: str, layers: int, head_ids: list[int]) -> DraftForCausalLM:
    """A draft initialised from the target: its embedding, first `layers` layers and final norm,
    and a head made of the target's (tied) output rows for `head_ids`."""
    full = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    settings = full.config.to_dict()
    for key in ("model_type", "architectures", "tie_word_embeddings", "transformers_version", "dtype"):
        settings.pop(key, None)
    settings["num_hidden_layers"] = layers
    config = DraftConfig(head_ids=sorted(head_ids), **settings)
    config.architectures = [DraftForCausalLM.__name__]
    draft = DraftForCausalLM(config)
    draft.model.embed_tokens.load_state_dict(full.model.embed_tokens.state_dict())
    for mine, theirs in zip(draft.model.layers, full.model.layers):
        mine.load_state_dict(theirs.state_dict())
    draft.model.norm.load_state_dict(full.model.norm.state_dict())
    with torch.no_grad():
        draft.lm_head.weight.copy_(full.get_output_embeddings().weight[draft.head_ids])
    draft.generation_config = full.generation_config
    return draft
