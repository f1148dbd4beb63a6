"""The confidence rho of every training sample, written to the `scores` table (method clib-fiqa-confidence)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from data_manifest import ShardWriter, Workspace
from data_manifest.writer import shard_name

CONFIDENCE_METHOD = "clib-fiqa-confidence"
CONFIDENCE_SHARD_ROWS = 100_000


def confidence_writer(ws: Workspace, run_id: str, sample_ids: list[str],
                      model_id: str) -> Callable[[np.ndarray], None]:
    """A callback writing rho per training sample to `scores` (method clib-fiqa-confidence)."""

    def _write(rho: np.ndarray) -> None:
        writer = ShardWriter(ws, "scores", run_id)
        for i in range(0, len(sample_ids), CONFIDENCE_SHARD_ROWS):
            rows = [{"sample_id": sid, "method": CONFIDENCE_METHOD, "model_id": model_id,
                     "confidence": float(r), "status": "ok" if np.isfinite(r) else "error",
                     "error": None if np.isfinite(r) else "no confidence computed"}
                    for sid, r in zip(sample_ids[i:i + CONFIDENCE_SHARD_ROWS], rho[i:i + CONFIDENCE_SHARD_ROWS],
                                      strict=True)]
            writer.write(shard_name(i // CONFIDENCE_SHARD_ROWS, "confidence"), rows)

    return _write
