"""One shard of an ingest run: read, validate and write its `samples` rows (runs in a flow's compute pool).

A pool worker (`flows.runners.compute_pool`) imports this module to run it, so it imports no Prefect
and no flow module: only the readers, the sample checks and the manifest writer. It returns the counts
its commit record keeps; the runtime marks the shard done in the flow's process.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from data_manifest.schemas import schema
from data_manifest.workspace import Workspace
from data_manifest.writer import ShardWriter
from pipeline.readers import DatasetReader, Shard
from pipeline.samples import sample_columns, status_counts

# The columns sample rows carry (the writer adds run_id and created_at and checks the required ones).
SAMPLE_ROW_SCHEMA = pa.schema([f.with_nullable(True) for f in schema("samples")
                               if f.name not in ("run_id", "created_at")])


def ingest_samples(ws_root: str, run_id: str, shard: str, item: Shard, *, reader: DatasetReader, dataset: str,
                   max_pixels: int) -> dict[str, Any]:
    """Read, validate and write one shard of `samples` rows; returns its per-status counts."""
    cols = sample_columns(dataset, reader.read(item), max_pixels=max_pixels)
    ShardWriter(Workspace(ws_root), "samples", run_id).write(shard, pa.table(cols, schema=SAMPLE_ROW_SCHEMA))
    return status_counts(cols["status"])
