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
import pyarrow.compute as pc
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


Rows = Iterable[Mapping[str, Any]] | pa.Table | pa.RecordBatch


def to_table(table: str, rows: Rows, run_id: str) -> pa.Table:
    """Validate rows against the table schema, filling run_id and created_at.

    Arrow tables and record batches are checked and cast column by column (no Python row objects);
    an iterable of dicts is checked row by row.
    """
    sch = schema(table)
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if isinstance(rows, pa.Table):
        return _arrow_table(table, sch, rows, run_id)
    return _dict_table(table, sch, rows, run_id)


def _dict_table(table: str, sch: pa.Schema, rows: Iterable[Mapping[str, Any]], run_id: str) -> pa.Table:
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


def _arrow_table(table: str, sch: pa.Schema, tbl: pa.Table, run_id: str) -> pa.Table:
    """The Arrow path of to_table: the same checks and messages as the dict path, computed per column."""
    names = tbl.column_names
    extra = sorted(set(names) - set(sch.names))
    if extra:
        raise ValueError(f"{table}: unknown column(s) {extra}; schema has {sch.names}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"{table}: duplicate column(s) {dup}")
    n = tbl.num_rows
    cols: list[pa.ChunkedArray | pa.Array] = []
    for f in sch:
        if f.name == "run_id":
            col: pa.ChunkedArray | pa.Array = pa.repeat(pa.scalar(run_id, f.type), n)
        elif f.name not in names:
            col = pa.repeat(pa.scalar(datetime.now(UTC), f.type), n) if f.name == "created_at" else pa.nulls(n, f.type)
        else:
            col = tbl.column(f.name)
            if not col.type.equals(f.type):
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                    raise ValueError(f"{table}: column {f.name!r} of type {col.type} cannot be cast to "
                                     f"{f.type}: {e}") from e
        if not f.nullable and n and col.null_count:
            first = pc.index(pc.is_null(col), True).as_py()
            raise ValueError(f"{table} row {first}: required column {f.name!r} is missing or null")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=sch)


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

    def write(self, shard: str | int, rows: Rows) -> Path | None:
        """Write (or atomically replace) one shard of dict rows, an Arrow table or a record batch; None for no rows."""
        tbl = to_table(self.table, rows, self.run_id)
        if tbl.num_rows == 0:
            return None
        return atomic_write(self.path(shard), lambda tmp: pq.write_table(tbl, tmp, compression="zstd"))

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))
