"""The streamed passes of an anchors run over its selection shards, after the embed step.

centers (per-identity sums of the current identities), search (ccs, nnccs, nearest negative and raw
per shard, persisted in the run's scratch folder), range (the global min/max over the persisted
shards) and normalise (one `anchors` shard per selection shard); then the run's tally. Each works on
one shard at a time, so memory holds one shard plus the centers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_manifest import ShardWriter, Workspace
from data_manifest.writer import atomic_write
from pipeline import anchors as A
from pipeline.anchors_embed import MODEL_LOCK
from pipeline.anchors_inputs import identities, shard_embeddings
from pipeline.anchors_reuse import reused_path


def stats_path(ws: Workspace, run_id: str, shard: str) -> Path:
    """The persisted search results of one shard."""
    return ws.runs_dir / run_id / "anchor_stats" / f"part-{shard}.parquet"


def add_centers(steps: A.StreamingAnchors, ws: Workspace, run_id: str, shard: str, sel: pa.Table, dim: int) -> None:
    """Add one shard's embeddings to the per-identity center sums."""
    tbl, emb, ok = shard_embeddings(ws, run_id, shard, sel, dim)
    steps.add(emb, identities(tbl), ok)


def search_shard(steps: A.StreamingAnchors, ws: Workspace, run_id: str, shard: str, sel: pa.Table, dim: int) -> None:
    """Search one shard's nearest negative centers and persist its stats for the normalisation pass."""
    tbl, emb, ok = shard_embeddings(ws, run_id, shard, sel, dim)
    with MODEL_LOCK:
        stats = steps.search(emb, identities(tbl), ok)
    table = A.stats_table(tbl.column("sample_id"), identities(tbl), stats, tbl.column("error").to_pylist())
    atomic_write(stats_path(ws, run_id, shard), lambda tmp: pq.write_table(table, tmp))


def norm_range(steps: A.StreamingAnchors, ws: Workspace, run_id: str, shards: list[str]) -> tuple[float, float]:
    """The global min/max of raw over the valid rows of every persisted shard."""
    for shard in shards:
        st = pq.read_table(stats_path(ws, run_id, shard), columns=["raw", "status"])
        steps.observe(st.column("raw").to_numpy(zero_copy_only=False),
                      st.column("status").to_numpy(zero_copy_only=False))
    return steps.norm_range()


def write_anchors(ws: Workspace, run_id: str, shard: str, lo: float, hi: float, model_id: str,
                  source: str) -> dict[str, int]:
    """Normalise one shard's persisted stats with the global range and write its `anchors` file."""
    st = pq.read_table(stats_path(ws, run_id, shard))
    ShardWriter(ws, "anchors", run_id).write(shard, A.anchor_table(st, lo, hi, model_id, source))
    return {"anchors": st.num_rows}


def tally(ws: Workspace, run_id: str, shards: list[str]) -> dict[str, Any]:
    """The run's counts: selected samples, embeddings reused and computed, and anchors rows per status."""
    statuses: dict[str, int] = {}
    reused = computed = selected = 0
    for shard in shards:
        if reused_path(ws, run_id, shard).exists():  # staged rows with a vector (not the unchanged skipped ones)
            emb = pq.read_table(reused_path(ws, run_id, shard), columns=["embedding"]).column("embedding")
            reused += len(emb) - emb.null_count
        emb_path = ShardWriter(ws, "embeddings", run_id).path(shard)
        if emb_path.exists():
            status = pq.read_table(emb_path, columns=["status"]).column("status")
            computed += int(pc.sum(pc.equal(status, A.OK)).as_py() or 0)
        st = pq.read_table(stats_path(ws, run_id, shard), columns=["status"])
        selected += st.num_rows
        for s in st.column("status").value_counts().to_pylist():
            statuses[s["values"]] = statuses.get(s["values"], 0) + s["counts"]
    return {"selected": selected, "embeddings_reused": reused, "embeddings_computed": computed,
            "status_counts": statuses}
