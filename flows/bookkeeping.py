"""Run bookkeeping around the flows: the watchdog of Prefect's temporary server and the per-run report."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from data_manifest import Workspace, runs

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


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """Inside a Prefect flow run, publish markdown as an artifact; outside one, nothing (never fails the run)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is not None:
            key = "".join(c if c.isalnum() else "-" for c in key.lower())[:100]
            create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:  # noqa: BLE001 - a report must never fail the run it describes
        warnings.warn(f"{description} artifact not published: {e}", stacklevel=2)


def publish_run_report(ws: Workspace, run_id: str) -> Path | None:
    """Write reports/runs/<run_id>.md and, inside a Prefect flow run, publish it as a markdown artifact."""
    info = runs.run_info(ws, run_id)
    if info is None:
        return None
    md = run_report_markdown(info)
    path = ws.reports / "runs" / f"{run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    publish_markdown(md, f"run-{run_id}", f"{info['flow']} run report")
    return path
