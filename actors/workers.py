"""The Ray workers: a model worker (draft, or one rank of the tensor-parallel target) and a
reward worker. Each holds a `cdsl` executor and answers `execute(calls, released)`; they are
plain classes made remote by `actors.pipeline`, so their options come from `PipelineConfig`.
"""

from __future__ import annotations

import glob
import os
import socket
import time

import ray
import torch

from cdsl.config import ModelConfig
from cdsl.models import LM
from cdsl.reward_table import RewardTable
from cdsl.store import Run, SeqStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelWorker:
    """One model, or one rank of a DeepSpeed AutoTP group over the target. Every rank runs each
    batch (the forward is collective); rank 0's logits are the answer, the others return None."""

    def __init__(self, model: ModelConfig, rank: int = 0, world: int = 1, master: tuple[str, int] | None = None,
                 gpu: bool = False) -> None:
        self.rank, self.world, self.master = rank, world, master
        # a rank of a split target loads on the host: DeepSpeed shards it there and moves only
        # this rank's shard to the GPU, so a target too big for one GPU can still load; it keeps
        # its nn.Linear layers, which AutoTP looks for
        lm = LM.load(model if world == 1 else model.model_copy(update={"device": "cpu", "onednn": False}))
        if world > 1:
            lm = _tensor_parallel(lm, rank, world, master, gpu)
        self.store = SeqStore(lm)
        self.compute_s, self.batches = 0.0, 0

    def execute(self, calls: list[Run], released: list[str]) -> list | None:
        start = time.perf_counter()
        out = self.store.execute(calls, released)
        self.compute_s += time.perf_counter() - start
        self.batches += 1
        # numpy crosses Ray's object store without a copy; pickled torch tensors are ~10x slower
        return [o.numpy() if isinstance(o, torch.Tensor) else o for o in out] if self.rank == 0 else None

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "rank": self.rank, "pid": os.getpid(), "caches": len(self.store),
                "compute_s": self.compute_s, "batches": self.batches, "threads": torch.get_num_threads()}

    def close(self) -> None:
        """Leave the process group and remove DeepSpeed's shared-memory buffer."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            addr, port = self.master
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{self.rank}"):
                os.remove(path)


def tensor_parallel_sizes(model: ModelConfig) -> list[int]:
    """Tensor-parallel sizes DeepSpeed AutoTP can use for the model: up to its number of key/value
    heads. AutoTP splits heads unevenly when they do not divide (measured: SmolLM2-135M's 9 heads
    and 3 key/value heads at TP = 2 give TP = 1's greedy output), but a rank needs at least one
    key/value head."""
    from transformers import AutoConfig

    from cdsl.pretrained import resolve

    cfg = AutoConfig.from_pretrained(resolve(model.path, "target"), trust_remote_code=model.trust_remote_code)
    cfg = getattr(cfg, "text_config", cfg)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None) or 1
    return list(range(1, heads + 1))


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """Refuse a tensor-parallel size the target cannot be split into, naming the ones it can."""
    if tp == 1:
        return
    sizes = tensor_parallel_sizes(model)
    if tp not in sizes:
        raise ValueError(f"target_tp: {tp} is more than the {sizes[-1]} key/value heads of the target "
                         f"{model.path!r}, so some rank would hold none; sizes that work: "
                         f"{', '.join(map(str, sizes[:8]))}{', ...' if len(sizes) > 8 else ''}")


def _tensor_parallel(lm: LM, rank: int, world: int, master: tuple[str, int], gpu: bool) -> LM:
    """Shard `lm` with DeepSpeed AutoTP over `world` ranks (nccl on GPU, gloo on CPU)."""
    addr, port = master
    # LOCAL_SIZE: DeepSpeed's CPU shared-memory all-reduce crashes without it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank if not gpu else 0),
                      LOCAL_SIZE=str(world), MASTER_ADDR=addr, MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    engine = deepspeed.init_inference(lm.model, tensor_parallel={"tp_size": world}, dtype=lm.model.dtype,
                                      replace_with_kernel_inject=False)
    return LM(engine.module, lm.tokenizer, name=lm.name)


class RewardWorker:
    """Scores reward calls of many requests (coverage, keywords, regex, reward models)."""

    def __init__(self, device: str = "cpu") -> None:
        self.table = RewardTable(device)

    def execute(self, calls: list, released: list[str]) -> list[list[float]]:
        return self.table.execute(calls, released)

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
