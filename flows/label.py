"""`fiqa label`: align faces and label factors (blur, pose, attributes) over `samples`, shard by shard, resumably.

Stages are chosen by name (`--stages align,blur,pose,attributes`) from a
registry, so new labellers plug in without touching the flow. `attributes` runs
the real-face labellers (occlusion, FER expression, analytic lighting; each
also selectable alone) or, with `--attributes-checkpoint`, the WIDER-trained
attribute CNN; every factors row names its labeller and version. The selection
(all samples, or those matching a SQL WHERE on the catalog's `labels` view) is
frozen into the run directory at the first attempt; a re-run with the same
--run-id resumes from the committed shards and rewrites a failed shard's files
under the same names, so nothing is ever duplicated. The align stage writes one
`faces` row per sample and the crops into packed files; each factor stage
writes one `factors` row per (sample, factor). Bad or faceless images become
rows with a status and a reason. Per-stage timings go into the run's metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import ShardWriter, Workspace, catalog, crops, runs
from data_manifest.vocabulary import BLUR_THRESHOLDS, parse_blur_thresholds
from data_manifest.writer import shard_name
from flows import runtime
from flows.arguments import add_sql_limits
from pipeline.labellers.base import ERROR, OK, SKIPPED, FaceCrop
from pipeline.labellers.registry import (  # noqa: F401  (the registry, re-exported for callers of the label flow)
    ALIGN,
    DEFAULT_STAGES,
    REAL_ATTRIBUTE_STAGES,
    STAGES,
    LabelOptions,
    StageGroup,
    StageSpec,
    get_stage,
    options_from,
    parse_stages,
    register_stage,
)

SELECTION_FILE = "selection.parquet"
SELECT_SQL = runtime.flow_sql("label_selection")
SELECTION_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source_kind", pa.string()), ("source", pa.string()),
    ("sample_status", pa.string()), ("sample_error", pa.string()), ("face_status", pa.string()),
    ("face_error", pa.string()), ("crop_file", pa.string()), ("crop_index", pa.int32()),
    ("landmarks", pa.list_(pa.float32())), ("transform", pa.list_(pa.float32())),
])


def selection_sql(where: str | None) -> str:
    """The selection query; `where` is a SQL condition on the catalog's `labels` view columns."""
    return catalog.selection_sql(SELECT_SQL, where)


def freeze_selection(ws: Workspace, run_id: str, where: str | None, shard_size: int) -> Path:
    """Write the selected rows to runs/<run_id>/selection.parquet, one row group per shard (once per run)."""
    path = ws.runs_dir / run_id / SELECTION_FILE
    if path.exists():
        return path
    what = "the label selection" if where is None else f"--where {where!r}"
    return runtime.stream_selection(ws, path, selection_sql(where), shard_size, what=what, schema=SELECTION_SCHEMA)


def _decode(row: dict[str, Any]) -> tuple[np.ndarray | None, str, str | None]:
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


def _align(ws: Workspace, run_id: str, shard: str, rows: list[dict[str, Any]], stage: Any,
           timings: Counter) -> tuple[list[FaceCrop], list[dict[str, Any]]]:
    from pipeline.labellers.align import face_row

    faces: list[FaceCrop] = []
    for row in rows:
        t0 = time.perf_counter()
        img, status, error = _decode(row)
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


def _stored_faces(ws: Workspace, rows: list[dict[str, Any]]) -> list[FaceCrop]:
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
        faces, face_rows = _align(ws, run_id, shard, rows, get_stage(ALIGN, options), timings)
    else:
        t0 = time.perf_counter()
        faces = _stored_faces(ws, rows)
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


@task(name="label-shard", cache_policy=NO_CACHE)
def label_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, selection: str, stages: list[str],
                options: LabelOptions) -> dict[str, Any]:
    """Label one row group of the frozen selection and write its rows (the runtime commits it).

    `seconds_shard` in the counts is the task's whole time (read, stages, writes): summed over the
    shards it gives the `shard` rate of the run's `stage_images_per_s`, the images/s of one worker.
    """
    t0 = time.perf_counter()
    ws = Workspace(ws_root)
    rows = pq.ParquetFile(selection).read_row_group(row_group).to_pylist()
    face_rows, factor_rows, counts = label_rows(ws, run_id, shard, rows, stages, options)
    # Same file names on a re-run: a shard that failed half-way is overwritten, never duplicated.
    if ALIGN in stages:
        ShardWriter(ws, "faces", run_id).write(shard, face_rows)
    if factor_rows:
        ShardWriter(ws, "factors", run_id).write(shard, factor_rows)
    counts["seconds_shard"] = round(time.perf_counter() - t0, 6)
    return counts


@dataclass(frozen=True)
class LabelRunOptions(runtime.RunOptions):
    """Everything one `label` / `relabel` run needs, validated once here."""

    stages: tuple[str, ...] = DEFAULT_STAGES  # registered stage names, in run order
    where: str | None = None  # SQL condition on the `labels` view; None: every sample
    shard_size: int = 1000  # samples per shard
    options: LabelOptions = field(default_factory=LabelOptions)  # labeller settings

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "stages", tuple(parse_stages(self.stages)))
        object.__setattr__(self, "options", options_from(self.options))
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.where is not None and not self.where.strip():
            raise ValueError("--where is empty")

    def check(self) -> None:
        """Build every stage: a bad configuration (missing weights, checkpoint) fails before any work."""
        for name in self.stages:
            get_stage(name, self.options)


def run_label(opts: LabelRunOptions, flow_name: str = "label") -> dict[str, Any]:
    """The label run (inside the label or relabel flow): freeze the selection, label every shard, record timings."""
    ws = Workspace(opts.workspace)
    names = list(opts.stages)
    opts.check()
    params = {"stages": names, "where": opts.where, "shard_size": opts.shard_size,
              "options": opts.options.to_params()}
    runtime.check_resume(ws, opts.run_id, params)
    t0 = time.perf_counter()
    with runtime.tracked_run(ws, flow_name, params, opts.run_id) as state:
        rid = state["run_id"]
        selection = freeze_selection(ws, rid, opts.where, opts.shard_size)
        shards = {shard_name(i): i for i in range(pq.ParquetFile(selection).num_row_groups)}
        outcomes = runtime.run_shards(label_shard, shards, ws=ws, run_id=rid, desc=f"{flow_name} {','.join(names)}",
                                      progress=opts.progress, selection=str(selection), stages=names,
                                      options=opts.options)
        summary = runtime.summarize(outcomes)
        totals = runs.shard_counts(ws, rid)
        state["metrics"] = _metrics(totals, time.perf_counter() - t0, summary)
        state["counts"] = totals
        runtime.check_shard_failures(outcomes, rid)
    return {"run_id": rid, "stages": names, "selected": pq.ParquetFile(selection).metadata.num_rows,
            "shards": summary["shards"], "skipped_shards": summary["skipped_shards"], "counts": totals,
            **state["metrics"]}


@flow(name="label")
def label_run(opts: LabelRunOptions) -> dict[str, Any]:
    """Align and label the selected samples (see the module docstring)."""
    return run_label(opts, "label")


def run(opts: LabelRunOptions, flow_obj: Any = label_run) -> dict[str, Any]:
    """Build the stages (before Prefect starts), then run the flow on the task runner the options ask for."""
    opts.check()
    return runtime.with_runner(flow_obj, opts)(opts)


def label(**kwargs: Any) -> dict[str, Any]:
    """Run the `label` flow from keyword options (the fields of LabelRunOptions; `options` may be a dict)."""
    return run(LabelRunOptions(**kwargs))


def _metrics(totals: dict[str, Any], elapsed: float, summary: dict[str, Any]) -> dict[str, Any]:
    n = totals.get("samples", 0)
    seconds = {k.removeprefix("seconds_"): round(v, 3) for k, v in totals.items() if k.startswith("seconds_")}
    return {"seconds": round(elapsed, 3), "stage_seconds": seconds,
            "stage_images_per_s": {k: round(n / v, 1) for k, v in seconds.items() if v > 0},
            "samples_this_attempt": summary.get("samples", 0),
            "images_per_s": round(summary.get("samples", 0) / max(elapsed, 1e-9), 2)}



def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'LOW,HIGH', got {text!r}") from None
    if not lo <= hi:
        raise argparse.ArgumentTypeError(f"thresholds must be ordered (LOW <= HIGH), got {text!r}")
    return lo, hi


def configure_parser(p: argparse.ArgumentParser, *, stages_default: str = ",".join(DEFAULT_STAGES),
                     where: bool = True) -> None:
    """Options of `fiqa label` (relabel adds its own required --where and another stages default)."""
    p.add_argument("--stages", default=stages_default,
                   help=f"comma-separated stages to run (registered: {', '.join(STAGES)}; default: %(default)s)")
    if where:
        p.add_argument("--where", default=None,
                       help="SQL condition on the catalog's `labels` view choosing the samples, e.g. "
                            "\"dataset = 'lfw'\"")
    add_sql_limits(p)
    p.add_argument("--detector", choices=("auto", "mtcnn", "scrfd", "none"), default="auto",
                   help="face detector (auto: SCRFD when the insightface pack is present, else MTCNN; "
                        "none: with --aligned, measure no 5 landmarks)")
    p.add_argument("--pack", default="buffalo_l", help="insightface model pack name or directory")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already aligned 112x112 faces (MS1MV2-style): no detection for alignment")
    p.add_argument("--min-face-size", type=float, default=None,
                   help="MTCNN smallest face in pixels (default: 20; 40 with --aligned)")
    p.add_argument("--pose-backend", choices=("dlib", "insightface", "landmarks5", "auto"), default="dlib",
                   help="yaw estimator (default: dlib 68 landmarks + solvePnP, as the authors)")
    p.add_argument("--pose-thresholds", type=_pair, default=(10.0, 25.0), help="|yaw| degrees LOW,HIGH")
    p.add_argument("--blur-thresholds", type=parse_blur_thresholds, default=BLUR_THRESHOLDS,
                   help="CPBD hazy-below,clear-above: 'calibrated' (default, fitted on real faces), 'paper' "
                        "(0.35,0.7) or LOW,HIGH")
    p.add_argument("--attributes-checkpoint", default=None,
                   help="the attributes stage runs this WIDER-trained attribute CNN instead of the real-face "
                        "labellers (occlusion, FER expression, analytic lighting)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime.add_common_args(p)


def options_from_args(args: argparse.Namespace) -> LabelOptions:
    """LabelOptions from parsed CLI arguments."""
    mode = "already_aligned" if args.aligned else "detect"
    return LabelOptions(detector=args.detector, pack=args.pack, align_mode=mode,
                        min_face_size=args.min_face_size, pose_backend=args.pose_backend,
                        pose_thresholds=args.pose_thresholds, blur_thresholds=args.blur_thresholds,
                        attributes_checkpoint=args.attributes_checkpoint, device=args.device)


def run_options(args: argparse.Namespace) -> LabelRunOptions:
    """The run's options from parsed CLI arguments (label and relabel)."""
    return runtime.options_from_args(LabelRunOptions, args, stages=args.stages, options=options_from_args(args),
                                     progress=False if args.no_progress else None)


def run_cli(args: argparse.Namespace) -> int:
    result = run(run_options(args))
    counts = result["counts"]
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                         if not k.startswith("seconds_") and k not in ("samples", "faces_rows", "factors_rows"))
    print(f"run {result['run_id']}: {result['selected']} samples, stages {','.join(result['stages'])}; "
          f"{counts.get('faces_rows', 0)} faces rows, {counts.get('factors_rows', 0)} factors rows ({statuses}); "
          f"{result['skipped_shards']} of {result['shards']} shards already committed; "
          f"{result['images_per_s']} images/s")
    print(json.dumps({"stage_seconds": result["stage_seconds"], "stage_images_per_s": result["stage_images_per_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(runtime.main_for("flows.label")())
