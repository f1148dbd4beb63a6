"""One shard of a label run: decode or read back the faces of its selected rows, run the stages, write the rows.

The align stage decodes each sample, aligns it and packs the crops (one `faces` row per sample);
without it the crops of an earlier alignment are read back. Every factor stage then adds its
`factors` rows. Bad or faceless images become rows with a status and a reason, never gaps.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from data_manifest import ShardWriter, Workspace, crops
from pipeline.labellers.base import ERROR, OK, SKIPPED, FaceCrop
from pipeline.labellers.registry import ALIGN, LabelOptions, get_stage, is_built

# The columns of the label selection (data_manifest/sql/flows/label_selection.sql) the batch reads.
SELECTION_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source_kind", pa.string()), ("source", pa.string()),
    ("sample_status", pa.string()), ("sample_error", pa.string()), ("face_status", pa.string()),
    ("face_error", pa.string()), ("crop_file", pa.string()), ("crop_index", pa.int32()),
    ("landmarks", pa.list_(pa.float32())), ("transform", pa.list_(pa.float32())),
])


def decode_row(row: dict[str, Any]) -> tuple[np.ndarray | None, str, str | None]:
    """(RGB image or None, status, reason) of one selected sample."""
    from pipeline import images
    from pipeline.readers import open_source

    if row.get("sample_status") not in (None, OK):
        return None, row["sample_status"], f"sample is {row['sample_status']}: {row.get('sample_error')}"
    if row.get("source_kind") is None:
        return None, ERROR, "sample has no samples row"
    try:
        data = open_source(row)
    except (OSError, ValueError) as e:
        return None, ERROR, f"cannot read source: {e}"
    dec = images.decode(data)
    if not dec.ok:
        return None, dec.status, dec.error
    return dec.rgb, OK, None


def align_rows(ws: Workspace, run_id: str, shard: str, rows: list[dict[str, Any]], stage: Any,
               timings: Counter) -> tuple[list[FaceCrop], list[dict[str, Any]]]:
    """Decode and align every row, pack the good crops: (faces, `faces` rows)."""
    from pipeline.labellers.align import face_row

    faces: list[FaceCrop] = []
    for row in rows:
        t0 = time.perf_counter()
        img, status, error = decode_row(row)
        t1 = time.perf_counter()
        face = stage.align(row["sample_id"], img) if img is not None else FaceCrop(row["sample_id"], None,
                                                                                      status=status, error=error)
        timings["decode"] += t1 - t0
        timings[ALIGN] += time.perf_counter() - t1
        faces.append(face)
    ok = [f for f in faces if f.status == OK and f.crop is not None]
    rel = crops.write_pack(ws, run_id, shard, np.stack([f.crop for f in ok])) if ok else None
    index = {id(f): i for i, f in enumerate(ok)}
    face_rows = [face_row(f, detector=stage.detector_name, detector_version=stage.detector_version,
                          crop_file=rel if id(f) in index else None, crop_index=index.get(id(f))) for f in faces]
    return faces, face_rows


def stored_faces(ws: Workspace, rows: list[dict[str, Any]]) -> list[FaceCrop]:
    """FaceCrops from an earlier align run's `faces` rows and crop packs (factor-only runs)."""
    from data_manifest.crops import PackReader
    from models.geometry import transform_points

    reader = PackReader(ws)
    faces: list[FaceCrop] = []
    for row in rows:
        sid = row["sample_id"]
        if row.get("face_status") is None:
            faces.append(FaceCrop(sid, None, status=SKIPPED, error="not aligned yet: run the align stage first"))
            continue
        if row["face_status"] != OK or row.get("crop_file") is None:
            faces.append(FaceCrop(sid, None, status=row["face_status"], error=row.get("face_error")))
            continue
        try:
            crop = reader.read(row["crop_file"], int(row["crop_index"]))
        except (OSError, ValueError, IndexError) as e:
            faces.append(FaceCrop(sid, None, status=ERROR, error=f"cannot read crop: {e}"))
            continue
        lm = None
        if row.get("landmarks") is not None and row.get("transform") is not None:
            lm = transform_points(np.asarray(row["landmarks"], np.float64).reshape(5, 2),
                                  np.asarray(row["transform"], np.float64).reshape(2, 3))
        faces.append(FaceCrop(sid, crop, landmarks=lm))
    return faces


def label_rows(ws: Workspace, run_id: str, shard: str, rows: list[dict[str, Any]], stages: Sequence[str],
               options: LabelOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run the stages over one shard's selected rows: (faces rows, factors rows, counts with timings)."""
    timings: Counter = Counter()
    face_rows: list[dict[str, Any]] = []
    if ALIGN in stages:
        faces, face_rows = align_rows(ws, run_id, shard, rows, get_stage(ALIGN, options), timings)
    else:
        t0 = time.perf_counter()
        faces = stored_faces(ws, rows)
        timings["read_crops"] += time.perf_counter() - t0
    factor_rows: list[dict[str, Any]] = []
    for name in stages:
        if name == ALIGN:
            continue
        t0 = time.perf_counter()
        factor_rows += get_stage(name, options)(faces)
        timings[name] += time.perf_counter() - t0
    counts: dict[str, Any] = {"samples": len(rows), "faces_rows": len(face_rows), "factors_rows": len(factor_rows)}
    counts.update({f"faces_{k}": v for k, v in Counter(r["status"] for r in face_rows).items()})
    counts.update({f"{k[0]}_{k[1]}": v for k, v in Counter((r["factor"], r["status"]) for r in factor_rows).items()})
    counts.update({f"seconds_{k}": round(v, 6) for k, v in timings.items()})
    return face_rows, factor_rows, counts


def label_shard(ws: Workspace, run_id: str, shard: str, rows: list[dict[str, Any]], stages: Sequence[str],
                options: LabelOptions) -> dict[str, Any]:
    """Label one shard and write its `faces` (with align) and `factors` rows; returns its counts.

    Same file names on a re-run: a shard that failed half-way is overwritten, never duplicated.
    """
    face_rows, factor_rows, counts = label_rows(ws, run_id, shard, rows, stages, options)
    if ALIGN in stages:
        ShardWriter(ws, "faces", run_id).write(shard, face_rows)
    if factor_rows:
        ShardWriter(ws, "factors", run_id).write(shard, factor_rows)
    return counts


def label_selected(ws_root: str, run_id: str, shard: str, row_group: int, *, selection_file: str,
                   stages: Sequence[str], options: LabelOptions) -> dict[str, Any]:
    """Label one row group of a run's frozen selection and write its rows (a label run's shard body).

    `seconds_shard` in the counts is the body's whole time (read, stages, writes): summed over the
    shards it gives the `shard` rate of the run's `stage_images_per_s`, the images/s of one worker;
    `stages_built` counts the stages this shard had to build (load models for): 0 on a warm worker.
    Imports no Prefect and no flow module, so a compute-pool worker runs it (`flows.runners.compute_pool`).
    """
    from data_manifest import selection

    cold = sum(not is_built(name, options) for name in stages)
    t0 = time.perf_counter()
    rows = selection.task_shard(ws_root, selection_file, row_group).to_pylist()
    counts = label_shard(Workspace(ws_root), run_id, shard, rows, stages, options)
    counts["seconds_shard"] = round(time.perf_counter() - t0, 6)
    counts["stages_built"] = cold
    return counts


def warm_stages(stages: Sequence[str], options: LabelOptions) -> None:
    """Build every stage now (models loaded once per process, kept by the registry's cache): a pool worker's
    start-up, run while the flow plans its shards rather than inside its first shard."""
    for name in stages:
        get_stage(name, options)


def run_metrics(totals: dict[str, Any], elapsed: float, summary: dict[str, Any]) -> dict[str, Any]:
    """A label run's timings: seconds per stage over all shards, images/s per stage and of this attempt."""
    n = totals.get("samples", 0)
    seconds = {k.removeprefix("seconds_"): round(v, 3) for k, v in totals.items() if k.startswith("seconds_")}
    return {"seconds": round(elapsed, 3), "stage_seconds": seconds,
            "stage_images_per_s": {k: round(n / v, 1) for k, v in seconds.items() if v > 0},
            "samples_this_attempt": summary.get("samples", 0),
            "images_per_s": round(summary.get("samples", 0) / max(elapsed, 1e-9), 2)}
