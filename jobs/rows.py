"""Dataset rows in and out: reading Parquet / JSONL / CommonGen jsonl, checking each row, and the
output columns. A bad row becomes an error message, never an exception that stops the run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from cdsl.config import DecodeConfig
from cdsl.constraints import RewardSpec
from cdsl.errors import RequestError
from cdsl.methods import Generation
from cdsl.request import RequestInput, validation_error
from cdsl.tasks import parse_concepts

OUTPUT = pa.schema([("method", pa.string()), ("error", pa.string()), ("text", pa.string()),
                    ("coverage", pa.float64()), ("finish_reason", pa.string()), ("tokens", pa.int64()),
                    ("target_calls", pa.int64()), ("draft_calls", pa.int64()), ("reward_calls", pa.int64()),
                    ("acceptance", pa.float64()), ("time_s", pa.float64()), ("S1", pa.int64()),
                    ("S2", pa.int64()), ("S3", pa.int64()), ("S4", pa.int64()), ("replica", pa.string())])
"""The columns every output shard adds to the input's."""
STRINGS = pa.list_(pa.string())


@dataclass
class Plan:
    """An input file cut into shards without holding its rows: what the driver of a dataset
    job keeps (per shard a few integers, whatever the input size)."""

    path: str
    rows: int
    """Rows the job covers (after `limit`)."""
    schema: pa.Schema
    """The input columns, `row` (the row's index) first."""
    shards: list[dict] = field(default_factory=list)
    """Per shard: `shard` (its index), `start` and `stop` (row indices), and for JSONL `offset`
    (byte where its first row starts) and `line` (that row's line number)."""


def plan_input(path: str | Path, shard_size: int, limit: int = 0) -> Plan:
    """One streaming pass over the input: row count, schema and shard boundaries. JSONL
    columns other than `concepts` are kept as text, so the pass also collects their names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".parquet":
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"input file {path}: not a readable Parquet file ({err})") from err
        n = min(meta.num_rows, limit or meta.num_rows)
        fields = list(meta.schema.to_arrow_schema())
        shards = [{"shard": i // shard_size, "start": i, "stop": min(i + shard_size, n), "offset": 0, "line": 0}
                  for i in range(0, n, shard_size)]
    elif path.suffix in (".jsonl", ".json"):
        n, shards, keys = 0, [], set()
        with path.open("rb") as f:
            offset = 0
            for number, line in enumerate(f, 1):
                if line.strip() and not (limit and n >= limit):
                    if n % shard_size == 0:
                        shards.append({"shard": n // shard_size, "start": n, "stop": n, "offset": offset,
                                       "line": number})
                    shards[-1]["stop"] = n = n + 1
                    item = _json(line, number)
                    keys.update(k for k in item if k not in ("_error", "row", "concepts"))
                offset += len(line)
        fields = [pa.field("concepts", STRINGS)] + [pa.field(k, pa.string()) for k in sorted(keys)]
    else:
        raise ValueError(f"input file {path}: unsupported format {path.suffix!r} (use .parquet or .jsonl)")
    reserved = {f.name for f in fields} & set(OUTPUT.names)
    if reserved:
        raise ValueError(f"input file {path}: columns {sorted(reserved)} clash with output columns")
    schema = pa.schema([pa.field("row", pa.int64()), *(f for f in fields if f.name != "row")])
    return Plan(str(path), n, schema, shards)


def _json(line: bytes, number: int) -> dict:
    """A JSONL line as a row; a line that is not a JSON object becomes a row whose `_error` says so."""
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return {"_error": f"line {number}: invalid JSON ({getattr(err, 'msg', 'not UTF-8')})"}
    return item if isinstance(item, dict) else {"_error": f"line {number}: not a JSON object"}


def read_shard(path: str | Path, shard: dict) -> list[dict]:
    """The rows of one shard of `plan_input`, each with `row` (its index in the input)."""
    path, start, stop = Path(path), shard["start"], shard["stop"]
    if path.suffix == ".parquet":
        f, rows, first = pq.ParquetFile(path), [], 0
        for group in range(f.num_row_groups):  # read only the row groups the shard overlaps
            size = f.metadata.row_group(group).num_rows
            if first < stop and first + size > start:
                part = f.read_row_group(group).slice(max(start - first, 0), stop - max(start, first))
                rows.extend(part.to_pylist())
            first += size
    else:
        rows = []
        with path.open("rb") as f:
            f.seek(shard["offset"])
            for number, line in enumerate(f, shard["line"]):
                if len(rows) == stop - start:
                    break
                if line.strip():
                    rows.append(_json(line, number))
    for i, row in enumerate(rows, start):
        row["row"] = i
    return rows


def read_rows(path: str | Path) -> tuple[list[dict], pa.Schema]:
    """Every input row in order (a small file; dataset jobs read shard by shard) and the schema."""
    plan = plan_input(path, shard_size=1 << 62)
    return [r for s in plan.shards for r in read_shard(path, s)], plan.schema


def row_input(row: dict, decode: DecodeConfig | None = None) -> RequestInput:
    """The request a row asks for (`RequestInput.build` then applies the prompt rule and the
    limits); RequestError naming the field if the row is malformed."""
    if row.get("_error"):
        raise RequestError("row", row["_error"])
    raw = row.get("concepts", row.get("concept_set"))  # CommonGen's own files say concept_set
    if raw is None:
        raise RequestError("concepts", "missing")
    if not isinstance(raw, (str, list)):
        raise RequestError("concepts", f"must be a list of strings, got {type(raw).__name__}")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError("prompt", f"must be a string, got {type(prompt).__name__}")
    try:
        return RequestInput(prompt=prompt, constraints=RewardSpec(concepts=parse_concepts(raw)),
                            decode=decode or DecodeConfig(), id=f"{(decode or DecodeConfig()).method}-{row.get('row')}")
    except ValidationError as err:
        raise validation_error(err) from None
    except ValueError as err:  # parse_concepts names its own field
        raise RequestError("concepts", str(err).removeprefix("concepts: ")) from None


def _fit(value, kind: pa.DataType):
    """An input value in its column's type: text columns take JSON for non-strings, a concepts
    list that is not a list of strings becomes null (the row's error says why)."""
    if value is None:
        return None
    if kind == pa.string() and not isinstance(value, str):
        return json.dumps(value)
    if kind == STRINGS and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return value


def output_row(row: dict, schema: pa.Schema, method: str, result: Generation | None, error: str | None) -> dict:
    """Input columns plus text, coverage (the generation's final reward: a row's only constraint
    is its concepts), per-row stats and error."""
    out = {f.name: _fit(row.get(f.name), f.type) for f in schema}
    out.update(dict.fromkeys(OUTPUT.names))
    out.update(method=method, error=error)
    if result is not None:
        s = result.stats
        out.update(text=result.text, coverage=result.reward, finish_reason=result.finish_reason,
                   tokens=s.tokens, target_calls=s.target_calls, draft_calls=s.draft_calls,
                   reward_calls=s.reward_calls, acceptance=s.acceptance, time_s=s.time_total, **s.states)
    return out


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Output rows under the input schema plus `OUTPUT`: every shard of a run has the same schema."""
    full = pa.schema([*schema, *OUTPUT])
    return pa.Table.from_pylist(rows, schema=full)
