"""Shard commit receipts: what a shard task wrote, as its worker saw it, checked where the run is recorded.

A task of a distributed runner writes on its worker's file system and returns to the flow's process, which
marks the shard done. When a worker does not see the workspace (no shared file system, another mount),
its files land somewhere the flow never reads: the shard would be marked done with its rows lost. So:

- on the worker, before the body runs, `check_visible` needs the run's commit folder
  (`runs/<run_id>/shards/`, made by the flow with `expect_shards` before any shard is submitted) at the
  same path; without it the task fails with the worker (host and pid) and the path, and writes nothing;
- after the body, the task returns a receipt with its counts: the worker and each file of the shard
  (manifest shards and crop packs) with its row count as the worker read it;
- in the flow's process, `verified` checks every file is there with that row count before the runtime
  marks the shard done; otherwise the shard fails (the run fails and resumes with the same run id).

A workspace on object storage (data_manifest/store.py) needs no shared file system: the worker opens it by
its URL, pulls the run's folder, writes the shard into its cache and commits the shard's files to the store
(files, then a commit marker) before it returns; `verified` pulls the store before it checks the files.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from data_manifest import store
from data_manifest.workspace import Workspace

RECEIPT = "_receipt"  # the key of the receipt in a task's counts (removed before they are recorded)
EXPECTED = "shards_expected"  # runs/<run_id>/EXPECTED: a store workspace expects the run's shards (expect_shards)


class WorkspaceNotShared(RuntimeError):
    """A worker does not see the workspace the flow writes to (at the same path)."""


def worker_name() -> str:
    """This process as a worker: host and pid."""
    return f"{socket.gethostname()} (pid {os.getpid()})"


def _shared_hint(root: str | Path) -> str:
    return (f"every worker needs the workspace {root} at the same path (a shared file system); "
            "see docs/operations.md, 'Running on a cluster'")


def _commit_dir(ws_root: str | Path, run_id: str) -> Path:
    return Path(ws_root) / "runs" / run_id / "shards"  # where data_manifest.runs keeps the commit records


def expect_shards(ws: Workspace, run_id: str) -> None:
    """In the flow's process, before shards are submitted: the folder their workers must see (and, in a store's
    workspace, what the flow wrote for them, e.g. a frozen selection, committed)."""
    _commit_dir(ws.root, run_id).mkdir(parents=True, exist_ok=True)
    if ws.store is not None and not (ws.runs_dir / run_id / "run.json").is_file():
        # a workspace that holds only the run's shards (its record lives in another: train-attributes' crops)
        (ws.runs_dir / run_id / EXPECTED).write_text(run_id)
    ws.push()


def check_visible(ws_root: str | Path, run_id: str) -> None:
    """Raise WorkspaceNotShared unless this process sees the run's commit folder under ws_root (a store's
    workspace: unless the run's record is committed there; its folder is pulled into this cache)."""
    if store.is_url(ws_root):
        ws = Workspace(ws_root)
        ws.pull(f"runs/{run_id}")
        if not any((ws.runs_dir / run_id / name).is_file() for name in ("run.json", EXPECTED)):
            raise WorkspaceNotShared(f"worker {worker_name()} does not find run {run_id} in the workspace "
                                     f"{ws_root}: neither its runs/{run_id}/run.json nor {EXPECTED} is committed "
                                     "there")
        _commit_dir(ws.root, run_id).mkdir(parents=True, exist_ok=True)
        return
    folder = _commit_dir(ws_root, run_id)
    if not folder.is_dir():
        raise WorkspaceNotShared(f"worker {worker_name()} cannot see the workspace {ws_root} ({folder} is "
                                 f"missing there); {_shared_hint(ws_root)}")


def _cache(ws_root: str | Path) -> Path:
    return Workspace(ws_root).root if store.is_url(ws_root) else Path(ws_root)


def _rows(path: Path) -> int:
    if path.suffix == ".npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    return pq.read_metadata(path).num_rows


def shard_files(ws_root: str | Path, run_id: str, shard: str) -> dict[str, int]:
    """Every file of one shard of a run (manifest tables, crop packs and the run's scratch parts, e.g. an
    anchors run's per-shard sums and search results) -> its row count, relative to the root."""
    root = _cache(ws_root)
    found = [*root.glob(f"manifests/*/run={run_id}/part-{shard}.parquet"),
             *root.glob(f"crops/*/{run_id}/part-{shard}.npy"),
             *root.glob(f"runs/{run_id}/*/part-{shard}.parquet")]
    return {p.relative_to(root).as_posix(): _rows(p) for p in sorted(found)}


def receipted(body: Callable[..., dict[str, Any] | None]) -> Callable[..., dict[str, Any]]:
    """Wrap a shard task body `body(ws_root, run_id, shard, ...)`: check the workspace first, add a receipt (a
    store's workspace: after committing the shard's files to the store)."""

    @functools.wraps(body)
    def shard_task(ws_root: str, run_id: str, shard: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with store.no_sync():  # the body opens the workspace by its URL: no pull of the whole store per shard
            check_visible(ws_root, run_id)
            counts = dict(body(ws_root, run_id, shard, *args, **kwargs) or {})
            files = shard_files(ws_root, run_id, shard)
            if store.is_url(ws_root):
                Workspace(ws_root).push(list(files))
        counts[RECEIPT] = {"worker": worker_name(), "files": files}
        return counts

    return shard_task


def verified(ws: Workspace, counts: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """A task's counts without the receipt, and the worker; raises WorkspaceNotShared when a file is not here.

    Counts without a receipt (a task body run in the flow's own process) pass unchecked.
    """
    counts = dict(counts or {})
    receipt = counts.pop(RECEIPT, None)
    if receipt is None:
        return counts, None
    ws.pull(repair=False)  # a store's workspace: the worker committed its files there
    wrong = []
    for rel, rows in receipt["files"].items():
        path = ws.root / rel
        if not path.is_file():
            wrong.append(f"{rel} ({rows} rows there) is missing here")
        elif (seen := _rows(path)) != rows:
            wrong.append(f"{rel} has {seen} rows here, {rows} there")
    if wrong:
        raise WorkspaceNotShared(f"worker {receipt['worker']} wrote files under {ws.root} that this machine "
                                 f"does not see: {'; '.join(wrong[:3])}; {_shared_hint(ws.root)}")
    return counts, receipt["worker"]
