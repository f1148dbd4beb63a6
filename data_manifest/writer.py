"""The sharded, atomic Parquet writer: the only code that writes manifest rows."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_manifest.schemas import schema
from data_manifest.workspace import Workspace

_SHARD_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_name(value: str, what: str) -> str:
    """Refuse names that would escape or break the directory layout."""
    if not value or not _SHARD_RE.match(value) or value in (".", ".."):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '_', '-' and '.' only")
    return value


def shard_name(shard: str | int, prefix: str | None = None) -> str:
    """The one shard-name format: shard k is ``00000``-style (``<prefix>-00003`` with a prefix); names pass through."""
    name = f"{shard:05d}" if isinstance(shard, int) else check_name(shard, "shard name")
    return f"{check_name(prefix, 'shard prefix')}-{name}" if prefix else name


def atomic_write(path: Path, write: Any) -> Path:
    """Call write(tmp_path), then rename tmp into `path`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def to_table(table: str, rows: Iterable[Mapping[str, Any]] | pa.Table, run_id: str) -> pa.Table:
    """Validate rows against the table schema, filling run_id and created_at."""
    sch = schema(table)
    if isinstance(rows, pa.Table):
        rows = rows.to_pylist()
    now = datetime.now(UTC)
    filled = []
    known = set(sch.names)
    for i, row in enumerate(rows):
        extra = set(row) - known
        if extra:
            raise ValueError(f"{table} row {i}: unknown column(s) {sorted(extra)}; schema has {sch.names}")
        r = dict(row)
        r["run_id"] = run_id
        r.setdefault("created_at", now)
        for f in sch:
            if not f.nullable and r.get(f.name) is None:
                raise ValueError(f"{table} row {i}: required column {f.name!r} is missing or null")
        filled.append(r)
    try:
        return pa.Table.from_pylist(filled, schema=sch)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise ValueError(f"{table}: rows do not fit the schema: {e}") from e


class ShardWriter:
    """Writes one run's shards of one table as manifests/<table>/run=<run_id>/part-<shard>.parquet."""

    def __init__(self, ws: Workspace, table: str, run_id: str) -> None:
        schema(table)
        self.ws = ws
        self.table = table
        self.run_id = check_name(run_id, "run id")
        self.dir = ws.table_dir(table, run_id)

    def path(self, shard: str | int) -> Path:
        return self.dir / f"part-{shard_name(shard)}.parquet"

    def write(self, shard: str | int, rows: Iterable[Mapping[str, Any]] | pa.Table) -> Path | None:
        """Write (or atomically replace) one shard; returns its path, or None for no rows."""
        tbl = to_table(self.table, rows, self.run_id)
        if tbl.num_rows == 0:
            return None
        return atomic_write(self.path(shard), lambda tmp: pq.write_table(tbl, tmp, compression="zstd"))

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))
