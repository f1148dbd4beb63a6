"""From the command line to a flow and back: typed run options, shared options, the CLI guard, one error path.

A flow's parameters arrive as one typed options dataclass (a RunOptions subclass), parsed once here and
validated in its own __post_init__; every command ends through `run_command`, with one message and one
exit code. Nothing here imports Prefect: `fiqa --help` and `fiqa sql` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from flows.arguments import INPUT_ERRORS, json_object
from flows.runners import RUNNERS

OptionsT = TypeVar("OptionsT")
# Fields of RunOptions say where and how a run executes, not what it computes: never part of the resume check.
EXECUTION_FIELDS = ("workspace", "run_id", "runner", "workers", "address", "progress")


@dataclass(frozen=True)
class RunOptions:
    """Options every flow shares: where the run lives and which task runner executes its shards."""

    workspace: str | None = None  # default: $FIQA_WORKSPACE or ./workspace
    run_id: str | None = None  # resume this run
    runner: str = "threads"  # threads | processes | dask
    workers: int | None = None  # parallel workers of the task runner (None: the runner's default)
    address: str | None = None  # an existing Dask cluster (its scheduler)
    progress: bool | None = None  # progress line (None: when stderr is a terminal)
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = ()  # integer options of a subclass that must be >= 1 when given

    def __post_init__(self) -> None:
        for name in ("workers", *self.AT_LEAST_ONE):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown task runner {self.runner!r}; choose one of {', '.join(RUNNERS)}")
        if self.address and self.runner != "dask":
            raise ValueError(f"--address names a Dask cluster; it needs --runner dask, not {self.runner!r}")

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


def add_config_options(p: Any, options: Sequence[tuple[str, type]]) -> None:
    """One `--name` option of the given type per training-config key (unset: the config's default)."""
    for name, typ in options:
        p.add_argument(f"--{name}", type=typ, default=None)


def config_overrides(args: argparse.Namespace, options: Sequence[tuple[str, type]]) -> dict[str, Any]:
    """A training config's overrides: the --config-json object, then each option the command line sets."""
    cfg = json_object(getattr(args, "config_json", None), "--config-json") or {}
    for name, _ in options:
        value = getattr(args, name.replace("-", "_"), None)
        if value is not None:
            cfg[name.replace("-", "_")] = value
    return cfg


def add_common_args(p: argparse.ArgumentParser, *, runner: bool = True) -> None:
    """Options every flow command shares: workspace, run id (resume), task runner."""
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--run-id", default=None, help=(
        "resume this run (committed shards are skipped)" if runner else
        "name the run; an existing id continues that run (train: from its last checkpoint; give the same options)"))
    if runner:
        add_runner_args(p)


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """The task runner of a run's shards: --runner, --workers, --address."""
    p.add_argument("--runner", choices=RUNNERS, default="threads", help="task runner (default: threads)")
    p.add_argument("--workers", type=int, default=None, help="parallel workers of the task runner")
    p.add_argument("--address", default=None, help="address of an existing Dask cluster's scheduler")


def prefect_defaults(*, quiet_console: bool) -> None:
    """The `fiqa` entry point's Prefect defaults, set before Prefect is imported (a user's settings win):
    analytics off, a server start-up timeout that survives a fresh PREFECT_HOME and, for an interactive
    command, a console showing Prefect's warnings and errors only (the run logs still reach the API)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if quiet_console and "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL" not in os.environ:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"  # for Prefect imported from now on
        for handler in logging.getLogger().handlers:  # Prefect already configured in this process
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.setLevel(max(handler.level, logging.WARNING))


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
    from data_manifest import Workspace, runs
    from data_manifest.workspace import check_path

    quiet_failure_tracebacks()
    if hasattr(args, "workspace"):
        check_path(args.workspace)
    run_id = getattr(args, "run_id", None)
    if not run_id:
        yield
        return

    with runs.run_lock(Workspace(args.workspace), run_id):
        yield


def run_command(prog: str, mod: Any, args: argparse.Namespace) -> int:
    """The one CLI error path: run_cli raises; failed shards exit 1, bad input exits 2, each with one message."""
    from data_manifest.catalog import query_limits
    from flows.runtime import ShardFailures

    try:
        limits = query_limits(getattr(args, "sql_timeout", None), getattr(args, "sql_memory", None))
        with limits, cli_guard(args):  # a usable --workspace and a free --run-id first
            return int(mod.run_cli(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ShardFailures as e:  # the run is recorded as failed; the message says how to resume it
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def main_for(module_name: str) -> Callable[[list[str] | None], int]:
    """A `python -m flows.<name>` entry point using the module's configure_parser/run_cli."""

    def _main(argv: list[str] | None = None) -> int:
        mod = importlib.import_module(module_name)
        spec = getattr(mod, "__spec__", None)
        shown = spec.name if module_name == "__main__" and spec is not None else module_name
        p = argparse.ArgumentParser(prog=f"python -m {shown}", description=(mod.__doc__ or "").strip())
        mod.configure_parser(p)
        return run_command(p.prog, mod, p.parse_args(argv))

    return _main
