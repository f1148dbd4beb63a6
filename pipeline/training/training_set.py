"""The CLIB-FIQA training set: a DuckDB query over the catalog (aligned crops, latest anchors, factor labels).

The default query joins `faces`, `anchors` and `factors`; `--where` filters it on its own
columns, `--query` replaces it (it must return REQUIRED_COLUMNS).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_manifest import Workspace, catalog
from data_manifest.vocabulary import FACTORS

_FACTOR_COLS = ", ".join(
    f"max(class_index) FILTER (WHERE factor = '{f}' AND status = 'ok') AS {f}_index" for f in FACTORS)

TRAINING_SET_SQL = f"""
WITH fx AS (SELECT sample_id, {_FACTOR_COLS} FROM factors GROUP BY sample_id)
SELECT fc.sample_id, fc.crop_file, fc.crop_index, a.anchor, a.model_id AS anchor_model, a.run_id AS anchor_run,
       {", ".join(f"fx.{f}_index" for f in FACTORS)}
FROM faces fc
JOIN anchors a USING (sample_id)
LEFT JOIN fx USING (sample_id)
WHERE fc.status = 'ok' AND fc.crop_file IS NOT NULL AND fc.crop_index IS NOT NULL
  AND a.status = 'ok' AND a.anchor IS NOT NULL AND isfinite(a.anchor)
"""
REQUIRED_COLUMNS = ("sample_id", "crop_file", "crop_index", "anchor", *(f"{f}_index" for f in FACTORS))


def training_set_sql(where: str | None = None, query: str | None = None) -> str:
    """The SQL selecting the training set: the default join (filtered on its own columns) or a user query."""
    return catalog.selection_sql(TRAINING_SET_SQL, where, query, on_labels=False)


def load_training_set(ws: Workspace, where: str | None = None, query: str | None = None) -> Any:
    """Run the training-set query and build a TrainingData over the packed crops."""
    from models.losses import IGNORE_INDEX
    from models.train import PackedCrops, TrainingData

    sql = training_set_sql(where, query)
    try:
        tbl = catalog.query(ws, sql)
    except Exception as e:
        raise ValueError(f"training-set query failed: {e}\nSQL: {sql}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in tbl.column_names]
    if missing:
        raise ValueError(f"training-set query must return columns {list(REQUIRED_COLUMNS)}; missing {missing}")
    if tbl.num_rows == 0:
        raise ValueError("the training-set query selected no samples (need aligned crops with anchors)")
    cols = tbl.to_pydict()
    labels = np.stack([np.asarray([IGNORE_INDEX if v is None else int(v) for v in cols[f"{f}_index"]])
                       for f in FACTORS], axis=1)
    anchor_runs = sorted({r for r in cols.get("anchor_run", []) if r})
    meta = {"query": sql, "anchor_runs": anchor_runs,
            "anchor_models": sorted({m for m in cols.get("anchor_model", []) if m})}
    images = PackedCrops(ws.root, cols["crop_file"], cols["crop_index"])
    return TrainingData(list(cols["sample_id"]), np.asarray(cols["anchor"], dtype=np.float32), labels, images, meta)

