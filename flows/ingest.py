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
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import Workspace, commits, runs
from flows import command, runners, runtime
from flows.arguments import int_at_least
from pipeline import identities, images
from pipeline.ingest_shard import ingest_samples
from pipeline.readers import KINDS, DatasetReader, Shard, open_reader

FORMATS = ("auto", *KINDS)
DEFAULT_SHARD_SIZE = 10_000  # a shard is seconds of work: a task's fixed cost under the runners stays small


def build_reader(path: str, format: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE) -> DatasetReader:
    """Open the dataset and compute its shard plan; raises before any work when the path or format is wrong."""
    if format not in FORMATS:
        raise ValueError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    reader = open_reader(path, format, shard_size=shard_size)
    reader.plan()
    return reader


@dataclass(frozen=True)
class IngestOptions(command.RunOptions):
    """Everything one `ingest` run needs, validated once here."""

    path: str = ""  # image folder, train.rec (or its folder), verification .bin, CSV/TSV list
    dataset: str = ""  # dataset name (part of every sample_id)
    format: str = "auto"  # reader (auto: detect from the path)
    shard_size: int = DEFAULT_SHARD_SIZE  # records per shard
    max_pixels: int = images.MAX_PIXELS  # refuse images declaring more pixels

    AT_LEAST_ONE = ("shard_size", "max_pixels")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("ingest needs a dataset PATH")
        if not self.dataset.strip():
            raise ValueError("--dataset must be a non-empty name")
        if self.format not in FORMATS:
            raise ValueError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")


@task(name="ingest-shard", cache_policy=NO_CACHE)
@commits.receipted
def ingest_shard(ws_root: str, run_id: str, shard: str, item: Shard, *, pool: Any, reader: DatasetReader,
                 dataset: str, max_pixels: int) -> dict[str, int]:
    """Read, validate and write one shard of samples rows, in the compute pool when there is one."""
    return runners.offload(pool, ingest_samples, ws_root, run_id, shard, item, reader=reader,
                           dataset=dataset, max_pixels=max_pixels)


@flow(name="ingest")
def ingest_run(opts: IngestOptions) -> dict[str, Any]:
    """Plan the reader's shards, read each one into `samples` rows; returns the run id and per-status counts."""
    ws = Workspace(opts.workspace)  # folder identities numbered by the dataset's append-only identity map
    reader = identities.numbered(ws, opts.dataset, build_reader(opts.path, opts.format, opts.shard_size))
    plan = reader.plan()
    if opts.progress is not False:
        print(f"ingest {opts.dataset}: {reader.kind} dataset {str(reader.path)!r}: {len(reader)} records in "
              f"{len(plan)} shards", file=sys.stderr)
    params = {"path": str(reader.path), "dataset": opts.dataset, "format": reader.kind,
              "shard_size": opts.shard_size, "max_pixels": opts.max_pixels}
    t0 = time.perf_counter()
    with (runners.compute_pool(opts) as pool,
          runtime.tracked_run(ws, "ingest", params, opts.run_id, decisive=params) as state):
        rid = state["run_id"]
        outcomes = runtime.run_shards(ingest_shard, {s.name: s for s in plan}, ws=ws, run_id=rid,
                                      desc=f"ingest {opts.dataset}", progress=opts.progress, pool=pool,
                                      reader=reader, dataset=opts.dataset, max_pixels=opts.max_pixels)
        summary = runtime.summarize(outcomes)
        elapsed = time.perf_counter() - t0
        state["metrics"] = {"seconds": round(elapsed, 3), "records_this_attempt": summary.get("rows", 0),
                            "records_per_s": round(summary.get("rows", 0) / max(elapsed, 1e-9), 1)}
        runtime.check_shard_failures(outcomes, rid)
    totals = runs.shard_counts(ws, rid)
    return {"run_id": rid, "dataset": opts.dataset, "format": reader.kind, "records": len(reader),
            "shards": summary["shards"], "skipped_shards": summary["skipped_shards"], "counts": totals,
            **state["metrics"]}


def run(opts: IngestOptions) -> dict[str, Any]:
    """Open the dataset (a bad path or format fails before Prefect starts), then run the flow on its runner."""
    build_reader(opts.path, opts.format, opts.shard_size)
    return runners.with_runner(ingest_run, opts, pooled=True)(opts)


def ingest(**kwargs: Any) -> dict[str, Any]:
    """Run the `ingest` flow from keyword options (the fields of IngestOptions)."""
    return run(IngestOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset: image folder, train.rec (or its folder), verification .bin, CSV/TSV list")
    p.add_argument("--dataset", required=True, help="dataset name (part of every sample_id)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="reader to use (default: detect from the path)")
    p.add_argument("--shard-size", type=int_at_least(1), default=DEFAULT_SHARD_SIZE,
                   help=f"records per shard (default: {DEFAULT_SHARD_SIZE})")
    p.add_argument("--max-pixels", type=int_at_least(1), default=images.MAX_PIXELS,
                   help=f"refuse images declaring more pixels (default: {images.MAX_PIXELS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_common_args(p)


def run_cli(args: argparse.Namespace) -> int:
    result = run(command.options_from_args(IngestOptions, args, progress=False if args.no_progress else None))
    counts = result["counts"]
    statuses = ", ".join(f"{k.removeprefix('status_')} {v}" for k, v in counts.items() if k.startswith("status_"))
    print(f"run {result['run_id']}: {counts.get('rows', 0)} rows ({statuses}); "
          f"{result['skipped_shards']} of {result['shards']} shards already committed; "
          f"{result['records_per_s']} records/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(command.main_for("flows.ingest")())
