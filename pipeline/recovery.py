"""Runs of a served deployment whose process is gone, and why a run waits for a concurrency slot; no Prefect.

A scheduled flow run records where it runs (`host:pid`, in the flow run's `infrastructure_pid` field) as it
starts (flows.bookkeeping.die_with_runner). `fiqa deploy serve` checks the runs of its deployments when it
starts and then at every poll (flows.deploy): a Pending or Running run whose recorded process is gone (on this
host) is dead, and is ended Crashed with its sub-flow and task runs, which releases the concurrency slot it
held; a run held back by the deployment's concurrency limit gets one line naming the run that holds the slot.
The runs are Prefect's run objects, read here by attribute only. See docs/operations.md.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from data_manifest import Workspace, runs

ACTIVE = ("PENDING", "RUNNING", "CANCELLING")  # states that hold a deployment's concurrency slot
WAITING = "AwaitingConcurrencySlot"  # the Scheduled state the server gives a run refused a slot
PENDING_GRACE_S = 120.0  # a Pending run with no recorded process after this long never started


def process_key(pid: int | None = None) -> str:
    """Where a run's process is: `host:pid` (this process by default)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def _started(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), or None when there is none (a zombie counts as none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:  # no /proc: existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    return None if fields[0] in ("Z", "X") else boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_gone(key: str | None, since: datetime | None = None) -> bool:
    """True when `key` (`host:pid`) names a process of this host that no longer runs, or whose pid now belongs to
    a process started after `since` (the run's start). A process of another host is never called gone."""
    host, _, pid = (key or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    started = _started(int(pid))
    return started is None or (since is not None and started > since.timestamp() + 1.0)


def _state(run: Any) -> str:
    return getattr(run.state_type, "value", str(run.state_type))


def dead(runs: Iterable[Any], now: datetime | None = None) -> list[Any]:
    """The runs holding a slot (Pending, Running, Cancelling) whose process is gone; a Pending run without a
    recorded process counts as dead after PENDING_GRACE_S (its process never started)."""
    now = now or datetime.now(UTC)
    out = []
    for run in runs:
        if _state(run) not in ACTIVE:
            continue
        if run.infrastructure_pid:
            if process_gone(run.infrastructure_pid, run.start_time):
                out.append(run)
        elif _state(run) == "PENDING" and run.state and (now - run.state.timestamp).total_seconds() > PENDING_GRACE_S:
            out.append(run)
    return out


def crash_message(run: Any) -> str:
    where = run.infrastructure_pid or "no process recorded"
    return (f"the process of flow run {run.name} ({run.id}; {where}) is gone: marked Crashed by a restarted serve "
            "or worker")


def slot_waits(runs: list[Any], deployments: dict[Any, Any]) -> dict[Any, str]:
    """{waiting run id: why it waits} for the runs the server refused a slot: their deployment ({id: deployment}),
    its concurrency limit and the runs that hold its slots, with their state and process."""
    out = {}
    for run in runs:
        if _state(run) != "SCHEDULED" or run.state_name != WAITING:
            continue
        holders = [h for h in runs if h.deployment_id == run.deployment_id and _state(h) in ACTIVE]
        held = "; ".join(f"flow run {h.name} ({h.id}), {_state(h)} since "
                         f"{(h.start_time or h.state.timestamp):%Y-%m-%d %H:%M:%S} UTC, process "
                         f"{h.infrastructure_pid or 'not recorded'}" for h in holders)
        retry = run.state.state_details.scheduled_time if run.state else None
        dep = deployments.get(run.deployment_id)
        limit = getattr(getattr(dep, "global_concurrency_limit", None), "limit", None)
        out[run.id] = (f"flow run {run.name} ({run.id}) waits for a slot of deployment {getattr(dep, 'name', '?')} "
                       f"(concurrency limit {limit}), held by {held or 'no run of it (a lease not yet expired)'}"
                       + (f"; next try at {retry:%H:%M:%S} UTC" if retry else ""))
    return out


class Notices:
    """Say each wait once: a line is new when the waiting run or what it waits for changed."""

    def __init__(self) -> None:
        self.said: dict[Any, str] = {}

    def new(self, lines: dict[Any, str]) -> dict[Any, str]:
        def gist(line: str) -> str:
            return line.split("; next try")[0]

        fresh = {k: v for k, v in lines.items() if gist(self.said.get(k, "")) != gist(v)}
        self.said = {k: lines[k] for k in lines}  # a run no longer waiting is forgotten
        return fresh


def recover_workspaces(roots: Iterable[str | None]) -> list[str]:
    """Record as crashed the workspace runs whose process died (data_manifest.runs.recover_crashed) in each
    workspace (None: the default one); returns their ids, each also printed."""
    found = []
    for root in dict.fromkeys(roots):
        for run_id in runs.recover_crashed(Workspace(root)):
            print(f"workspace run {run_id} was running in a process that died: recorded as crashed", flush=True)
            found.append(run_id)
    return found


def repeat(step: Callable[[], None], every: float) -> None:
    """Call `step` every `every` seconds, forever; an error is one warning line and the next round tries again."""
    while True:
        time.sleep(every)
        try:
            step()
        except Exception as e:  # noqa: BLE001 - the server may be restarting: the next round tries again
            print(f"warning: checking the served runs failed: {type(e).__name__}: {e}", flush=True)
