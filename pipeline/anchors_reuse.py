"""Reusing stored embeddings in an anchors run: the latest ok ones of the same model, staged per shard.

Staging copies them into the run's scratch folder, one file per selection shard, in one streamed
catalog query; the embed step then embeds only the samples without a staged embedding. A sample whose
latest row is `skipped` (no aligned crop) and whose face did not change since is staged too, with its
reason and no vector: an unchanged status gets no new `embeddings` row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_manifest import Workspace, catalog
from data_manifest.writer import atomic_write, shard_name

REUSE_SQL = catalog.bundled_sql("flows/anchors_reuse")
REUSED_SCHEMA = pa.schema([("sample_id", pa.string()), ("embedding", pa.list_(pa.float32())),
                           ("error", pa.string())])  # error: the reason of a staged `skipped` row


def reused_path(ws: Workspace, run_id: str, shard: str) -> Path:
    """The staged reused embeddings of one shard."""
    return ws.runs_dir / run_id / "reused_embeddings" / f"part-{shard}.parquet"


def stage_reused(ws: Workspace, run_id: str, model_id: str, selection: Path, shard_size: int) -> int:
    """Copy the latest ok stored embeddings of the model for the selection (and unchanged `skipped` rows) into
    per-shard scratch files.

    One streamed catalog query, grouped by selection shard, so memory holds one batch and the selection's
    sample ids; returns the count.
    """
    ids = pq.read_table(selection, columns=["sample_id"]).column("sample_id")
    shard_of = pa.array(np.arange(len(ids), dtype=np.int64) // shard_size)
    sel = pa.table({"sample_id": ids, "shard": shard_of}).group_by(["sample_id", "shard"]).aggregate([])
    folder = reused_path(ws, run_id, "x").parent
    for stale in folder.glob("part-*.parquet"):  # an interrupted staging pass is redone from scratch
        stale.unlink()
    total, current, parts = 0, None, []

    def flush() -> None:
        if current is not None and parts:
            t = pa.Table.from_batches(parts).select(REUSED_SCHEMA.names).cast(REUSED_SCHEMA)
            atomic_write(reused_path(ws, run_id, shard_name(current)), lambda tmp: pq.write_table(t, tmp))

    con = catalog.connect(ws)
    try:
        con.register("_anchors_selection", sel)
        reader = con.sql(REUSE_SQL, params=[model_id, run_id]).to_arrow_reader(65536)
        for batch in reader:
            shard = batch.column("shard").to_numpy(zero_copy_only=False)
            cuts = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(shard)]
            for a, b in zip(cuts[:-1], cuts[1:], strict=False):
                if b <= a:
                    continue
                if int(shard[a]) != current:
                    flush()
                    current, parts = int(shard[a]), []
                parts.append(batch.slice(a, b - a))
                total += b - a
        flush()
    finally:
        con.close()
    return total


def still_to_embed(ws: Workspace, run_id: str, shard: str, sel: pa.Table) -> pa.Table:
    """The shard's samples without a staged reused embedding."""
    reused = reused_path(ws, run_id, shard)
    if not reused.exists():
        return sel
    staged = pq.read_table(reused, columns=["sample_id"]).column("sample_id").combine_chunks()
    return sel.filter(pc.invert(pc.is_in(sel.column("sample_id"), value_set=staged)))
