"""Runs whose process died: found by their free lock, recorded as crashed once, and offered for a resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from data_manifest import catalog, runs

ROOT = Path(__file__).resolve().parents[2]
_HOLDER = """
import sys, time
from data_manifest import Workspace, runs
ws = Workspace(sys.argv[1])
with runs.run_lock(ws, sys.argv[2]):
    runs.start_run(ws, "label", {"where": "x"}, sys.argv[2])
    runs.mark_shard_done(ws, sys.argv[2], "00000", {"faces_rows": 3})
    print("started", flush=True)
    time.sleep(300)
"""


def _holder(ws, run_id: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ws.root), run_id], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "started"
    return proc


def test_a_run_whose_process_died_is_recorded_crashed_and_resumable(workspace):
    dead, alive = _holder(workspace, "label-dead"), _holder(workspace, "label-alive")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert runs.resumable(workspace, "label", {"where": "x"}) is None  # still recorded as running
        assert runs.recover_crashed(workspace) == ["label-dead"]  # the live holder's run is left alone
        assert runs.recover_crashed(workspace) == []  # recorded once
        info = runs.run_info(workspace, "label-dead")
        assert info["status"] == runs.CRASHED and info["counts"] == {"faces_rows": 3}
        assert f"pid {dead.pid} on " in info["error"]
        assert runs.resumable(workspace, "label", {"where": "x"}) == "label-dead"
        assert runs.resumable(workspace, "label", {"where": "y"}) is None  # other parameters: a new run
        assert runs.is_running(runs.run_info(workspace, "label-alive"))
        rows = catalog.query(workspace, "SELECT run_id, status FROM runs ORDER BY run_id").to_pylist()
        assert rows == [{"run_id": "label-alive", "status": "running"}, {"run_id": "label-dead", "status": "crashed"}]
        with runs.run_lock(workspace, "label-dead"):  # the resume takes the dead holder's lock over
            runs.start_run(workspace, "label", {"where": "x"}, "label-dead")
            assert runs.resumable(workspace, "label", {"where": "x"}) is None
            assert runs.shard_done(workspace, "label-dead", "00000")  # its committed shard is kept
            assert json.loads((workspace.runs_dir / "label-dead" / "lock").read_text())["pid"] != dead.pid
    finally:
        for p in (dead, alive):
            p.kill()
            p.wait(timeout=30)
