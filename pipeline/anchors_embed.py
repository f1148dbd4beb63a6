"""Embedding one shard of an anchors run's selection: one `embeddings` row per selected sample.

One recogniser per process (built once per spec, device and batch size); concurrent shards take turns
on it. A sample without a readable crop gets a row with a null embedding and the reason.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pyarrow as pa

from data_manifest import ShardWriter, Workspace
from pipeline.anchors_reuse import still_to_embed
from pipeline.crop_batches import read_crop_batch
from pipeline.process_lock import ProcessLock

MODEL_LOCK = ProcessLock()  # one model per process: its users take turns


@lru_cache(maxsize=2)
def recognizer(spec: str, device: str, batch_size: int) -> Any:
    """The recogniser of a spec (models.recognition.build_recognizer), built once per process."""
    from models.recognition import build_recognizer

    return build_recognizer(spec, device=device, batch_size=batch_size)


def embed_rows(ws: Workspace, items: list[dict[str, Any]], spec: str, *, device: str,
               batch_size: int) -> list[dict[str, Any]]:
    """Embed one shard of selected samples: one `embeddings` row per sample (null embedding + reason if none)."""
    rec = recognizer(spec, device, batch_size)
    good, crops, rows = read_crop_batch(ws, items, lambda it: {
        "sample_id": it["sample_id"], "model_id": rec.model_id, "identity": it.get("identity"), "embedding": None})
    if good:
        try:
            with MODEL_LOCK:
                emb = rec.embed(crops)
        except ValueError as e:
            rows += [{**b, "status": "error", "error": f"cannot embed: {e}"} for b in good]
        else:
            rows += [{**b, "embedding": emb[i].tolist(), "status": "ok", "error": None} for i, b in enumerate(good)]
    return rows


def embed_shard(ws: Workspace, run_id: str, shard: str, sel: pa.Table, *, spec: str, device: str,
                batch_size: int) -> dict[str, int]:
    """Embed a selection shard's samples without a staged reused embedding; write its `embeddings` file."""
    items = still_to_embed(ws, run_id, shard, sel)
    rows = embed_rows(ws, items.to_pylist(), spec, device=device, batch_size=batch_size)
    ShardWriter(ws, "embeddings", run_id).write(shard, rows)
    return {"embedded": sum(r["status"] == "ok" for r in rows), "not_embedded": sum(r["status"] != "ok" for r in rows)}
