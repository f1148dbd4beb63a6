"""The run registry: one `runs` row per run start and finish, and per-shard commit records."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_manifest.workspace import Workspace
from data_manifest.writer import ShardWriter, atomic_write, check_name

RUNNING, COMPLETED, FAILED, CRASHED = "running", "completed", "failed", "crashed"  # crashed: its process died


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout (and '+dirty'), when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("clib-fiqa-pipeline")
    except PackageNotFoundError:
        ver = "0+unknown"
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{ver}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return ver


def new_run_id(flow: str) -> str:
    """A sortable, unique run id: <flow>-<UTC timestamp>-<random>."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return check_name(f"{flow}-{stamp}-{secrets.token_hex(3)}", "run id")


def _run_dir(ws: Workspace, run_id: str) -> Path:
    return ws.runs_dir / check_name(run_id, "run id")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


class RunLocked(RuntimeError):
    """Another live process is running this run id; a second start would redo and overwrite its work."""


_HELD: dict[str, int] = {}  # lock file -> nesting depth in this process
_HELD_LOCK = threading.Lock()


def lock_holder(ws: Workspace, run_id: str) -> dict[str, Any] | None:
    """What the run's lock file says about its last holder (pid, host, since), or None."""
    try:
        return json.loads((_run_dir(ws, run_id) / "lock").read_text() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(ws: Workspace, run_id: str) -> Iterator[Path]:
    """Hold runs/<run_id>/lock for the life of a run; RunLocked when another live process holds it.

    The lock is an flock on the file, which the kernel drops when its holder dies (kill -9
    included), so a lock left by a dead process is stale by construction and the next
    start takes it over. The file records the holder's pid, host and start time for the
    message. Re-entrant within one process.
    """
    path = _run_dir(ws, run_id) / "lock"
    key = str(path)  # the workspace root is already resolved
    with _HELD_LOCK:
        if key in _HELD:
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _HELD_LOCK:
                _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            h = lock_holder(ws, run_id) or {}
            raise RunLocked(f"run {run_id!r} is already running (pid {h.get('pid', '?')} on {h.get('host', '?')}, "
                            f"since {h.get('since', '?')}); wait for it to finish, or use another --run-id") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": datetime.now(UTC).isoformat()}).encode(), 0)
        with _HELD_LOCK:
            _HELD[key] = 1
        try:
            yield path
        finally:
            with _HELD_LOCK:
                del _HELD[key]
    finally:
        os.close(fd)  # drops the flock


def run_info(ws: Workspace, run_id: str) -> dict[str, Any] | None:
    """The run's record (flow, parameters, start time), or None when the run is unknown."""
    p = _run_dir(ws, run_id) / "run.json"
    return json.loads(p.read_text()) if p.exists() else None


def start_run(ws: Workspace, flow: str, params: dict[str, Any], run_id: str | None = None) -> str:
    """Register a run (or resume an existing one with the same id) and return its id."""
    run_id = run_id or new_run_id(flow)
    info = run_info(ws, run_id)
    if info is not None and info["flow"] != flow:
        raise ValueError(f"run {run_id!r} belongs to flow {info['flow']!r}, not {flow!r}")
    now = datetime.now(UTC)
    if info is None:
        info = {"run_id": run_id, "flow": flow, "parameters": params, "started_at": now.isoformat(),
                "code_version": code_version(), "host": socket.gethostname(), "attempts": 0}
    info["attempts"] = int(info.get("attempts", 0)) + 1
    info["last_parameters"], info["attempt_started_at"] = params, now.isoformat()
    _write_json(_run_dir(ws, run_id) / "run.json", info)
    _registry_row(ws, run_id, info, RUNNING, f"start-{info['attempts']:03d}")
    ws.push()  # a store's workspace: the run's record (and what the flow wrote before) committed
    return run_id


def _registry_row(ws: Workspace, run_id: str, info: dict[str, Any], status: str, shard: str,
                  counts: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                  error: str | None = None) -> None:
    ended = datetime.now(UTC) if status != RUNNING else None
    ShardWriter(ws, "runs", run_id).write(shard, [{
        "run_id": run_id, "flow": info["flow"], "status": status,
        "parameters": json.dumps(info.get("last_parameters", info["parameters"]), default=str),
        "code_version": code_version(), "started_at": datetime.fromisoformat(info["started_at"]),
        "ended_at": ended, "counts": None if counts is None else json.dumps(counts, default=str),
        "metrics": None if metrics is None else json.dumps(metrics, default=str),
        "host": info.get("host"), "error": error,
    }])


def _marker(ws: Workspace, run_id: str, shard: str) -> Path:
    return _run_dir(ws, run_id) / "shards" / f"{check_name(shard, 'shard name')}.json"


def shard_done(ws: Workspace, run_id: str, shard: str) -> bool:
    """True when the shard committed in an earlier attempt (a re-run skips it)."""
    return _marker(ws, run_id, shard).exists()


def mark_shard_done(ws: Workspace, run_id: str, shard: str, counts: dict[str, Any] | None = None,
                    worker: str | None = None) -> None:
    """Record the shard as committed, after all of its tables were written (by `worker`, when not this process)."""
    _write_json(_marker(ws, run_id, shard), {"shard": shard, "counts": counts or {},
                                             "committed_at": datetime.now(UTC).isoformat(),
                                             "pid": os.getpid(), **({"worker": worker} if worker else {})})
    ws.push()  # a store's workspace: the record, with what the flow's process wrote for the shard


def shard_counts(ws: Workspace, run_id: str) -> dict[str, int]:
    """Sum of the numeric counts recorded by all committed shards of a run."""
    total: dict[str, int] = {}
    for p in sorted((_run_dir(ws, run_id) / "shards").glob("*.json")):
        for k, v in json.loads(p.read_text()).get("counts", {}).items():
            if isinstance(v, int | float):
                total[k] = total.get(k, 0) + v
    return total


def finish_run(ws: Workspace, run_id: str, status: str, counts: dict[str, Any] | None = None,
               metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Record the end of a run attempt with its counts (default: summed shard counts) and metrics."""
    if status not in (COMPLETED, FAILED, CRASHED):
        raise ValueError(f"finish_run: status must be {COMPLETED!r}, {FAILED!r} or {CRASHED!r}, got {status!r}")
    info = run_info(ws, run_id)
    if info is None:
        raise ValueError(f"finish_run: unknown run {run_id!r} (start_run was not called)")
    counts = shard_counts(ws, run_id) if counts is None else counts
    if status == COMPLETED and info.get("status") == COMPLETED and info.get("metrics"):
        metrics = info["metrics"]  # a resume of a completed run redid nothing: its rates stay those of the work
    info.update(status=status, counts=counts, metrics=metrics, ended_at=datetime.now(UTC).isoformat(), error=error)
    _write_json(_run_dir(ws, run_id) / "run.json", info)
    _registry_row(ws, run_id, info, status, f"end-{info['attempts']:03d}", counts, metrics, error)
    ws.push()


def is_running(info: dict[str, Any]) -> bool:
    """The run's last attempt has started and not ended (or its process died before it could record the end)."""
    started = info.get("attempt_started_at") or info.get("started_at") or ""
    return not info.get("ended_at") or info["ended_at"] < started


def lock_is_free(ws: Workspace, run_id: str) -> bool:
    """True when no live process holds the run's lock (the kernel drops an flock when its holder dies)."""
    path = _run_dir(ws, run_id) / "lock"
    if str(path) in _HELD:
        return False
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def recover_crashed(ws: Workspace) -> list[str]:
    """Runs recorded as running whose process is gone (their lock is free), each recorded as crashed (an end
    row naming the dead holder, counts of its committed shards); returns their ids. A resume with the same
    run id skips the committed shards."""
    found = []
    for d in sorted(ws.runs_dir.iterdir()) if ws.runs_dir.is_dir() else []:
        info = run_info(ws, d.name)
        if info is None or not is_running(info) or not lock_is_free(ws, d.name):
            continue
        h = lock_holder(ws, d.name) or {}
        finish_run(ws, d.name, CRASHED, error=f"the process running it died (pid {h.get('pid', '?')} on "
                                               f"{h.get('host', '?')}, since {h.get('since', '?')})")
        found.append(d.name)
    return found


def resumable(ws: Workspace, flow: str, params: dict[str, Any]) -> str | None:
    """The newest crashed run of `flow` started with exactly these parameters (to resume), or None. A failed one
    is not: its shards failed on their input, and a scheduled retry would fail again."""
    best: tuple[str, str] | None = None
    for d in sorted(ws.runs_dir.iterdir()) if ws.runs_dir.is_dir() else []:
        info = run_info(ws, d.name)
        if (info and info["flow"] == flow and info.get("status") == CRASHED and not is_running(info)
                and json.dumps(info.get("parameters"), sort_keys=True, default=str)
                == json.dumps(params, sort_keys=True, default=str)):
            best = max(best or ("", ""), (info["started_at"], d.name))
    return best[1] if best else None


def run_report_markdown(info: dict[str, Any]) -> str:
    """A short markdown report of one run: parameters, counts, metrics, status."""

    def block(title: str, value: Any) -> str:
        return f"### {title}\n\n```json\n{json.dumps(value, indent=2, default=str)}\n```\n"

    head = (f"## Run `{info['run_id']}` ({info['flow']})\n\n"
            f"- status: **{info.get('status', 'running')}**\n- started: {info.get('started_at')}\n"
            f"- ended: {info.get('ended_at')}\n- code version: {info.get('code_version')}\n"
            f"- attempts: {info.get('attempts')}\n")
    if info.get("error"):
        head += f"- error: {info['error']}\n"
    return "\n".join([head, block("Counts", info.get("counts") or {}), block("Metrics", info.get("metrics") or {}),
                      block("Parameters", info.get("last_parameters", info.get("parameters")))])


def write_run_report(ws: Workspace, run_id: str) -> tuple[dict[str, Any], str] | None:
    """Write reports/runs/<run_id>.md; returns (run info, markdown), or None for an unknown run."""
    info = run_info(ws, run_id)
    if info is None:
        return None
    md = run_report_markdown(info)
    path = ws.reports / "runs" / f"{run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    ws.push([path.relative_to(ws.root).as_posix()])
    return info, md


def check_resume(ws: Workspace, run_id: str | None, params: dict[str, Any]) -> None:
    """Refuse to resume a run with parameters that differ from those it was started with."""
    if not run_id:
        return
    info = run_info(ws, run_id)
    if info is None:
        return
    first = info.get("parameters") or {}
    for key, value in params.items():
        if key in first and first[key] != value:
            raise ValueError(f"run {run_id} was started with {key}={first[key]!r}; resuming with {value!r} "
                             "would mix results: start a new run instead")
