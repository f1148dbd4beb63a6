"""A verification benchmark's samples embedded (cached in the manifest `embeddings` table) and scored by our model."""

from __future__ import annotations

import numpy as np

from data_manifest import ShardWriter, Workspace, catalog
from data_manifest.writer import shard_name
from pipeline.evaluation.verification_sets import Benchmark, Embedded, crop_batches, safe_name


def cached_embeddings(ws: Workspace, ids: list[str], model_id: str) -> dict[str, np.ndarray]:
    """Latest OK embeddings of these samples for this model from the manifest."""
    if not ids:
        return {}
    tbl = catalog.query(ws, catalog.bundled_sql("flows/cached_embeddings"), [model_id])
    wanted = set(ids)
    out = {}
    for sid, emb in zip(tbl.column("sample_id").to_pylist(), tbl.column("embedding").to_pylist(), strict=True):
        if sid in wanted:
            out[sid] = np.asarray(emb, dtype=np.float32)
    return out


def embed_benchmark(
    bench: Benchmark,
    keys: list[str],
    *,
    ws: Workspace,
    run_id: str,
    fr_model: str,
    device: str = "auto",
    batch_size: int = 64,
    use_cache: bool = True,
) -> Embedded:
    """Embed every sample, reusing embeddings cached in the manifest and writing the new ones (failures too)."""
    from models.recognition import build_recognizer
    from pipeline.ids import sample_id

    recognizer = build_recognizer(fr_model, device=device)
    dim = recognizer.embedding_dim
    sids = [sample_id(f"eval:{bench.name}", k) for k in keys]
    cache = cached_embeddings(ws, sids, recognizer.model_id) if use_cache else {}
    cache = {s: v for s, v in cache.items() if v.size == dim}
    vectors = np.full((len(keys), dim), np.nan, dtype=np.float32)
    for i, s in enumerate(sids):
        if s in cache:
            vectors[i] = cache[s]
    failures: dict[str, str] = {}
    writer = ShardWriter(ws, "embeddings", run_id)
    todo = [i for i, s in enumerate(sids) if s not in cache]
    for n, (ok_idx, batch, failed) in enumerate(crop_batches(bench, keys, todo, batch_size)):
        rows = []
        for i, reason in failed.items():
            failures[keys[i]] = reason
            rows.append({"sample_id": sids[i], "model_id": recognizer.model_id, "status": "error", "error": reason})
        if batch is not None:
            emb = recognizer.embed(batch)
            vectors[ok_idx] = emb
            rows += [{"sample_id": sids[i], "model_id": recognizer.model_id, "embedding": e.tolist(),
                      "status": "ok", "error": None} for i, e in zip(ok_idx, emb, strict=True)]
        writer.write(shard_name(n, safe_name(bench.name)), rows)
    return Embedded(keys=keys, vectors=vectors, failures=failures, model_id=recognizer.model_id, cached=len(cache))


def score_benchmark(
    bench: Benchmark, keys: list[str], *, checkpoint: str, device: str = "auto", batch_size: int = 64
) -> np.ndarray:
    """Our CLIB-FIQA quality per sample key (NaN where the image cannot be read)."""
    from models.scorer import load

    scorer = load(checkpoint, device=device, batch_size=batch_size)
    out = np.full(len(keys), np.nan)
    for ok_idx, batch, _ in crop_batches(bench, keys, list(range(len(keys))), batch_size):
        if batch is not None:
            out[ok_idx] = scorer.score(batch).score
    return out
