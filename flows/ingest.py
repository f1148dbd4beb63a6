"""`fiqa ingest PATH --dataset NAME`: read a dataset into the `samples` table, shard by shard, resumably.

Every source record becomes exactly one row: decoded and measured when it is a
usable image, otherwise with a status and the reason. Shards run in parallel
through the flow's task runner; re-running with the same --run-id skips the
shards that already committed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import ShardWriter, Workspace, runs
from flows import runtime
from pipeline import images
from pipeline.readers import KINDS, DatasetError, DatasetReader, Shard, open_reader
from pipeline.samples import sample_rows, status_counts

FORMATS = ("auto", *KINDS)


def build_reader(path: str, format: str = "auto", shard_size: int = 1000) -> DatasetReader:
    """Open the dataset and compute its shard plan; raises before any work when the path or format is wrong."""
    if format not in FORMATS:
        raise ValueError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    reader = open_reader(path, format, shard_size=shard_size)
    reader.plan()
    return reader


@task(name="ingest-shard", cache_policy=NO_CACHE)
def ingest_shard(ws_root: str, run_id: str, shard: str, items: list[Shard], *, reader: DatasetReader,
                 dataset: str, max_pixels: int) -> dict[str, int]:
    """Read, validate and write one shard of samples rows, then commit the shard."""
    ws = Workspace(ws_root)
    rows = [row for s in items for row in sample_rows(dataset, reader.read(s), max_pixels=max_pixels)]
    ShardWriter(ws, "samples", run_id).write(shard, rows)
    counts = status_counts(rows)
    runs.mark_shard_done(ws, run_id, shard, counts)
    return counts


@flow(name="ingest")
def ingest(path: str, dataset: str, format: str = "auto", shard_size: int = 1000, workspace: str | None = None,
           run_id: str | None = None, max_pixels: int = images.MAX_PIXELS,
           progress: bool | None = None) -> dict[str, Any]:
    """Ingest one dataset into `samples`; returns the run id and the summed per-status counts."""
    if not dataset:
        raise ValueError("--dataset must be a non-empty name")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    reader = build_reader(path, format, shard_size)
    ws = Workspace(workspace)
    if progress is not False:
        print(f"ingest {dataset}: {reader.kind} dataset {str(reader.path)!r}: {len(reader)} records in "
              f"{len(reader.plan())} shards", file=sys.stderr)
    params = {"path": str(reader.path), "dataset": dataset, "format": reader.kind, "shard_size": shard_size,
              "max_pixels": max_pixels}
    check_resume(ws, run_id, params)
    t0 = time.perf_counter()
    with runtime.tracked_run(ws, "ingest", params, run_id) as state:
        rid = state["run_id"]
        outcomes = runtime.run_shards(ingest_shard, [[s] for s in reader.plan()], ws=ws, run_id=rid,
                                      desc=f"ingest {dataset}", progress=progress, reader=reader,
                                      dataset=dataset, max_pixels=max_pixels)
        summary = runtime.summarize(outcomes)
        elapsed = time.perf_counter() - t0
        state["metrics"] = {"seconds": round(elapsed, 3), "records_this_attempt": summary.get("rows", 0),
                            "records_per_s": round(summary.get("rows", 0) / max(elapsed, 1e-9), 1)}
        runtime.check_shard_failures(outcomes, rid)
    totals = runs.shard_counts(ws, rid)
    return {"run_id": rid, "dataset": dataset, "format": reader.kind, "records": len(reader),
            "shards": summary["shards"], "skipped_shards": summary["skipped_shards"], "counts": totals,
            **state["metrics"]}


def check_resume(ws: Workspace, run_id: str | None, params: dict[str, Any]) -> None:
    """Refuse to resume a run with different data or sharding: its committed shards would not line up."""
    info = runs.run_info(ws, run_id) if run_id else None
    if info is None:
        return
    before = info.get("parameters", {})
    changed = {k: (before.get(k), v) for k, v in params.items() if before.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"run {run_id!r} was started with other parameters ({diff}); resume it with the same "
                         "ones, or start a new run")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset: image folder, train.rec (or its folder), verification .bin, CSV/TSV list")
    p.add_argument("--dataset", required=True, help="dataset name (part of every sample_id)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="reader to use (default: detect from the path)")
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="records per shard (default: 1000)")
    p.add_argument("--max-pixels", type=_positive_int, default=images.MAX_PIXELS,
                   help=f"refuse images declaring more pixels (default: {images.MAX_PIXELS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime.add_common_args(p)


def run_cli(args: argparse.Namespace) -> int:
    prog = "fiqa ingest"
    try:
        with runtime.cli_guard(args):  # workspace usable and run id free, before Prefect starts
            if not args.dataset.strip():
                raise ValueError("--dataset must be a non-empty name")
            reader = build_reader(args.path, args.format, args.shard_size)  # dataset-level errors surface here
            runner = runtime.with_runner(ingest, args)
            result = runner(path=str(reader.path), dataset=args.dataset, format=reader.kind,
                            shard_size=args.shard_size, workspace=args.workspace, run_id=args.run_id,
                            max_pixels=args.max_pixels, progress=False if args.no_progress else None)
    except runtime.ShardFailures as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, DatasetError, ValueError, RuntimeError) as e:  # bad path, dataset, resume or a running run id
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    counts = result["counts"]
    statuses = ", ".join(f"{k.removeprefix('status_')} {v}" for k, v in counts.items() if k.startswith("status_"))
    print(f"run {result['run_id']}: {counts.get('rows', 0)} rows ({statuses}); "
          f"{result['skipped_shards']} of {result['shards']} shards already committed; "
          f"{result['records_per_s']} records/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(runtime.main_for("flows.ingest")())
