"""How the Ray pipeline is laid out: models, tensor parallelism, resources, batching.

The custom resource names here (`DRAFT_RESOURCE`, `TARGET_RESOURCE`) are the one place the
actors, the cluster configs in `cluster/` and `ray_config.yaml` take them from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cdsl.config import BUILTIN_DRAFT, BUILTIN_HARMLESS, DecodeConfig, ModelConfig
from cdsl.request import Limits

DRAFT_RESOURCE = "draft_gpu"
"""Custom resource a node advertises to host draft workers (cheap GPUs)."""
TARGET_RESOURCE = "target_gpu"
"""Custom resource a node advertises per large GPU, one per tensor-parallel rank."""


class PipelineConfig(BaseModel):
    """The Ray pipeline: which models, how the target is split, where each worker may run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    target: ModelConfig = Field(default_factory=ModelConfig)
    """The large model; verifies drafts and proposes CDLH candidates."""
    draft: ModelConfig | None = Field(default_factory=lambda: ModelConfig(path=BUILTIN_DRAFT))
    """The small model that writes lookaheads; None for greedy/cdlh-only pipelines."""
    target_tp: int = Field(1, ge=1, le=64)
    """Tensor-parallel size of the target: that many Ray actors form one DeepSpeed AutoTP group."""
    placement: Literal["auto", "required", "off"] = "auto"
    """Custom resources: "required" always asks for `draft_gpu`/`target_gpu` (pending until a node
    offers them), "auto" asks only if the cluster has them, "off" never asks."""
    draft_num_gpus: float = Field(0.0, ge=0.0)
    """GPUs (or a fraction) per draft worker; 0 on CPU."""
    target_num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per target rank; 0 on CPU (DeepSpeed then uses gloo instead of nccl)."""
    reward_device: str = "cpu"
    """torch device of reward models in the reward worker ("cuda" with `reward_num_gpus` > 0)."""
    reward_num_gpus: float = Field(0.0, ge=0.0)
    """GPUs (or a fraction) for the reward worker; 0 on CPU."""
    cpus_per_worker: float = Field(1.0, ge=0.0)
    """CPUs reserved per model worker (and per target rank)."""
    max_restarts: int = Field(4, ge=-1)
    """Restarts Ray grants a dead worker (-1: unlimited); its requests resume from their last token."""
    max_retries: int = Field(3, ge=0)
    """Times one request is resumed after a lost worker before it fails."""
    call_timeout_s: float = Field(300.0, gt=0.0)
    """Longest one worker call (a batched forward or reward call) may take; a worker past it
    counts as hung: it is killed and restarted (the target group rebuilt) and its requests resume."""
    start_timeout_s: float = Field(600.0, gt=0.0)
    """Longest a target group may take to start (load weights, join the process group)."""
    window_ms: float = Field(2.0, ge=0.0, le=1000.0)
    """Longest a phase waits for more requests to join a batch."""
    max_tokens_held: int | None = Field(None, ge=1)
    """Most KV-cache tokens the coordinator's requests may reserve together (prompt + output,
    times k for searching methods); more requests wait, one that can never fit is refused (400).
    Size it from what the target's GPUs hold; None: no bound."""
    max_concurrency: int = Field(256, ge=1)
    """Requests the coordinator runs at once."""
    overlap: bool = False
    """True: an `sd` request alone in the pipeline drafts its next round while the target
    verifies this one (PEARL's post-verify), with the same text. Off by default: with the default
    pair it saved nothing (6 of 122 rounds were kept whole) and cost draft calls (docs/ray.md).
    False: draft, then verify."""
    search_ahead: bool = True
    """True: a `cdsl` request alone in the pipeline, scored by a reward model, keeps a search's
    top row while the reward worker scores it and already searches the next round from there
    (redone where another row wins), with the same text: harmless CDSL at 0.77x the serial wall
    time with the default pair (docs/ray.md). Under load other requests fill the wait instead.
    False: the target waits for every search's scores."""
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    """Defaults for requests that do not set their own."""
    limits: Limits = Field(default_factory=Limits)
    """What one request may ask for, over HTTP and in a dataset job alike."""

    @model_validator(mode="after")
    def _tp_dtype(self) -> PipelineConfig:
        if self.target_tp > 1 and self.target.dtype == "float64":
            raise ValueError("target.dtype: float64 is not supported by DeepSpeed tensor parallelism "
                             f"(target_tp={self.target_tp}); use float32, bfloat16 or float16")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """The `cdsl:` section of a config such as ray_config.yaml (relative model paths are
        taken from the current directory)."""
        return cls.model_validate(_section(path, "cdsl"))


class ServerConfig(BaseModel):
    """The OpenAI-compatible HTTP endpoint: the pipeline behind it, its name, reward models and auth.
    Each Serve replica runs one pipeline, so replicas scale model capacity."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    """The models and workers each replica drives."""
    model_name: str = Field("cdsl", min_length=1)
    """The id clients give as `model` and `GET /v1/models` lists."""
    api_key: str | None = None
    """Bearer token every /v1 request must carry; None (the default, for loopback) turns auth
    off. The environment variable CDSL_API_KEY sets it too."""
    reward_models: dict[str, str] = Field(default_factory=dict)
    """Names a request may give as `constraints.reward_model`, each a local folder or hub id of a
    sequence-classification model. Requests cannot load models the config does not name."""

    @model_validator(mode="before")
    @classmethod
    def _limits_moved(cls, data: object) -> object:
        """The request limits used to be server fields; say where they went."""
        moved = sorted(set(Limits.model_fields) & set(data)) if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"{', '.join(moved)}: request limits now live in the pipeline's `limits` section "
                             "(`cdsl: limits:` in ray_config.yaml), shared with dataset jobs")
        return data

    @field_validator("reward_models")
    @classmethod
    def _reward_models_exist(cls, models: dict[str, str]) -> dict[str, str]:
        """A misspelt folder fails at `serve run`, not at the first request that names it."""
        for name, path in models.items():
            field = f"reward_models.{name}"
            if not name.strip() or not path.strip():
                raise ValueError("reward_models: names and paths must not be empty")
            if path.startswith("builtin:") and path != BUILTIN_HARMLESS:
                raise ValueError(f"{field}: unknown builtin model {path!r} (the builtin reward model is "
                                 f"{BUILTIN_HARMLESS})")
            if (path.startswith(("/", ".", "~")) or path.count("/") > 1) and not Path(path).expanduser().exists():
                raise ValueError(f"{field}: reward model folder not found: {path}")
        return models
    @classmethod
    def from_yaml(cls, path: str | Path, app: str = "cdsl") -> ServerConfig:
        """The `args` of the Serve application named `app` in a Serve config such as ray_config.yaml."""
        apps = _section(path, "applications") or []
        for entry in apps:
            if entry.get("name") == app:
                return cls.model_validate(entry.get("args") or {})
        raise ValueError(f"applications: no Serve application named {app!r} in {path}")


def _section(path: str | Path, key: str):
    """One top-level section of a YAML config file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    return data.get(key, {})

