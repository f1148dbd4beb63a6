"""The sharded-flow template and shared flow plumbing.

A flow's parameters arrive as one typed options dataclass (a RunOptions subclass), parsed once at the
CLI and validated in its own __post_init__. The runtime owns the shard lifecycle, like an executor owns
its ranks: it freezes the selection, refuses changed parameters on resume, skips committed shards,
submits one task per named shard to the runner the options ask for, and writes a shard's commit record
only after its task has returned; tasks only compute and write. Also: progress, run bookkeeping, the
CLI guard and one error path for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import flows  # noqa: F401  (Prefect defaults before prefect is imported)
from data_manifest import Workspace, catalog, runs
from data_manifest.writer import atomic_write, shard_name
from flows.arguments import INPUT_ERRORS
from flows.bookkeeping import (  # noqa: F401  (re-exported)
    publish_run_report,
    run_report_markdown,
    spawn_watchdog,
    watch_temporary_server,
)

T = TypeVar("T")
RUNNERS = ("threads", "processes", "dask", "ray")


def make_task_runner(kind: str = "threads", max_workers: int | None = None, address: str | None = None) -> Any:
    """Build a Prefect task runner by name; distributed runners need their optional package."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or min(4, os.cpu_count() or 1))
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        from flows.worker_threads import one_thread_per_worker

        return ProcessPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1,
                                     initializer=one_thread_per_worker)
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


@contextlib.contextmanager
def shared_temporary_server() -> Iterator[None]:
    """While tasks are submitted, point worker processes at this process's temporary Prefect server.

    Without an API URL, every worker of the processes runner would start a temporary server of its own
    (seconds each); the runner hands os.environ to its workers when a task is submitted.
    """
    from prefect.settings import get_current_settings

    server_module = sys.modules.get("prefect.server.api.server")  # imported by Prefect when it starts one
    server = server_module.SubprocessASGIServer() if server_module else None  # the instance flows use
    proc = getattr(server, "server_process", None)
    if get_current_settings().api.url or "PREFECT_API_URL" in os.environ or proc is None or proc.poll() is not None:
        yield
        return
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def run_shards(task: Any, shards: Mapping[str, Any], *, ws: Workspace, run_id: str, desc: str,
               stage: str | None = None, progress: bool | None = None, **kwargs: Any) -> list[ShardOutcome]:
    """Submit task(ws_root, run_id, name, payload, **kwargs) per shard not yet committed; mark each done here.

    The commit record ``<stage>-<name>`` (or ``<name>``) is written only after the task has returned its
    counts, so a task never marks itself; failed shards are collected for check_shard_failures.
    """
    from prefect.futures import as_completed

    def marker(name: str) -> str:
        return f"{stage}-{name}" if stage else name

    outcomes: list[ShardOutcome] = []
    pending = {}
    with shared_temporary_server():
        for name, payload in shards.items():
            if runs.shard_done(ws, run_id, marker(name)):
                outcomes.append(ShardOutcome(name, skipped=True))
                continue
            pending[task.submit(str(ws.root), run_id, name, payload, **kwargs)] = name
    bar = Progress(len(shards), desc, progress)
    bar.update(len(outcomes))
    try:
        for fut in as_completed(list(pending)):
            name = pending[fut]
            try:
                counts = fut.result() or {}
                runs.mark_shard_done(ws, run_id, marker(name), counts)
            except Exception as e:  # noqa: BLE001 - a failed shard is recorded and the run goes on
                outcomes.append(ShardOutcome(name, error=f"{type(e).__name__}: {e}"))
            else:
                outcomes.append(ShardOutcome(name, counts=counts))
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
    """Drops the traceback from Prefect's flow/task failure logs: the CLI prints the error message itself.

    With `drop_input_errors` (the user has no Prefect server of their own: the runs go to a temporary server
    that nobody reads afterwards), a failure that is bad input (INPUT_ERRORS) is not logged at all: the CLI's
    one-line `error:` is the whole message, not a Prefect ERROR line before it.
    """

    def __init__(self, drop_input_errors: bool) -> None:
        super().__init__()
        self.drop_input_errors = drop_input_errors

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR:
            if self.drop_input_errors and isinstance(record.exc_info[1], INPUT_ERRORS):
                return False
            record.exc_info, record.exc_text = None, None
        return True


def quiet_failure_tracebacks() -> None:
    """Let bad input end in one error line on the console (set FIQA_DEBUG=1 to keep Prefect's tracebacks)."""
    if os.environ.get("FIQA_DEBUG"):
        return
    # Decided before any flow runs: a run later points PREFECT_API_URL at its temporary server for its workers.
    own_server = bool(os.environ.get("PREFECT_API_URL"))
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _MessageOnly)]:
            logger.removeFilter(f)
        logger.addFilter(_MessageOnly(drop_input_errors=not own_server))


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


def check_shard_failures(outcomes: Sequence[ShardOutcome], run_id: str) -> None:
    failed = [o for o in outcomes if o.error]
    if failed:
        lines = "; ".join(f"shard {o.shard}: {o.error}" for o in failed[:5])
        raise ShardFailures(f"{len(failed)} of {len(outcomes)} shards failed in run {run_id} ({lines}); "
                            f"re-run with --run-id {run_id} to resume")


def add_common_args(p: argparse.ArgumentParser, *, runner: bool = True) -> None:
    """Options every flow command shares: workspace, run id (resume), task runner."""
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--run-id", default=None, help=(
        "resume this run (committed shards are skipped)" if runner else
        "name the run; an existing id continues that run (train: from its last checkpoint; give the same options)"))
    if runner:
        p.add_argument("--runner", choices=RUNNERS, default="threads", help="task runner (default: threads)")
        p.add_argument("--workers", type=int, default=None, help="parallel workers of the task runner")
        p.add_argument("--address", default=None, help="address of an existing Dask/Ray cluster")


def with_runner(flow_obj: Any, opts: Any, *, pooled: bool = False) -> Any:
    """The flow with the task runner its options ask for (RunOptions or parsed CLI arguments): the one runner helper.

    A `pooled` flow runs its shard bodies in a `compute_pool` under `--runner processes`: its Prefect tasks
    then run on threads of the flow's process, each handing its shard to a pool worker and waiting for it.
    """
    kind = getattr(opts, "runner", "threads")
    workers = getattr(opts, "workers", None)
    if pooled and kind == "processes":
        kind, workers = "threads", workers or os.cpu_count() or 1
    return flow_obj.with_options(task_runner=make_task_runner(kind, workers, getattr(opts, "address", None)))


def _worker_ready() -> int:
    return os.getpid()


@contextlib.contextmanager
def compute_pool(opts: Any) -> Iterator[Any]:
    """Dataloader-style worker processes for a pooled flow under `--runner processes`, else None.

    Prefect's processes runner starts every worker as a fresh interpreter that imports Prefect and the
    flow module and reports each task to the API (about 3 s of start-up on 2 cores, per run). Shard
    bodies that import neither (`flows.shard_work`) run here instead: the workers import only what those
    bodies need, start while the flow sets up (one compute thread each), and stay until the flow ends.
    """
    if getattr(opts, "runner", "threads") != "processes":
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from flows.worker_threads import one_thread_per_worker

    n = getattr(opts, "workers", None) or os.cpu_count() or 1
    # spawn, like Prefect's runner: the flow's process has threads (Prefect's event loops), so no fork.
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=one_thread_per_worker)
    try:
        for _ in range(n):
            pool.submit(_worker_ready)  # start the workers now, while the flow plans its shards
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # a failed or interrupted flow does not wait for queued shards
        raise
    pool.shutdown(wait=True)


def offload(pool: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a compute_pool worker when there is a pool, else right here."""
    if pool is None:
        return fn(*args, **kwargs)
    return pool.submit(fn, *args, **kwargs).result()


def main_for(module_name: str) -> Callable[[list[str] | None], int]:
    """A `python -m flows.<name>` entry point using the module's configure_parser/run_cli."""

    def _main(argv: list[str] | None = None) -> int:
        import importlib

        mod = importlib.import_module(module_name)
        spec = getattr(mod, "__spec__", None)
        shown = spec.name if module_name == "__main__" and spec is not None else module_name
        p = argparse.ArgumentParser(prog=f"python -m {shown}", description=(mod.__doc__ or "").strip())
        mod.configure_parser(p)
        from flows.cli import run_command  # the same error path and exit codes as `fiqa`

        return run_command(p.prog, mod, p.parse_args(argv))

    return _main


# ---------------------------------------------------------------- the sharded-flow template

OptionsT = TypeVar("OptionsT")
SELECTION_FILE = "selection.parquet"
# Fields of RunOptions say where and how a run executes, not what it computes: never part of the resume check.
EXECUTION_FIELDS = ("workspace", "run_id", "runner", "workers", "address", "progress")


@dataclass(frozen=True)
class RunOptions:
    """Options every flow shares: where the run lives and which task runner executes its shards."""

    workspace: str | None = None  # default: $FIQA_WORKSPACE or ./workspace
    run_id: str | None = None  # resume this run
    runner: str = "threads"  # threads | processes | dask | ray
    workers: int | None = None  # parallel workers of the task runner (None: the runner's default)
    address: str | None = None  # an existing Dask / Ray cluster
    progress: bool | None = None  # progress line (None: when stderr is a terminal)

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown task runner {self.runner!r}; choose one of {', '.join(RUNNERS)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.address and self.runner not in ("dask", "ray"):
            raise ValueError(f"--address names a Dask or Ray cluster; it needs --runner dask or ray, not "
                             f"{self.runner!r}")

    def recorded(self) -> dict[str, Any]:
        """The parameters that decide a run's results (recorded with the run, compared on resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_FIELDS}


def options_from_args(cls: type[OptionsT], args: argparse.Namespace, **overrides: Any) -> OptionsT:
    """Build a flow's options from parsed CLI arguments (one field per option of the same name)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None or (hasattr(args, f.name) and f.default is None):
            values[f.name] = value  # an option left unset keeps the dataclass default
    return cls(**{**values, **overrides})


def check_resume(ws: Workspace, run_id: str | None, params: dict[str, Any]) -> None:
    """Refuse to resume a run with parameters that differ from those it was started with."""
    if not run_id:
        return
    info = runs.run_info(ws, run_id)
    if info is None:
        return
    first = info.get("parameters") or {}
    for key, value in params.items():
        if key in first and first[key] != value:
            raise ValueError(f"run {run_id} was started with {key}={first[key]!r}; resuming with {value!r} "
                             "would mix results: start a new run instead")


def selection_path(ws: Workspace, run_id: str) -> Path:
    return ws.runs_dir / run_id / SELECTION_FILE


def freeze_selection(ws: Workspace, run_id: str, sql: str, required: tuple[str, ...] = ("sample_id",)) -> pa.Table:
    """The run's selection: queried once and written to runs/<run_id>/selection.parquet; a resume reads it back."""
    path = selection_path(ws, run_id)
    if path.exists():
        return pq.read_table(path)
    try:
        table = catalog.query(ws, sql)
    except Exception as e:  # duckdb raises its own error classes for bad SQL
        raise ValueError(f"selection query failed: {e}\nSQL: {sql}") from e
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"the selection query must return {sorted(missing)} too")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return table


def write_row_groups(path: Path, schema: pa.Schema, batches: Any, shard_size: int) -> None:
    """Atomically write record batches (cast to `schema`) as row groups of exactly shard_size rows (the last may be
    shorter): row group k is shard k, and memory holds one shard whatever the total."""

    def write(tmp: Path) -> None:
        pending: list[pa.RecordBatch] = []
        n_pending = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                pending.append(batch.cast(schema) if batch.schema != schema else batch)
                n_pending += batch.num_rows
                while n_pending >= shard_size:
                    tbl = pa.Table.from_batches(pending, schema)
                    writer.write_table(tbl.slice(0, shard_size), row_group_size=shard_size)
                    rest = tbl.slice(shard_size)
                    pending, n_pending = rest.to_batches(), rest.num_rows
            if n_pending:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=shard_size)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def stream_selection(ws: Workspace, path: Path, sql: str, shard_size: int, *, what: str,
                     schema: pa.Schema | None = None, required: tuple[str, ...] = ("sample_id",)) -> Path:
    """Run one checked query on a read-only catalog connection and stream its rows into `path`, one row group per
    shard (`write_row_groups`); `what` names the query in errors (a bad statement, missing columns)."""
    with catalog.UserSQL(ws, sql) as q:
        if len(q.statements) != 1:
            raise ValueError(f"{what} must be a single query, got {len(q.statements)} statements")
        with q.watch() as con:
            try:
                reader = con.sql(q.statements[0]).to_arrow_reader(batch_size=shard_size)
            except (duckdb.InterruptException, duckdb.OutOfMemoryException):
                raise  # the time or memory limit: watch() says which
            except duckdb.Error as e:
                raise ValueError(f"{what} failed: {e}\nSQL: {sql}") from e
            missing = [c for c in required if c not in reader.schema.names]
            if missing:
                raise ValueError(f"{what} must return {sorted(missing)} too")
            write_row_groups(path, schema or reader.schema, reader, shard_size)
    return path


def table_shards(table: pa.Table, size: int) -> dict[str, pa.Table]:
    """Consecutive slices of at most `size` rows, named 00000, 00001, ..."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return {shard_name(i): table.slice(s, size) for i, s in enumerate(range(0, table.num_rows, size))}


def flow_sql(name: str) -> str:
    """A flow's query from data_manifest/sql/flows/<name>.sql (kept apart from the `fiqa stats` reports)."""
    path = catalog.SQL_DIR / "flows" / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no flow query {name!r} in {path.parent}")
    return path.read_text()


def config_overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """A training config's overrides: the --config-json object, then each named option the command line sets."""
    raw = getattr(args, "config_json", None)
    try:
        cfg = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--config-json is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"--config-json must be a JSON object, got {type(cfg).__name__}")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            cfg[name] = value
    return cfg
