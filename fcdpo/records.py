"""The one record type for a sampled chain, from sampling through labelling to pairs and evaluation.

Serialises losslessly to JSONL (one record per line) and to parquet (nested fields as JSON text columns,
so the answer's type, e.g. int vs "5" vs True, survives the round trip).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

Scalar = bool | int | float | str | None


class Message(BaseModel):
    """One turn after the prompt: the model's reply (assistant) or the environment's result (user)."""

    role: Literal["assistant", "user"]
    content: str
    failed: bool = Field(False, description="part of a failed try: an invalid reply or its error message")


class CallRecord(BaseModel):
    """One successfully parsed and executed call."""

    name: str
    arguments: dict[str, Scalar]
    output: str


class ChainRecord(BaseModel):
    problem_id: str
    task: str
    sample_index: int
    seed: int
    prompt_hash: str
    model_id: str
    toolset: str
    messages: list[Message] = Field(default_factory=list)
    calls: list[CallRecord] = Field(default_factory=list)
    answer: Scalar = None
    answered: bool = False
    stop_reason: str = "running"  # stop | step_limit | try_limit | aborted
    n_steps: int = 0
    n_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    verdict: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem_id, self.sample_index)


_JSON_COLUMNS = ("messages", "calls", "answer", "meta")


def write_jsonl(records: Iterable[ChainRecord], path: str | Path, append: bool = False) -> int:
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[ChainRecord]:
    """Read records; a torn last line (no trailing newline, from a killed writer) is dropped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            if line.strip():
                yield ChainRecord.model_validate_json(line)


def _to_row(r: ChainRecord) -> dict[str, Any]:
    d = r.model_dump(mode="json")
    for c in _JSON_COLUMNS:
        d[c] = json.dumps(d[c], ensure_ascii=False)
    return d


def write_parquet(records: Iterable[ChainRecord], path: str | Path, batch_size: int = 4096) -> int:
    writer: pq.ParquetWriter | None = None
    n = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        table = pa.Table.from_pylist(batch, schema=PARQUET_SCHEMA)
        if writer is None:
            writer = pq.ParquetWriter(str(path), PARQUET_SCHEMA)
        writer.write_table(table)
        batch.clear()

    try:
        for r in records:
            batch.append(_to_row(r))
            n += 1
            if len(batch) >= batch_size:
                flush()
        if batch or writer is None:
            flush()
    finally:
        if writer is not None:
            writer.close()
    return n


def read_parquet(path: str | Path) -> Iterator[ChainRecord]:
    pf = pq.ParquetFile(str(path))
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            for c in _JSON_COLUMNS:
                row[c] = json.loads(row[c])
            yield ChainRecord.model_validate(row)


def read_records(path: str | Path) -> Iterator[ChainRecord]:
    p = Path(path)
    return read_parquet(p) if p.suffix == ".parquet" else read_jsonl(p)


PARQUET_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("task", pa.string()),
        ("sample_index", pa.int64()),
        ("seed", pa.int64()),
        ("prompt_hash", pa.string()),
        ("model_id", pa.string()),
        ("toolset", pa.string()),
        ("messages", pa.string()),
        ("calls", pa.string()),
        ("answer", pa.string()),
        ("answered", pa.bool_()),
        ("stop_reason", pa.string()),
        ("n_steps", pa.int64()),
        ("n_failed", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("verdict", pa.string()),
        ("meta", pa.string()),
    ]
)
