"""The sharded-flow template: typed run options, the task runner, a frozen selection, the resume check and
named shards whose lifecycle the flow owns (tasks only compute and write; the flow skips committed shards
and marks a shard done after its task returns, like an executor does for its ranks)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from data_manifest import Workspace, catalog, runs
from data_manifest.writer import atomic_write, shard_name
from flows import runtime

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
        if self.runner not in runtime.RUNNERS:
            raise ValueError(f"unknown task runner {self.runner!r}; choose one of {', '.join(runtime.RUNNERS)}")
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


def unknown_fields(cls: type[RunOptions], parser: argparse.ArgumentParser) -> list[str]:
    """Option fields the parser does not set (a check that a flow's CLI and its dataclass agree)."""
    dests = {a.dest for a in parser._actions}  # noqa: SLF001 - read-only look at the parser's options
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in dests)


def with_runner(flow_obj: Any, opts: RunOptions) -> Any:
    """The flow with the task runner its options ask for (threads, processes, dask, ray; --address)."""
    return flow_obj.with_options(task_runner=runtime.make_task_runner(opts.runner, opts.workers, opts.address))


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


def table_shards(table: pa.Table, size: int) -> dict[str, pa.Table]:
    """Consecutive slices of at most `size` rows, named 00000, 00001, ..."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return {shard_name(i): table.slice(s, size) for i, s in enumerate(range(0, table.num_rows, size))}


def run_named_shards(task: Any, shards: Mapping[str, Any], *, ws: Workspace, run_id: str, desc: str,
                     stage: str | None = None, progress: bool | None = None,
                     **kwargs: Any) -> list[runtime.ShardOutcome]:
    """Submit task(ws_root, run_id, name, payload, **kwargs) per shard not yet committed; mark each done here.

    The commit record ``<stage>-<name>`` (or ``<name>``) is written only after the task has returned its
    counts, so a task never marks itself; failed shards are collected for check_shard_failures.
    """
    from prefect.futures import as_completed

    def marker(name: str) -> str:
        return f"{stage}-{name}" if stage else name

    outcomes: list[runtime.ShardOutcome] = []
    pending = {}
    for name, payload in shards.items():
        if runs.shard_done(ws, run_id, marker(name)):
            outcomes.append(runtime.ShardOutcome(name, skipped=True))
            continue
        pending[task.submit(str(ws.root), run_id, name, payload, **kwargs)] = name
    bar = runtime.Progress(len(shards), desc, progress)
    bar.update(len(outcomes))
    try:
        for fut in as_completed(list(pending)):
            name = pending[fut]
            try:
                counts = fut.result() or {}
            except Exception as e:  # noqa: BLE001 - a failed shard is recorded and the run goes on
                outcomes.append(runtime.ShardOutcome(name, error=f"{type(e).__name__}: {e}"))
            else:
                runs.mark_shard_done(ws, run_id, marker(name), counts)
                outcomes.append(runtime.ShardOutcome(name, counts=counts))
            bar.update()
    finally:
        bar.close()
    return sorted(outcomes, key=lambda o: o.shard)


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
