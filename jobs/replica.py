"""One pipeline replica of the dataset job, as a Ray Data actor: shards in, Parquet shards out.

Ray Data calls a `Replica` with shard descriptors (see `jobs.rows.plan_input`); the replica reads
the shard's rows from the input itself, sends them all to its own coordinator (which batches
them), writes the shard atomically and returns one summary row per shard. A shard is the unit of
exactly-once: its file exists whole or not at all, and a retried shard whose file exists is not
computed again.

Ray Data restarts a replica that dies and retries its shard. A shard that has killed
`MAX_ATTEMPTS` replicas in this run is retried row by row, each row marked before it starts; a
row found marked on the next try is the one that killed the replica, and is recorded as failed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.config import PipelineConfig
from actors.pipeline import Pipeline
from cdsl.errors import RequestError
from cdsl.models import Codec
from jobs.rows import output_row, read_shard, row_input, to_table

MAX_ATTEMPTS = 2
"""Replica deaths a shard may cause before its rows are tried one at a time."""
REPLICA_GROUP = "cdsl-replica-"
"""Name prefix of a replica's placement group; the job run's id and the actor's follow."""


def shard_path(out: Path, method: str, index: int) -> Path:
    return out / method / f"part-{index:05d}.parquet"


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write` to a temporary name beside `path`, then rename: `path` exists whole or not at all,
    and two writers of the same file never mix their bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(tmp)
    os.replace(tmp, path)


class Replica:
    """Owns one pipeline (coordinator, draft worker, target group), packed onto one node when
    the node can hold it."""

    def __init__(self, config: dict, input: str, schema: bytes, output: str, run: str) -> None:
        self.config = PipelineConfig.model_validate(config)
        self.input, self.out, self.run = input, Path(output), run
        self.schema = pa.ipc.read_schema(pa.py_buffer(schema))
        actor = ray.get_runtime_context().get_actor_id()
        self.pipe = Pipeline(self.config, pack=f"{REPLICA_GROUP}{run}-{actor}")
        self.codec = Codec.load(self.config.target, "target")  # task prompts use its chat template
        self.name = actor[:8]
        self.node = self.pipe.placement()["target"][0]["node_id"]
        self.turn, self.active, self.isolating = threading.Condition(), 0, False

    def __call__(self, batch: dict) -> dict:
        summaries = [self.shard({k: v[i] for k, v in batch.items()}) for i in range(len(batch["shard"]))]
        return {k: [s[k] for s in summaries] for k in summaries[0]}

    def shard(self, shard: dict) -> dict:
        """Generate, write and summarise one shard (nothing, if an earlier try wrote it)."""
        method, index = str(shard["method"]), int(shard["shard"])
        path = shard_path(self.out, method, index)
        start = time.time()
        if path.exists():
            meta = pq.read_metadata(path)
            return self._summary(method, index, meta.num_rows, 0, start, fresh=False)
        tries = self._attempt(method, index)
        rows = read_shard(self.input, {k: int(shard[k]) for k in ("start", "stop", "offset", "line")})
        if tries["attempts"] > MAX_ATTEMPTS:
            with self._alone():
                out = self._one_by_one(method, rows, tries)
        else:
            with self._shared():
                out = self._together(method, rows)
        table = to_table(sorted(out, key=lambda r: r["row"]), self.schema)
        write_whole(path, lambda tmp: pq.write_table(table, tmp))
        self._attempts_path(method, index).unlink(missing_ok=True)
        return self._summary(method, index, len(out), sum(r["tokens"] or 0 for r in out), start, fresh=True)

    @contextmanager
    def _shared(self) -> Iterator[None]:
        """Shards run side by side unless one is being tried row by row."""
        with self.turn:
            self.turn.wait_for(lambda: not self.isolating)
            self.active += 1
        try:
            yield
        finally:
            with self.turn:
                self.active -= 1
                self.turn.notify_all()

    @contextmanager
    def _alone(self) -> Iterator[None]:
        """Nothing else in flight, so a death while a row runs is that row's doing."""
        with self.turn:
            self.turn.wait_for(lambda: not self.isolating)
            self.isolating = True
            self.turn.wait_for(lambda: self.active == 0)
        try:
            yield
        finally:
            with self.turn:
                self.isolating = False
                self.turn.notify_all()

    def _summary(self, method: str, index: int, rows: int, tokens: int, start: float, fresh: bool) -> dict:
        return {"method": method, "shard": index, "rows": rows, "tokens": tokens,
                "replica": self.name, "node": self.node, "start": start, "end": time.time(), "fresh": fresh}

    def _row(self, method: str, row: dict, result=None, error: str | None = None) -> dict:
        out = output_row(row, self.schema, method, result, error)
        out["replica"] = self.name
        return out

    def _submit(self, method: str, row: dict):
        """The row's checked request sent to the coordinator, or its output row if the check failed."""
        decode = self.config.decode.model_copy(update={"method": method})
        try:
            request = row_input(row, decode).build(self.codec, self.config.limits, self.config.draft is not None)
        except RequestError as err:
            return self._row(method, row, error=str(err))
        return self.pipe.coordinator.generate.remote(request)

    def _collect(self, method: str, row: dict, ref) -> dict:
        try:
            return self._row(method, row, ray.get(ref))
        except ray.exceptions.RayTaskError as err:  # this row failed; the others go on
            return self._row(method, row, error=f"generation failed: {err.cause!r}")

    def _together(self, method: str, rows: list[dict]) -> list[dict]:
        """All rows in flight at once, so the coordinator's batches stay full."""
        sent = [(row, self._submit(method, row)) for row in rows]
        return [s if isinstance(s, dict) else self._collect(method, row, s) for row, s in sent]

    def _one_by_one(self, method: str, rows: list[dict], tries: dict) -> list[dict]:
        tries["blamed"] = tries.get("blamed", []) + tries["started"]  # in flight when the replica died
        tries["started"] = []
        blamed = set(tries["blamed"])
        out = []
        for row in rows:
            if row["row"] in blamed:
                out.append(self._row(method, row, error=f"row killed its replica ({MAX_ATTEMPTS + 1} tries); skipped"))
                continue
            tries["started"].append(row["row"])  # marked while it runs: if the replica dies now, it is to blame
            self._save_attempts(method, tries)
            sent = self._submit(method, row)
            out.append(sent if isinstance(sent, dict) else self._collect(method, row, sent))
            tries["started"].remove(row["row"])
            self._save_attempts(method, tries)
        return out

    def _attempts_path(self, method: str, index: int) -> Path:
        return self.out / "_attempts" / method / f"part-{index:05d}.json"

    def _attempt(self, method: str, index: int) -> dict:
        """Count this try of the shard (tries from an earlier run of the job do not count)."""
        path = self._attempts_path(method, index)
        tries = json.loads(path.read_text()) if path.exists() else {}
        if tries.get("run") != self.run:
            tries = {"run": self.run, "shard": index, "attempts": 0, "started": []}
        tries["attempts"] += 1
        self._save_attempts(method, tries)
        return tries

    def _save_attempts(self, method: str, tries: dict) -> None:
        write_whole(self._attempts_path(method, tries["shard"]), lambda tmp: tmp.write_text(json.dumps(tries)))

    def __del__(self) -> None:
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            try:
                pipe.shutdown()
            except Exception:  # Ray may already be tearing the job down
                pass

