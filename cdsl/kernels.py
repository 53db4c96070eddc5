"""How linear layers run on a CPU: oneDNN with weights packed once (`use_onednn`), and the
dtype names a config uses.

A small model's forward on a CPU streams every weight from memory once; `PackedLinear` keeps
that cost flat over the few new tokens a verification or a k-row search step feeds.
"""

from __future__ import annotations

import torch
from torch import nn

from cdsl.draft_model import DraftConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class PackedLinear(nn.Module):
    """An `nn.Linear` that computes through oneDNN with its weight packed once (CPU). The packed
    weight may be bfloat16, half the bytes a forward streams; inputs and outputs stay float32."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not buffers: state_dict() and .to() would not know the packed layout.
        # The weight is reordered once into the blocked layout oneDNN's linear wants, and the
        # fused op takes and returns dense tensors: no per-call conversion of weights or inputs.
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a dense float32 tensor (a copy: forwards use the packed one)."""
        return self.packed.to_dense().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == x.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)


def _has_fused_linear() -> bool:
    """Whether this torch build has the oneDNN linear ops `PackedLinear` calls (the private ones
    torch.compile's CPU weight freezing uses; a build without them keeps plain `nn.Linear`)."""
    try:
        return bool(torch.ops.mkldnn._reorder_linear_weight and torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def packed_dtype(model: nn.Module, setting: str = "auto") -> torch.dtype:
    """The dtype `use_onednn` packs `model`'s weights in (`ModelConfig.packed_dtype`): "auto" is
    bfloat16 for the project's draft architecture on a CPU oneDNN runs bfloat16 on, else float32.
    A draft's every token is checked by the target, so rounding its weights can cost acceptance
    but never change an output; the target and reward models keep float32."""
    if setting != "auto":
        return DTYPES[setting]
    draft = getattr(getattr(model, "config", None), "model_type", None) == DraftConfig.model_type
    return torch.bfloat16 if draft and _bf16_supported() else torch.float32


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_onednn(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Swap every plain `nn.Linear` of `model` that holds a CPU float32 weight for a
    `PackedLinear` whose weight is packed in `dtype`; returns how many were swapped.

    A small model's forward on a CPU streams every weight from memory once, and MKL's matrix
    multiply runs 2 or 3 rows as that many passes over the weights; oneDNN's packed weights do
    not, so a forward over 2-5 new tokens (verifying a draft, a k-row search step) costs little
    more than one over a single token, with the same logits to rounding. `python -m
    jobs.bench_kernels` measures it (docs/default-pair.md has the figures). A tied output head gets its own
    packed copy (one more head's worth of memory). A model DeepSpeed will split must keep its
    `nn.Linear`s, which AutoTP looks for."""
    if not torch.backends.mkldnn.is_available() or not _has_fused_linear():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child, dtype))
                swapped += 1
    return swapped


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, counting the weights `use_onednn` packed."""
    packed = sum(m.packed.numel() + (0 if m.bias is None else m.bias.numel())
                 for m in model.modules() if isinstance(m, PackedLinear))
    return packed + sum(p.numel() for p in model.parameters())
