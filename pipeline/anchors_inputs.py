"""What an anchors pass reads for one selection shard: its vectors, in selection order, and current identities.

Vectors come from the run's `embeddings` shard and, with reuse, from the staged stored ones; the
identity is always the selection's (latest `samples.identity`), never the one stored with an embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_manifest import ShardWriter, Workspace
from pipeline.anchors_reuse import reused_path


def vectors(col: pa.ChunkedArray | pa.Array, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 rows of a list<float32> column (NaN where null) and the non-null mask."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    ok = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    emb = np.full((len(col), max(dim, 1)), np.nan, dtype=np.float32)
    if ok.any():
        good = col.filter(pa.array(ok))
        lengths = pc.list_value_length(good).to_numpy(zero_copy_only=False)
        if (lengths != dim).any():
            raise ValueError(f"{where}: embeddings of length {sorted(set(lengths.tolist()) - {dim})} where the "
                             f"recogniser gives {dim}")
        emb[ok] = good.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(int(ok.sum()), dim)
    return emb, ok


def identities(tbl: pa.Table) -> np.ndarray:
    """The `identity` column as int64, -1 where unknown."""
    ids = tbl.column("identity").to_numpy(zero_copy_only=False)
    return np.where(np.isnan(ids.astype(np.float64)), -1, ids).astype(np.int64)


def selected_identities(path: Path) -> np.ndarray:
    """The sorted distinct identities of a frozen selection, one row group at a time (memory: the identities)."""
    f = pq.ParquetFile(path)
    seen = np.empty(0, dtype=np.int64)
    for i in range(f.num_row_groups):
        seen = np.union1d(seen, identities(f.read_row_group(i, columns=["identity"])))
    return seen


def shard_embeddings(ws: Workspace, run_id: str, shard: str, sel: pa.Table,
                     dim: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """One selection shard in selection order: (sample_id, current identity, error), (n, D) vectors, ok mask."""
    ids, vecs, oks, errors = [], [], [], []
    sources = [(ShardWriter(ws, "embeddings", run_id).path(shard), ["sample_id", "embedding", "error"]),
               (reused_path(ws, run_id, shard), None)]
    for path, columns in sources:
        if ws.local(path).exists():  # a store's workspace: pulled when another worker wrote it
            t = pq.read_table(path, columns=columns)
            e, ok = vectors(t.column("embedding"), dim, str(path))
            ids.append(t.column("sample_id").combine_chunks())
            vecs.append(e)
            oks.append(ok)
            errors += t.column("error").to_pylist() if "error" in t.column_names else [None] * t.num_rows
    n = sel.num_rows
    emb = np.full((n, max(dim, 1)), np.nan, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    err: list[str | None] = ["no embedding row for this sample in the run (its shard files are missing)"] * n
    if ids:
        pos = pc.index_in(sel.column("sample_id"), value_set=pa.concat_arrays(ids)).to_numpy(zero_copy_only=False)
        found = ~np.isnan(pos.astype(np.float64))
        src = pos[found].astype(np.int64)
        all_emb, all_ok = np.concatenate(vecs), np.concatenate(oks)
        emb[found], ok[found] = all_emb[src], all_ok[src]
        for j, k in zip(np.flatnonzero(found).tolist(), src.tolist(), strict=True):
            err[j] = None if all_ok[k] else errors[k]
    tbl = pa.table({"sample_id": sel.column("sample_id"), "identity": pa.array(identities(sel), pa.int64()),
                    "error": pa.array(err, pa.string())})
    return tbl, emb, ok
