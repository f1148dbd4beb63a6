"""Ending the runs a dead serve or worker left: the check a restarted `fiqa deploy serve` makes, `fiqa deploy
recover` (that check alone, once or with `--watch`) and `fiqa deploy worker` (a `prefect worker` that makes it first
and at every poll). The decisions (which run is dead, why a run waits) are in pipeline/recovery.py; see
docs/operations.md, "When a serve or worker process dies".
"""

from __future__ import annotations

import argparse
import functools
import threading
from datetime import UTC, datetime
from typing import Any

from flows import scheduled
from pipeline import recovery as R


def check_runs(names: list[str], notices: R.Notices) -> None:
    """End the runs of these deployments whose process is gone as Crashed, with their sub-flow and task runs (the
    server releases the slots they held), and say once (`notices`) why a run waits for a slot."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import LogCreate
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter, TaskRunFilter
    from prefect.states import Crashed

    active = {"type": {"any_": list(R.ACTIVE)}}
    with get_client(sync_client=True) as c:
        deps = {d.id: d for d in c.read_deployments(deployment_filter=DeploymentFilter(name={"any_": names}))}
        found = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id={"any_": list(deps)}, state={"type": {"any_": [*R.ACTIVE, "SCHEDULED"]}}))
        for run in (dead := R.dead(found)):
            ids = [run.id, *(r.id for r in c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id={"any_": [run.id]}, state=active)))]
            for t in c.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}),
                                      task_run_filter=TaskRunFilter(state=active)):
                c.set_task_run_state(t.id, Crashed(message=R.crash_message(run)), force=True)
            for i in reversed(ids):  # the sub-flow runs first, the run (and its slot) last
                c.set_flow_run_state(i, Crashed(message=R.crash_message(run)), force=True)
            print(R.crash_message(run), flush=True)
        for rid, line in notices.new(R.slot_waits([r for r in found if r not in dead], deps)).items():
            print(line, flush=True)
            c.create_logs([LogCreate(name="fiqa.deploy", level=20, message=line, flow_run_id=rid,
                                     timestamp=datetime.now(UTC))])


def recovery_check(workspaces: list[str] | None) -> Any:
    """A restarted serve's check for the runs a `prefect worker` (or a dead serve) of this machine left: end the
    dead runs of every deployment of this project's flows as Crashed (their slots released), record their
    workspaces' (or `workspaces`') dead runs as crashed, and say why a run waits for a slot. Runs it once now and
    returns it (a function of no arguments) for the next rounds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter

    flows = [scheduled.refresh_dataset.name, scheduled.relabel_subset.name, scheduled.train_and_score.name]
    with get_client(sync_client=True) as c:
        deps = c.read_deployments(flow_filter=FlowFilter(name={"any_": flows}))
    names = sorted({d.name for d in deps})
    R.recover_workspaces(workspaces or [d.parameters["workspace"] for d in deps if d.parameters.get("workspace")])
    check = functools.partial(check_runs, names, R.Notices())
    check()
    print(f"checked the runs of {len(names)} deployment(s): {', '.join(names) or 'none found'}", flush=True)
    return check


def recover(args: argparse.Namespace) -> None:
    """`fiqa deploy recover`: the recovery check once, or every `--watch` seconds."""
    check = recovery_check(args.workspaces)
    if args.watch:
        R.repeat(check, args.watch)


def worker(args: argparse.Namespace) -> int:
    """`fiqa deploy worker`: `prefect worker start --pool POOL` as a child that dies with this process, after the
    recovery check, which then runs at every poll of the worker (a restarted worker ends the runs a dead one left)."""
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS

    from pipeline.watchdog import spawn_watchdog

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a service manager's stop runs the cleanup below
    check = recovery_check(args.workspaces)
    child = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool,
                              *(["--limit", str(args.limit)] if args.limit else [])])
    spawn_watchdog(child.pid)  # a kill -9 of this process ends the worker too
    threading.Thread(target=R.repeat, args=(check, PREFECT_WORKER_QUERY_SECONDS.value()), daemon=True).start()
    try:
        return child.wait()
    finally:
        if child.poll() is None:  # Ctrl-C or SIGTERM here: the worker stops with its runs' own cleanup
            child.terminate()
            child.wait(timeout=60)
