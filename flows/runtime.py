"""Shared flow plumbing: task runners, sharding, resumable shard execution, progress, run bookkeeping."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import flows  # noqa: F401  (Prefect defaults before prefect is imported)
from data_manifest import Workspace, catalog, runs

T = TypeVar("T")
RUNNERS = ("threads", "processes", "dask", "ray")


def make_task_runner(kind: str = "threads", max_workers: int | None = None, address: str | None = None) -> Any:
    """Build a Prefect task runner by name; distributed runners need their optional package."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or min(4, os.cpu_count() or 1))
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("--runner dask needs the 'prefect-dask' package: pip install prefect-dask") from e
        if address:
            return DaskTaskRunner(address=address)
        kwargs = {"n_workers": max_workers or os.cpu_count() or 1, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as e:
            raise RuntimeError("--runner ray needs the 'prefect-ray' package: pip install prefect-ray") from e
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ValueError(f"unknown task runner {kind!r}; choose one of {', '.join(RUNNERS)}")


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Split items into consecutive shards of at most `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def shard_name(index: int) -> str:
    return f"{index:05d}"


class Progress:
    """A minimal progress line on stderr (tqdm when installed), safe to disable."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.perf_counter()
        self._bar = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, leave=True)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r{self.desc}: {self.n}/{self.total} ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


@dataclass
class ShardOutcome:
    shard: str
    skipped: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_shards(task: Any, shards: Sequence[Any], *, ws: Workspace, run_id: str, desc: str,
               progress: bool | None = None, **kwargs: Any) -> list[ShardOutcome]:
    """Submit one Prefect task per shard (skipping committed ones), wait with progress.

    The task is called as task(ws_root, run_id, shard_name, shard_items, **kwargs)
    and must return a counts dict after writing and marking its shard. Failed
    shards are collected, not raised: the caller finishes the run as failed so a
    re-run resumes from the committed shards.
    """
    from prefect.futures import as_completed

    outcomes: list[ShardOutcome] = []
    pending = {}
    for i, items in enumerate(shards):
        name = shard_name(i)
        if runs.shard_done(ws, run_id, name):
            outcomes.append(ShardOutcome(name, skipped=True))
            continue
        fut = task.submit(str(ws.root), run_id, name, list(items), **kwargs)
        pending[fut] = name
    bar = Progress(len(shards), desc, progress)
    bar.update(len(outcomes))
    try:
        for fut in as_completed(list(pending)):
            name = pending[fut]
            try:
                outcomes.append(ShardOutcome(name, counts=fut.result() or {}))
            except Exception as e:  # noqa: BLE001 - a failed shard is recorded and the run goes on
                outcomes.append(ShardOutcome(name, error=f"{type(e).__name__}: {e}"))
            bar.update()
    finally:
        bar.close()
    return sorted(outcomes, key=lambda o: o.shard)


def summarize(outcomes: Sequence[ShardOutcome]) -> dict[str, Any]:
    """Totals over shards: done, skipped, failed, and summed counts."""
    total: dict[str, Any] = {"shards": len(outcomes), "skipped_shards": sum(o.skipped for o in outcomes),
                             "failed_shards": sum(o.error is not None for o in outcomes)}
    for o in outcomes:
        for k, v in o.counts.items():
            if isinstance(v, int | float):
                total[k] = total.get(k, 0) + v
    return total


class ShardFailures(RuntimeError):
    """Some shards failed; the run is recorded as failed and can be resumed with the same run id."""


@contextlib.contextmanager
def tracked_run(ws: Workspace, flow_name: str, params: dict[str, Any], run_id: str | None = None) -> Iterator[dict]:
    """Start (or resume) a run under its run lock, yield a dict for metrics, finish it and refresh the catalog.

    Exceptions mark the run failed and propagate; the catalog is refreshed either way.
    A run id that another live process is running raises runs.RunLocked before anything is recorded.
    """
    watch_temporary_server()
    with runs.run_lock(ws, run_id or runs.new_run_id(flow_name)) as lock:
        rid = runs.start_run(ws, flow_name, params, lock.parent.name)
        state: dict[str, Any] = {"run_id": rid, "metrics": {}, "counts": None}
        try:
            yield state
        except BaseException as e:
            runs.finish_run(ws, rid, runs.FAILED, counts=state["counts"], metrics=state["metrics"],
                            error=f"{type(e).__name__}: {e}")
            catalog.refresh(ws)
            publish_run_report(ws, rid)
            raise
        runs.finish_run(ws, rid, runs.COMPLETED, counts=state["counts"], metrics=state["metrics"])
        catalog.refresh(ws)
        publish_run_report(ws, rid)


def check_workspace_path(path: str | os.PathLike[str] | None) -> None:
    """Refuse a workspace path that is, or lies under, something other than a directory (before Prefect starts)."""
    p = Path(path if path is not None else os.environ.get("FIQA_WORKSPACE", "workspace")).expanduser().absolute()
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                what = "is not a directory" if q == p else f"lies under {q}, which is not a directory"
                raise NotADirectoryError(f"workspace {p} {what}")
            return


class _MessageOnly(logging.Filter):
    """Drops the traceback from Prefect's flow/task failure logs: the CLI prints the error message itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_failure_tracebacks() -> None:
    """Let bad input end in one error line on the console (set FIQA_DEBUG=1 to keep Prefect's tracebacks)."""
    if os.environ.get("FIQA_DEBUG"):
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MessageOnly) for f in logger.filters):
            logger.addFilter(_MessageOnly())


@contextlib.contextmanager
def cli_guard(args: argparse.Namespace) -> Iterator[None]:
    """Checks every command makes before any flow starts: a usable --workspace, and --run-id not already running."""
    quiet_failure_tracebacks()
    if hasattr(args, "workspace"):
        check_workspace_path(args.workspace)
    run_id = getattr(args, "run_id", None)
    if not run_id:
        yield
        return
    with runs.run_lock(Workspace(args.workspace), run_id):
        yield


# The temporary Prefect server (started by Prefect when no PREFECT_API_URL is set) is a child
# process that Prefect stops at interpreter exit; kill -9 of the flow skips that. A small
# watchdog process waits on both pids and stops the server when the flow process dies.
_WATCHDOG = r"""
import os, select, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
srv = pidfd(server)
if srv is None:
    sys.exit(0)
par = pidfd(parent)
if par is not None:
    ready, _, _ = select.select([par, srv], [], [])
    if srv in ready:
        sys.exit(0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        signal.pidfd_send_signal(srv, sig)
    except ProcessLookupError:
        sys.exit(0)
    if select.select([srv], [], [], 5)[0]:
        sys.exit(0)
"""
_WATCHED: dict[int, Any] = {}  # server pid -> its watchdog process


def spawn_watchdog(server_pid: int, parent_pid: int | None = None) -> Any:
    """Start the watchdog that terminates `server_pid` when `parent_pid` (default: this process) dies."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(parent_pid or os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def watch_temporary_server() -> int | None:
    """Put a watchdog on Prefect's temporary server, if this process started one; returns the server pid."""
    server_module = sys.modules.get("prefect.server.api.server")  # imported by Prefect when it starts one
    if server_module is None or not hasattr(os, "pidfd_open"):
        return None
    SubprocessASGIServer = server_module.SubprocessASGIServer  # noqa: N806

    proc = getattr(SubprocessASGIServer(), "server_process", None)  # the instance flows use (port None)
    if proc is None or proc.poll() is not None or proc.pid in _WATCHED:
        return None
    _WATCHED[proc.pid] = spawn_watchdog(proc.pid)
    return proc.pid


def run_report_markdown(info: dict[str, Any]) -> str:
    """A short markdown report of one run: parameters, counts, metrics, status."""
    import json

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


def publish_run_report(ws: Workspace, run_id: str) -> Path | None:
    """Write reports/runs/<run_id>.md and, inside a Prefect flow run, publish it as a markdown artifact."""
    info = runs.run_info(ws, run_id)
    if info is None:
        return None
    md = run_report_markdown(info)
    path = ws.reports / "runs" / f"{run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is not None:
            key = "".join(c if c.isalnum() else "-" for c in f"run-{run_id}".lower())[:100]
            create_markdown_artifact(markdown=md, key=key, description=f"{info['flow']} run report")
    except Exception as e:  # noqa: BLE001 - a report must never fail the run it describes
        warnings.warn(f"run report artifact not published: {e}", stacklevel=2)
    return path


def check_shard_failures(outcomes: Sequence[ShardOutcome], run_id: str) -> None:
    failed = [o for o in outcomes if o.error]
    if failed:
        lines = "; ".join(f"shard {o.shard}: {o.error}" for o in failed[:5])
        raise ShardFailures(f"{len(failed)} of {len(outcomes)} shards failed in run {run_id} ({lines}); "
                            f"re-run with --run-id {run_id} to resume")


def add_common_args(p: argparse.ArgumentParser, *, runner: bool = True) -> None:
    """Options every flow command shares: workspace, run id (resume), task runner."""
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--run-id", default=None, help="resume this run (committed shards are skipped)")
    if runner:
        p.add_argument("--runner", choices=RUNNERS, default="threads", help="task runner (default: threads)")
        p.add_argument("--workers", type=int, default=None, help="parallel workers of the task runner")
        p.add_argument("--address", default=None, help="address of an existing Dask/Ray cluster")


def with_runner(flow_obj: Any, args: argparse.Namespace) -> Any:
    """The flow with the task runner the CLI options ask for."""
    return flow_obj.with_options(task_runner=make_task_runner(getattr(args, "runner", "threads"),
                                                              getattr(args, "workers", None),
                                                              getattr(args, "address", None)))


def main_for(module_name: str) -> Callable[[list[str] | None], int]:
    """A `python -m flows.<name>` entry point using the module's configure_parser/run_cli."""

    def _main(argv: list[str] | None = None) -> int:
        import importlib

        mod = importlib.import_module(module_name)
        spec = getattr(mod, "__spec__", None)
        shown = spec.name if module_name == "__main__" and spec is not None else module_name
        p = argparse.ArgumentParser(prog=f"python -m {shown}", description=(mod.__doc__ or "").strip())
        mod.configure_parser(p)
        args = p.parse_args(argv)
        try:
            with cli_guard(args):
                return int(mod.run_cli(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                RuntimeError) as e:  # the same one-line errors as `fiqa`
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            return 2

    return _main
