"""Run bookkeeping around the flows: the watchdog of Prefect's temporary server, artifacts, the per-run report."""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from data_manifest import Workspace, runs
from pipeline import recovery
from pipeline.watchdog import spawn_watchdog

_WATCHED: dict[int, Any] = {}  # server pid -> its watchdog process


def watch_temporary_server() -> int | None:
    """Put a watchdog on Prefect's temporary server, if this process started one; returns the server pid."""
    server_module = sys.modules.get("prefect.server.api.server")  # imported by Prefect when it starts one
    if server_module is None or not hasattr(os, "pidfd_open"):
        return None
    SubprocessASGIServer = server_module.SubprocessASGIServer  # noqa: N806

    proc = getattr(SubprocessASGIServer(), "server_process", None)  # the instance flows use (port None)
    if proc is None or proc.poll() is not None or proc.pid in _WATCHED:
        return None
    _WATCHED[proc.pid] = spawn_watchdog(proc.pid)  # kill -9 of this process skips Prefect's own stop
    return proc.pid


def run_log(message: str, *args: Any, level: int = 20) -> None:
    """Log through the current Prefect run's logger (kept by the API: `prefect flow-run logs ID`); else nothing."""
    from prefect.context import FlowRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() is not None:
        get_run_logger().log(level, message, *args)


def die_with_runner() -> None:
    """In a flow run that `fiqa deploy serve` or a worker started (a child process): a watchdog stops this
    process (SIGTERM: the run ends crashed, its slot released) when that parent dies, kill -9 included; the
    flow run records this process (`host:pid`), so a restarted serve can tell when it is gone (pipeline.recovery)."""
    if (flow_run_id := os.environ.get("PREFECT__FLOW_RUN_ID")) and hasattr(os, "pidfd_open") and os.getppid() > 1:
        spawn_watchdog(os.getpid(), os.getppid())
    if flow_run_id:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run_id, infrastructure_pid=recovery.process_key())


def artifact_key(text: str) -> str:
    """A valid Prefect artifact key: lower-case letters, digits and dashes, at most 100 characters."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


def publish_artifacts(description: str, *, markdown: dict[str, str] | None = None,
                      tables: dict[str, list[dict[str, Any]]] | None = None,
                      images: dict[str, Path] | None = None) -> None:
    """Inside a Prefect flow run, publish markdown / table / image artifacts ({key: content}); outside one,
    nothing. Never fails the run it describes: a publishing error is a warning."""
    try:
        from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        for key, md in (markdown or {}).items():
            create_markdown_artifact(markdown=md, key=artifact_key(key), description=description)
        for key, rows in (tables or {}).items():  # JSON has no NaN / inf: those cells become null
            rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                    for r in rows]
            create_table_artifact(rows, key=artifact_key(key), description=description)
        for key, path in (images or {}).items():
            create_image_artifact(Path(path).resolve().as_uri(), key=artifact_key(key), description=description)
    except Exception as e:  # noqa: BLE001 - a report must never fail the run it describes
        warnings.warn(f"{description} artifact not published: {e}", stacklevel=2)


def publish_run_report(ws: Workspace, run_id: str) -> None:
    """Write reports/runs/<run_id>.md and, inside a Prefect flow run, publish it as a markdown artifact."""
    written = runs.write_run_report(ws, run_id)
    if written is not None:
        publish_artifacts(f"{written[0]['flow']} run report", markdown={f"run-{run_id}": written[1]})
