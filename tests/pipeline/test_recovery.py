"""Dead runs and slot waits as a restarted serve judges them: a recorded process gone (or its pid reused), a
Pending run that never started, and the one line a waiting run gets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace as NS

from pipeline import recovery as R

HOST = socket.gethostname()
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run(name: str, state: str, pid: str | None = None, *, dep: str = "d1", state_name: str | None = None,
         age_s: float = 1.0, start: datetime | None = None, retry: datetime | None = None) -> NS:
    return NS(id=f"id-{name}", name=name, state_type=NS(value=state), state_name=state_name or state.title(),
              infrastructure_pid=pid, start_time=start, deployment_id=dep,
              state=NS(timestamp=NOW - timedelta(seconds=age_s), state_details=NS(scheduled_time=retry)))


def test_a_process_is_gone_when_it_ended_or_its_pid_belongs_to_a_later_process():
    me = R.process_key()
    assert me == f"{HOST}:{os.getpid()}"
    assert not R.process_gone(me) and not R.process_gone(me, datetime.now(UTC))
    assert R.process_gone(f"{HOST}:{_dead_pid()}")
    assert R.process_gone(me, datetime(2000, 1, 1, tzinfo=UTC))  # this pid started after that run: reused
    assert not R.process_gone(f"another-{HOST}:{_dead_pid()}")  # another host's: never judged
    assert not R.process_gone(None) and not R.process_gone("garbage")


def test_dead_runs_are_active_runs_whose_process_is_gone_or_that_never_started():
    gone = f"{HOST}:{_dead_pid()}"
    runs = [_run("alive", "RUNNING", R.process_key()), _run("gone", "RUNNING", gone),
            _run("done", "COMPLETED", gone), _run("cancelling", "CANCELLING", gone),
            _run("fresh-pending", "PENDING", age_s=30), _run("stale-pending", "PENDING", age_s=600),
            _run("running-unrecorded", "RUNNING", age_s=600)]
    assert [r.name for r in R.dead(runs, now=NOW)] == ["gone", "cancelling", "stale-pending"]
    assert R.crash_message(runs[1]) == (f"the process of flow run gone (id-gone; {gone}) is gone: marked Crashed "
                                        "by a restarted serve or worker")


def test_a_waiting_run_gets_one_line_naming_the_holder_and_the_limit():
    deps = {"d1": NS(name="refresh-x", global_concurrency_limit=NS(limit=1))}
    holder = _run("holder", "RUNNING", f"{HOST}:42", start=NOW)
    wait = _run("waiter", "SCHEDULED", state_name=R.WAITING, retry=NOW + timedelta(seconds=30))
    other = _run("other", "RUNNING", f"{HOST}:43", dep="d2", start=NOW)
    lines = R.slot_waits([holder, wait, other, _run("plain", "SCHEDULED")], deps)
    line = ("flow run waiter (id-waiter) waits for a slot of deployment refresh-x (concurrency limit 1), held by "
            f"flow run holder (id-holder), RUNNING since 2026-01-02 03:04:05 UTC, process {HOST}:42")
    assert lines == {"id-waiter": line + "; next try at 03:04:35 UTC"}
    assert R.slot_waits([wait], deps)["id-waiter"].endswith("held by no run of it (a lease not yet expired); "
                                                           "next try at 03:04:35 UTC")
    said = R.Notices()
    assert said.new(lines) == lines
    assert said.new({"id-waiter": line + "; next try at 03:05:05 UTC"}) == {}  # the same wait, retried: said once
    assert said.new({}) == {} and said.new(lines) == lines  # a new wait is said again
