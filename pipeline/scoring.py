"""Scoring one shard of selected samples with a CLIB-FIQA checkpoint: one `scores` row per sample."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_manifest import ShardWriter, Workspace
from pipeline.crop_batches import read_crop_batch
from pipeline.process_lock import ProcessLock

MODEL_LOCK = ProcessLock()  # one model per process; batches from concurrent shards run one at a time


@lru_cache(maxsize=4)
def scorer(checkpoint: str, mtime_ns: int, device: str, batch_size: int) -> Any:
    """The checkpoint's scorer, loaded once per process (a rewritten checkpoint has another mtime)."""
    from models.scorer import load

    return load(checkpoint, device=device, batch_size=batch_size)


def score_rows(ws: Workspace, items: list[dict[str, Any]], checkpoint: str, *, method: str, device: str,
               batch_size: int) -> list[dict[str, Any]]:
    """Score one shard of selected samples; one `scores` row per sample."""
    model_id = f"{Path(checkpoint).parent.name}/{Path(checkpoint).name}"
    good, crops, rows = read_crop_batch(
        ws, items, lambda it: {"sample_id": it["sample_id"], "method": method, "model_id": model_id})
    if good:
        with MODEL_LOCK:
            res = scorer(checkpoint, Path(checkpoint).stat().st_mtime_ns, device, batch_size).score(crops)
        for i, base in enumerate(good):
            rows.append({**base, "quality": float(res.score[i]), "quality_probs": res.quality[i].tolist(),
                         "marginals": json.dumps({f: v[i].round(6).tolist() for f, v in res.factors.items()}),
                         "status": "ok", "error": None})
    return rows


def score_shard(ws: Workspace, run_id: str, shard: str, items: list[dict[str, Any]], *, checkpoint: str,
                method: str, device: str, batch_size: int) -> dict[str, int]:
    """Score one shard and write its `scores` file (`checkpoint` as Workspace.share handed it); returns its counts."""
    checkpoint = str(ws.local(checkpoint))
    rows = score_rows(ws, items, checkpoint, method=method, device=device, batch_size=batch_size)
    ShardWriter(ws, "scores", run_id).write(shard, rows)
    return {"rows": len(rows), "ok": sum(r["status"] == "ok" for r in rows)}
