"""The streamed passes of an anchors run over its selection shards, after the embed step.

centers (per-identity sums of the current identities per shard, a shard task each, merged in shard order
by the flow), search (a shard task each: ccs, nnccs, nearest negative and raw per shard against the merged
centers, persisted in the run's scratch folder), range (the global min/max over the persisted shards) and
normalise (one `anchors` shard per selection shard); then the run's tally. Each works on one shard at a
time, so memory holds one shard plus the centers. The shard tasks read and write only workspace files, so
they run on any runner's workers (a Dask cluster's included) with the same results as in one process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
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


def centers_path(ws: Workspace, run_id: str, shard: str) -> Path:
    """One shard's per-identity embedding sums."""
    return ws.runs_dir / run_id / "anchor_centers" / f"part-{shard}.parquet"


def state_path(ws: Workspace, run_id: str) -> Path:
    """The merged centers the search tasks load (StreamingAnchors.search_state)."""
    return ws.runs_dir / run_id / "anchor_search.npz"


def center_sums(ws: Workspace, run_id: str, shard: str, sel: pa.Table, dim: int) -> dict[str, int]:
    """A shard task: one shard's per-identity sums of its ok embeddings, written for the merge."""
    tbl, emb, ok = shard_embeddings(ws, run_id, shard, sel, dim)
    ids, sums, counts = A.shard_sums(emb, identities(tbl), ok)
    flat = pa.array(sums.reshape(-1), pa.float64())
    table = pa.table({"identity": pa.array(ids, pa.int64()), "count": pa.array(counts, pa.int64()),
                      "sum": pa.FixedSizeListArray.from_arrays(flat, sums.shape[1])})
    atomic_write(centers_path(ws, run_id, shard), lambda tmp: pq.write_table(table, tmp))
    return {"identities": len(ids)}


def merge_centers(steps: A.StreamingAnchors, ws: Workspace, run_id: str, shards: list[str]) -> None:
    """In the flow: add every shard's sums to the centers, in shard order (the same sums on every runner)."""
    for shard in shards:
        t = pq.read_table(ws.local(centers_path(ws, run_id, shard)))
        col = t.column("sum").combine_chunks()
        sums = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        steps.add_sums(t.column("identity").to_numpy(), sums, t.column("count").to_numpy())


def save_state(steps: A.StreamingAnchors, ws: Workspace, run_id: str) -> Path:
    """In the flow: the merged centers, for the search tasks."""
    path = state_path(ws, run_id)
    state = steps.search_state()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **state)

    atomic_write(path, write)
    return path


@lru_cache(maxsize=2)
def _searcher(path: str, stamp: int, options: tuple[tuple[str, Any], ...]) -> A.StreamingAnchors:
    """The search of a saved state, built once per process (and file version)."""
    with np.load(path, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    return A.StreamingAnchors.for_search(state, **dict(options))


def search_shard(ws: Workspace, run_id: str, shard: str, sel: pa.Table, dim: int, state: Path,
                 **options: Any) -> dict[str, int]:
    """A shard task: search one shard's nearest negative centers (the saved state) and persist its stats."""
    tbl, emb, ok = shard_embeddings(ws, run_id, shard, sel, dim)
    steps = _searcher(str(state), state.stat().st_mtime_ns, tuple(sorted(options.items())))
    with MODEL_LOCK:
        stats = steps.search(emb, identities(tbl), ok)
    table = A.stats_table(tbl.column("sample_id"), identities(tbl), stats, tbl.column("error").to_pylist())
    atomic_write(stats_path(ws, run_id, shard), lambda tmp: pq.write_table(table, tmp))
    return {"searched": table.num_rows}


def norm_range(steps: A.StreamingAnchors, ws: Workspace, run_id: str, shards: list[str]) -> tuple[float, float]:
    """The global min/max of raw over the valid rows of every persisted shard."""
    for shard in shards:
        st = pq.read_table(ws.local(stats_path(ws, run_id, shard)), columns=["raw", "status"])
        steps.observe(st.column("raw").to_numpy(zero_copy_only=False),
                      st.column("status").to_numpy(zero_copy_only=False))
    return steps.norm_range()


def write_anchors(ws: Workspace, run_id: str, shard: str, lo: float, hi: float, model_id: str,
                  source: str) -> dict[str, int]:
    """Normalise one shard's persisted stats with the global range and write its `anchors` file."""
    st = pq.read_table(ws.local(stats_path(ws, run_id, shard)))
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
