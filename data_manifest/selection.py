"""A run's selection: the rows it works on, frozen once into runs/<run_id>/selection.parquet.

The selection query runs once, at a run's first attempt, on a checked read-only catalog connection;
its rows are streamed into one Parquet row group per shard, so memory holds one shard whatever the
total, and a resume reads the same rows back (samples added later never enter it). Shard k of the
run is row group k, named ``shard_name(k)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from data_manifest import catalog
from data_manifest.workspace import Workspace
from data_manifest.writer import atomic_write, shard_name

SELECTION_FILE = "selection.parquet"


def selection_path(ws: Workspace, run_id: str) -> Path:
    """Where a run's frozen selection lives."""
    return ws.runs_dir / run_id / SELECTION_FILE


def write_row_groups(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], shard_size: int) -> None:
    """Atomically write record batches (cast to `schema`) as row groups of exactly shard_size rows (the last may be
    shorter): row group k is shard k, and memory holds one shard whatever the total."""

    def write(tmp: Path) -> None:
        pending: list[pa.RecordBatch] = []
        n_pending = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                pending.append(batch.cast(schema) if batch.schema != schema else batch)
                n_pending += batch.num_rows
                while n_pending >= shard_size:
                    tbl = pa.Table.from_batches(pending, schema)
                    writer.write_table(tbl.slice(0, shard_size), row_group_size=shard_size)
                    rest = tbl.slice(shard_size)
                    pending, n_pending = rest.to_batches(), rest.num_rows
            if n_pending:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=shard_size)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _sharded(path: Path, shard_size: int) -> bool:
    meta = pq.read_metadata(path)
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return all(n == shard_size for n in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= shard_size)


def freeze_selection(ws: Workspace, run_id: str, sql: str, shard_size: int, *, what: str = "the selection query",
                     schema: pa.Schema | None = None, required: tuple[str, ...] = ("sample_id",)) -> Path:
    """The run's selection file, one row group per shard: queried and written at the first attempt, read back after.

    The query must be one statement returning the `required` columns (cast to `schema` when given); `what` names
    it in errors. A selection frozen in other row groups by an earlier version is re-chunked in a streamed pass.
    """
    path = selection_path(ws, run_id)
    if path.exists():
        if not _sharded(path, shard_size):
            write_row_groups(path, pq.read_schema(path), pq.ParquetFile(path).iter_batches(shard_size), shard_size)
        return path
    with catalog.UserSQL(ws, sql, history=False) as q:  # runs its one statement only
        if len(q.statements) != 1:
            raise ValueError(f"{what} must be a single query, got {len(q.statements)} statements")
        with q.watch() as con:
            try:
                reader = con.sql(q.statements[0]).to_arrow_reader(batch_size=shard_size)
            except (duckdb.InterruptException, duckdb.OutOfMemoryException):
                raise  # the time or memory limit: watch() says which
            except duckdb.Error as e:
                raise ValueError(f"{what} failed: {e}\nSQL: {sql}") from e
            missing = [c for c in required if c not in reader.schema.names]
            if missing:
                raise ValueError(f"{what} must return {sorted(missing)} too")
            write_row_groups(path, schema or reader.schema, reader, shard_size)
    return path


def selection_shards(path: str | Path) -> dict[str, int]:
    """Shard name -> row group of a frozen selection."""
    return {shard_name(i): i for i in range(pq.ParquetFile(path).num_row_groups)}


def read_shard(path: str | Path, row_group: int, columns: list[str] | None = None) -> pa.Table:
    """One shard (row group) of a frozen selection."""
    return pq.ParquetFile(path).read_row_group(row_group, columns=columns)


def task_shard(ws_root: str, ref: str, row_group: int) -> pa.Table:
    """In a shard task: one shard of the frozen selection the flow handed over as `ref` (Workspace.share)."""
    return read_shard(Workspace(ws_root).local(ref), row_group)


def selected_rows(path: str | Path) -> int:
    """How many rows a frozen selection holds."""
    return pq.ParquetFile(path).metadata.num_rows
