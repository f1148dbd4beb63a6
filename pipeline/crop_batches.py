"""The aligned crops of one shard of selected samples, read back from their packs for a model to run on.

A sample without a usable crop gets its row at once, with a status and the reason; the others are
returned with their crops, in order, for one batched model call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from data_manifest import Workspace


def read_crop_batch(ws: Workspace, items: list[dict[str, Any]], base: Callable[[dict[str, Any]], dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], np.ndarray | None, list[dict[str, Any]]]:
    """(bases of the readable samples, their crops stacked or None, finished rows of the others)."""
    from data_manifest.crops import PackReader

    reader = PackReader(ws)
    rows: list[dict[str, Any]] = []
    good, crops = [], []
    for it in items:
        row = base(it)
        if it.get("crop_file") is None or it.get("crop_index") is None:
            reason = it.get("face_error") or f"no aligned crop (face status: {it.get('face_status') or 'not aligned'})"
            rows.append({**row, "status": "skipped", "error": reason})
            continue
        try:
            crops.append(reader.read(it["crop_file"], int(it["crop_index"])))
            good.append(row)
        except (OSError, ValueError, IndexError) as e:
            rows.append({**row, "status": "error", "error": f"cannot read crop: {e}"})
    return good, (np.stack(crops) if crops else None), rows
