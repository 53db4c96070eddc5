"""The CDSL pipeline on Ray: a coordinator actor drives `cdsl.engine.Engine` over remote workers.

    draft worker  (draft_gpu)  <-+
    target group  (target_gpu) <-+- Coordinator (Engine: one batcher per phase) <- Pipeline / Serve
    reward worker              <-+

Only token ids, logits and reward scores cross process boundaries; KV caches stay in the
workers under request ids. Draft and reward workers are restarted by Ray (`max_restarts`); the
target group is rebuilt by the coordinator, since a collective cannot lose one rank. Requests
that lose caches resume from their last emitted token.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import DRAFT_RESOURCE, TARGET_RESOURCE, PipelineConfig
from actors.workers import ModelWorker, RewardWorker, check_tensor_parallel, free_port
from cdsl.engine import Engine, WorkerLost
from cdsl.methods import Generation
from cdsl.models import Codec
from cdsl.request import Request

log = logging.getLogger("cdsl.pipeline")
LOST = (RayActorError, ActorDiedError, ActorUnavailableError, GetTimeoutError)
"""What makes a worker count as lost: it died, or a call outlived `call_timeout_s` (hung)."""


def _wanted(config: PipelineConfig, resource: str) -> bool:
    if config.placement == "off":
        return False
    return config.placement == "required" or resource in ray.cluster_resources()


def _tensors(results: list) -> list:
    return [torch.from_numpy(r) if isinstance(r, np.ndarray) else r for r in results]


def _wait_all(refs: list, timeout_s: float | None = None) -> list:
    """ray.get of all refs, failing as soon as any fails (a dead rank would leave the others
    blocked in a collective forever), or with GetTimeoutError once `timeout_s` has passed."""
    pending, deadline = list(refs), None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise GetTimeoutError(f"{len(pending)} of {len(refs)} worker calls still running after {timeout_s} s")
        ray.get(done[0])
    return ray.get(refs)


def _bundle(config: PipelineConfig, gpus: float, resource: str) -> dict:
    """What one worker reserves: its CPUs, GPUs and the custom resource of its kind."""
    bundle = {"CPU": config.cpus_per_worker, "GPU": gpus, resource: 1 if _wanted(config, resource) else 0}
    return {k: v for k, v in bundle.items() if v}


class TargetGroup:
    """`target_tp` ranks of the target in one placement group; rank 0's answer is the result.
    Given `pg`, the ranks take its bundles `first_bundle` onwards and the group never removes it
    (a packed pipeline owns it); otherwise the group makes a STRICT_PACK group of its own."""

    def __init__(self, config: PipelineConfig, pg=None, first_bundle: int = 0) -> None:
        self.config, self.ranks, self.pg = config, [], pg
        self.owns_pg, self.first_bundle = pg is None, first_bundle
        self.lock = threading.Lock()
        self.builds = 0
        self._build()

    def _build(self) -> None:
        cfg, tp = self.config, self.config.target_tp
        bundle = _bundle(cfg, cfg.target_num_gpus, TARGET_RESOURCE)
        if self.owns_pg:
            self.pg = placement_group([bundle] * tp, strategy="STRICT_PACK") if bundle else None
            if self.pg is not None:
                ray.get(self.pg.ready(), timeout=600)
        worker = ray.remote(ModelWorker)
        try:
            # rank 0's node hosts the rendezvous; ask that node for its address and a free port
            master = ray.get(ray.remote(_master_address).options(**self._options(0)).remote()) if tp > 1 else None
            self.ranks = [worker.options(max_restarts=0, **self._options(rank)).remote(
                cfg.target, rank, tp, master, bool(cfg.target_num_gpus)) for rank in range(tp)]
            _wait_all([r.where.remote() for r in self.ranks], cfg.start_timeout_s)
        except Exception:  # a failed (re)build leaves no live ranks or held group behind
            self.shutdown()
            raise
        self.builds += 1

    def _options(self, rank: int) -> dict:
        cfg = self.config
        opts: dict = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.target_num_gpus}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=self.first_bundle + rank)
            if _wanted(cfg, TARGET_RESOURCE):
                opts["resources"] = {TARGET_RESOURCE: 1}
        return opts

    def execute(self, calls: list, released: list[str]) -> list:
        ranks = self.ranks
        try:
            refs = [r.execute.remote(calls, released) for r in ranks]
            return _tensors(_wait_all(refs, self.config.call_timeout_s)[0])
        except LOST as err:
            with self.lock:
                if self.ranks is ranks:  # first to notice rebuilds; the rest just resume
                    log.warning("target rank lost (%s); rebuilding the tensor-parallel group", err)
                    self.shutdown()
                    self._build()
            raise WorkerLost(f"target group lost a rank: {err}") from err

    def shutdown(self) -> None:
        for r in self.ranks:
            try:
                ray.get(r.close.remote(), timeout=10)
            except Exception:  # a dead or hung rank has nothing left to close
                pass
            ray.kill(r)
        self.ranks = []
        if self.pg is not None and self.owns_pg:
            remove_placement_group(self.pg)
            self.pg = None


def _packed_group(config: PipelineConfig, name: str, timeout_s: float = 600.0):
    """One PACK placement group: the draft's bundle (if any), then one per target rank; None
    when no worker reserves anything."""
    try:
        remove_placement_group(ray.util.get_placement_group(name))
    except ValueError:  # no group of that name: nothing left over
        pass
    bundles = [_bundle(config, config.target_num_gpus, TARGET_RESOURCE)] * config.target_tp
    if config.draft is not None:
        bundles.insert(0, _bundle(config, config.draft_num_gpus, DRAFT_RESOURCE))
    if not all(bundles):
        return None
    pg = placement_group(bundles, strategy="PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        remove_placement_group(pg)
        raise RuntimeError(f"no room for a pipeline replica ({bundles}) after {timeout_s:.0f} s; "
                           "the cluster lacks the resources, or the autoscaler did not add them") from err
    return pg


def _master_address() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port()


class ActorExecutor:
    """One Ray actor as an engine executor; a dead actor becomes `WorkerLost` (Ray restarts it)."""

    def __init__(self, actor, restart_timeout_s: float = 300.0, call_timeout_s: float | None = None) -> None:
        self.actor, self.restart_timeout_s, self.call_timeout_s = actor, restart_timeout_s, call_timeout_s

    def execute(self, calls: list, released: list[str]) -> list:
        try:
            return _tensors(ray.get(self.actor.execute.remote(calls, released), timeout=self.call_timeout_s))
        except LOST as err:
            if isinstance(err, GetTimeoutError):  # hung: kill it so Ray restarts a fresh one
                ray.kill(self.actor, no_restart=False)
            self._await_restart()
            raise WorkerLost(str(err)) from err

    def _await_restart(self) -> None:
        """Block until Ray has the actor back (retrying at once would only hear "restarting")."""
        deadline = time.monotonic() + self.restart_timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor.where.remote(), timeout=10)
                return
            except ActorDiedError:
                return  # out of restarts: the request's retry will fail with this error
            except (ActorUnavailableError, RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)


class Coordinator:
    """Owns request state: runs the engine over the workers, many requests at once."""

    def __init__(self, config: PipelineConfig, pg=None) -> None:
        self.config = config
        codec = Codec.load(config.target, "target")
        packed_draft = pg is not None and config.draft is not None
        self.target = TargetGroup(config, pg, first_bundle=int(packed_draft))
        self.draft = None
        if config.draft is not None:
            opts: dict = {"num_cpus": config.cpus_per_worker, "num_gpus": config.draft_num_gpus,
                          "max_restarts": config.max_restarts}
            if _wanted(config, DRAFT_RESOURCE):
                opts["resources"] = {DRAFT_RESOURCE: 1}
            if packed_draft:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
            self.draft = ray.remote(ModelWorker).options(**opts).remote(config.draft)
        self.reward = ray.remote(RewardWorker).options(num_cpus=0, num_gpus=config.reward_num_gpus,
                                                       max_restarts=config.max_restarts).remote(config.reward_device)
        ray.get([a.where.remote() for a in self.workers()])
        timeout = config.call_timeout_s
        draft = ActorExecutor(self.draft, call_timeout_s=timeout) if self.draft else None
        self.engine = Engine(codec, self.target, draft, ActorExecutor(self.reward, call_timeout_s=timeout),
                             config.window_ms / 1000, config.max_retries, config.max_tokens_held,
                             overlap=config.overlap and self.draft is not None, search_ahead=config.search_ahead)

    def workers(self) -> list:
        return [*self.target.ranks, *([self.draft] if self.draft else []), self.reward]

    def ready(self) -> bool:
        return True

    def generate(self, request: Request) -> Generation:
        return self.engine.generate(request)

    def stream(self, request: Request) -> Iterator[str | Generation]:
        yield from self.engine.stream(request)

    def cancel(self, request_id: str) -> bool:
        """Stop a running request; its caches are freed on every worker."""
        return self.engine.cancel(request_id)

    def status(self) -> dict:
        """Requests in flight, cancelled, resumed and quarantined so far, and the caches each worker holds."""
        caches = {name: sum(w["caches"] for w in (ws if isinstance(ws, list) else [ws]))
                  for name, ws in self.placement().items() if name != "reward"}
        return {"running": len(self.engine.running), "cancelled": self.engine.cancelled,
                "retries": self.engine.retries, "quarantined": self.engine.quarantined, "caches": caches}

    def reset_utilisation(self) -> None:
        self.engine.reset_utilisation()

    def utilisation(self) -> dict:
        return {**self.engine.utilisation(), "retries": self.engine.retries, "target_builds": self.target.builds}

    def placement(self) -> dict:
        """Where each worker runs: {"target": [per rank], "draft": ..., "reward": ...}."""
        out = {"target": ray.get([r.where.remote() for r in self.target.ranks]),
               "reward": ray.get(self.reward.where.remote())}
        if self.draft is not None:
            out["draft"] = ray.get(self.draft.where.remote())
        return out

    def actor_handles(self) -> dict:
        return {"target": self.target.ranks, "draft": self.draft, "reward": self.reward}

    def shutdown(self) -> None:
        self.engine.close()
        self.target.shutdown()
        for actor in (self.draft, self.reward):
            if actor is not None:
                ray.kill(actor)


class Pipeline:
    """The front door: start the workers and coordinator on Ray, generate, shut down."""

    def __init__(self, config: PipelineConfig | None = None, address: str | None = None,
                 pack: str | None = None) -> None:
        """`pack`: reserve the draft and every target rank in one PACK placement group of that
        name, so the whole pipeline lands on one node when one node can hold it (a replica of
        the dataset job). A group of that name left by a dead predecessor (Ray scopes groups to
        the job, not to the actor that made them) is removed first. None: each worker is placed
        on its own."""
        self.config = config = config or PipelineConfig()
        check_tensor_parallel(config.target, config.target_tp)
        self.owns_ray = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit` jobs
        if self.owns_ray and address:
            ray.init(address=address, log_to_driver=False)
        elif self.owns_ray:  # a local Ray with at least one logical CPU per worker
            need = config.cpus_per_worker * (config.target_tp + (config.draft is not None))
            ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False,
                     log_to_driver=False)
        start = time.perf_counter()
        self.pg = _packed_group(config, pack) if pack else None
        opts: dict = {"num_cpus": 0, "max_concurrency": config.max_concurrency + 16}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        self.coordinator = ray.remote(Coordinator).options(**opts).remote(config, self.pg)
        ray.get(self.coordinator.ready.remote())
        self.start_s = time.perf_counter() - start

    def generate(self, request: Request) -> Generation:
        return ray.get(self.coordinator.generate.remote(request))

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """All at once (the coordinator batches them); results in input order."""
        return ray.get([self.coordinator.generate.remote(r) for r in requests])

    def stream(self, request: Request) -> Iterator[str | Generation]:
        for ref in self.coordinator.stream.remote(request):
            yield ray.get(ref)

    def cancel(self, request_id: str) -> bool:
        return ray.get(self.coordinator.cancel.remote(request_id))

    def status(self) -> dict:
        return ray.get(self.coordinator.status.remote())

    def utilisation(self, reset: bool = False) -> dict:
        """Per-phase utilisation since the start or the last reset (then start a new window)."""
        out = ray.get(self.coordinator.utilisation.remote())
        if reset:
            ray.get(self.coordinator.reset_utilisation.remote())
        return out

    def placement(self) -> dict:
        return ray.get(self.coordinator.placement.remote())

    def shutdown(self) -> None:
        """Stop the workers and coordinator (and Ray itself, if this pipeline started it)."""
        ray.get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)
        if self.pg is not None:
            remove_placement_group(self.pg)
        if self.owns_ray:
            ray.shutdown()
