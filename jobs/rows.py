"""Dataset rows in and out: reading Parquet / JSONL / CommonGen jsonl, checking each row, and the
output columns. A bad row becomes an error message, never an exception that stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from cdsl.methods import Generation
from cdsl.rewards import RewardSpec, coverage
from cdsl.tasks import commongen_prompt, parse_concepts

MAX_PROMPT_CHARS = 4000
"""Longest prompt a row may carry."""
MAX_CONCEPTS = 64
"""Most concepts a row may ask for."""


OUTPUT = pa.schema([("method", pa.string()), ("error", pa.string()), ("text", pa.string()),
                    ("coverage", pa.float64()), ("finish_reason", pa.string()), ("tokens", pa.int64()),
                    ("target_calls", pa.int64()), ("draft_calls", pa.int64()), ("reward_calls", pa.int64()),
                    ("acceptance", pa.float64()), ("time_s", pa.float64()), ("S1", pa.int64()),
                    ("S2", pa.int64()), ("S3", pa.int64()), ("S4", pa.int64())])
"""The columns every output shard adds to the input's."""
STRINGS = pa.list_(pa.string())


def read_rows(path: str | Path) -> tuple[list[dict], pa.Schema]:
    """Every input row as a dict, in order, with `row` (its index), and the input columns'
    schema. A JSONL line that is not a JSON object becomes a row whose `error` says so; JSONL
    columns other than `concepts` are kept as text (JSON-encoded when not a string)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        rows, fields = table.to_pylist(), list(table.schema)
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                rows.append(item if isinstance(item, dict) else {"_error": f"line {n}: not a JSON object"})
            except json.JSONDecodeError as err:
                rows.append({"_error": f"line {n}: invalid JSON ({err.msg})"})
        keys = sorted({k for r in rows for k in r if k not in ("_error", "row", "concepts")})
        fields = [pa.field("concepts", STRINGS)] + [pa.field(k, pa.string()) for k in keys]
    else:
        raise ValueError(f"input file {path}: unsupported format {path.suffix!r} (use .parquet or .jsonl)")
    for i, row in enumerate(rows):
        row["row"] = i
    names = {f.name for f in fields}
    reserved = names & set(OUTPUT.names)
    if reserved:
        raise ValueError(f"input file {path}: columns {sorted(reserved)} clash with output columns")
    return rows, pa.schema([pa.field("row", pa.int64()), *(f for f in fields if f.name != "row")])


def check_row(row: dict, tokenizer=None) -> tuple[str, RewardSpec]:
    """The prompt (the task prompt for `tokenizer` when the row has none) and constraints of a
    row; ValueError naming the field and the limit if bad."""
    if row.get("_error"):
        raise ValueError(row["_error"])
    raw = row.get("concepts", row.get("concept_set"))  # CommonGen's own files say concept_set
    if raw is None:
        raise ValueError("concepts: missing")
    if not isinstance(raw, (str, list)):
        raise ValueError(f"concepts: must be a list of strings, got {type(raw).__name__}")
    concepts = parse_concepts(raw)
    if len(concepts) > MAX_CONCEPTS:
        raise ValueError(f"concepts: {len(concepts)} given, the limit is {MAX_CONCEPTS}")
    prompt = row.get("prompt")
    if prompt is None or prompt == "":
        prompt = commongen_prompt(concepts, tokenizer)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt: {len(prompt)} characters, the limit is {MAX_PROMPT_CHARS}")
    try:
        return prompt, RewardSpec(concepts=concepts)
    except ValidationError as err:
        raise ValueError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())) from err


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


def output_row(row: dict, schema: pa.Schema, method: str, result: Generation | None, error: str | None,
               concepts: list[str] | None) -> dict:
    """Input columns plus text, coverage, per-row stats and error."""
    out = {f.name: _fit(row.get(f.name), f.type) for f in schema}
    out.update(dict.fromkeys(OUTPUT.names))
    out.update(method=method, error=error)
    if result is not None:
        s = result.stats
        out.update(text=result.text, coverage=coverage(result.text, concepts), finish_reason=result.finish_reason,
                   tokens=s.tokens, target_calls=s.target_calls, draft_calls=s.draft_calls,
                   reward_calls=s.reward_calls, acceptance=s.acceptance, time_s=s.time_total, **s.states)
    return out


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Output rows under the input schema plus `OUTPUT`: every shard of a run has the same schema."""
    full = pa.schema([*schema, *OUTPUT])
    return pa.Table.from_pylist(rows, schema=full)
