"""Flow plumbing: sharding, task runners, tracked runs and their reports, the CLI frame."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_manifest import Workspace, catalog, runs
from flows import runners, runtime
from flows.cli import COMMANDS, main


def test_chunks_cover_every_item_once():
    items = list(range(10))
    parts = runtime.chunks(items, 4)
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="shard size"):
        runtime.chunks(items, 0)


def test_unknown_runner_is_refused():
    with pytest.raises(ValueError, match="unknown task runner 'spark'"):
        runners.make_task_runner("spark")


def test_tracked_run_records_success_and_failure_with_reports(workspace):
    with runtime.tracked_run(workspace, "ingest", {"path": "/x"}, "run-ok") as state:
        state["counts"] = {"rows": 7}
        state["metrics"] = {"seconds": 1.25}
    with pytest.raises(RuntimeError, match="boom"):
        with runtime.tracked_run(workspace, "ingest", {"path": "/y"}, "run-bad"):
            raise RuntimeError("boom")
    rows = {r["run_id"]: r for r in catalog.query(workspace, "SELECT * FROM runs").to_pylist()}
    assert rows["run-ok"]["status"] == "completed" and json.loads(rows["run-ok"]["counts"]) == {"rows": 7}
    assert rows["run-bad"]["status"] == "failed" and "RuntimeError: boom" in rows["run-bad"]["error"]
    ok = (workspace.reports / "runs" / "run-ok.md").read_text()
    assert "status: **completed**" in ok and '"rows": 7' in ok and '"path": "/x"' in ok
    assert "error: RuntimeError: boom" in (workspace.reports / "runs" / "run-bad.md").read_text()
    assert workspace.catalog_path.exists()


def test_a_run_stopped_by_a_signal_is_crashed_so_that_it_resumes(workspace):
    from prefect.exceptions import TerminationSignal

    with pytest.raises(TerminationSignal):
        with runtime.tracked_run(workspace, "label", {}, "run-term"):
            raise TerminationSignal(signal.SIGTERM)
    row = catalog.query(workspace, "SELECT * FROM runs WHERE run_id = 'run-term'").to_pylist()[0]
    assert row["status"] == "crashed" and "TerminationSignal" in row["error"]


def test_cli_help_lists_every_command_and_starts_nothing_heavy():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; main(['--help']); "
                          "print(sorted(m for m in ('prefect', 'torch', 'open_clip') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout
    assert out.stdout.strip().endswith("[]"), "fiqa --help must not import prefect, torch or open_clip"
    assert time.perf_counter() - t0 < 30


def test_sql_command_refuses_writes(workspace, capsys):
    from data_manifest import ShardWriter

    ShardWriter(workspace, "samples", "r1").write(0, [{"sample_id": "a", "dataset": "d", "source_kind": "folder",
                                                       "source": "/a", "status": "ok"}])
    assert main(["sql", "--workspace", str(workspace.root), "DROP VIEW samples"]) == 2
    assert "refused: DROP" in capsys.readouterr().err
    assert main(["sql", "--workspace", str(workspace.root), "SELECT count(*) AS n FROM samples",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 1}]
    out = workspace.root / "out.parquet"
    assert main(["sql", "--workspace", str(workspace.root), "SELECT sample_id FROM samples",
                 "--format", "parquet", "--output", str(out)]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("sample_id").to_pylist() == ["a"]
    assert main(["sql", "--workspace", str(workspace.root), "SELECT nope FROM samples"]) == 2
    assert "nope" in capsys.readouterr().err


def test_resuming_a_completed_run_keeps_the_rates_of_the_work(workspace):
    rid = runs.start_run(workspace, "label", {"stages": "blur"})
    runs.finish_run(workspace, rid, runs.COMPLETED, metrics={"images_per_s": 812.5})
    runs.start_run(workspace, "label", {"stages": "blur"}, rid)  # a resume: every shard is already committed
    runs.finish_run(workspace, rid, runs.COMPLETED, metrics={"images_per_s": 0.0})
    row = catalog.query(workspace, f"SELECT status, metrics FROM runs WHERE run_id = '{rid}'").to_pylist()
    assert row[0]["status"] == "completed" and json.loads(row[0]["metrics"]) == {"images_per_s": 812.5}
    failed = runs.start_run(workspace, "label", {})
    runs.finish_run(workspace, failed, runs.FAILED, metrics={"images_per_s": 3.0}, error="x")
    runs.start_run(workspace, "label", {}, failed)
    runs.finish_run(workspace, failed, runs.COMPLETED, metrics={"images_per_s": 5.0})  # a resume that did work
    row = catalog.query(workspace, f"SELECT metrics FROM runs WHERE run_id = '{failed}'").to_pylist()
    assert json.loads(row[0]["metrics"]) == {"images_per_s": 5.0}


def test_a_refusal_inside_a_flow_ends_in_one_error_line(workspace, prefect_harness, capfd):
    from data_manifest import ShardWriter

    ShardWriter(workspace, "samples", "r1").write(0, [{"sample_id": "a", "dataset": "d", "source_kind": "folder",
                                                       "source": "/x/a.png", "status": "ok"}])
    catalog.refresh(workspace)
    capfd.readouterr()
    rc = main(["label", "--workspace", str(workspace.root), "--stages", "blur",
               "--where", "sample_id IN (SELECT * FROM json_execute_serialized_sql('x'))"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("fiqa label: error: refused: table function"), err


def test_every_option_help_names_its_default():
    import argparse
    import importlib

    from flows.cli import DefaultsShown

    for name, (module, _) in COMMANDS.items():
        p = argparse.ArgumentParser(prog=f"fiqa {name}", formatter_class=DefaultsShown)
        importlib.import_module(module).configure_parser(p)
        actions = [a for a in p._actions if a.option_strings and a.default not in (None, False, argparse.SUPPRESS)
                   and a.nargs != 0]
        text = " ".join(p.format_help().split())
        for a in actions:
            shown = DefaultsShown(p.prog)._get_help_string(a) % {"default": a.default}
            assert "default" in shown.lower(), (name, a.option_strings)
        assert "(default: 8192)" in text or name != "anchors"


def test_a_shard_whose_files_the_flow_does_not_see_fails_the_run_and_resumes(workspace, prefect_harness):
    from prefect import flow, task

    from data_manifest import ShardWriter, commits

    lost = {"worker": "elsewhere (pid 7)", "files": {"manifests/samples/run=r1/part-a.parquet": 2}}

    @task
    @commits.receipted
    def shard_task(ws_root, run_id, shard, n, lose=False):
        rows = [{"sample_id": f"{shard}{i}", "dataset": "d", "source_kind": "folder", "source": "/x", "status": "ok"}
                for i in range(n)]
        ShardWriter(Workspace(ws_root), "samples", run_id).write(shard, rows)
        return {"rows": n}

    @task
    def lost_task(ws_root, run_id, shard, n, lose=False):  # as a worker writing to its own disk reports it
        return {"rows": n, commits.RECEIPT: lost}

    @flow
    def sharded(t):
        with runtime.tracked_run(workspace, "ingest", {}, "r1") as state:
            outcomes = runtime.run_shards(t, {"a": 2, "b": 1}, ws=workspace, run_id=state["run_id"], desc="t",
                                          progress=False)
            runtime.check_shard_failures(outcomes, state["run_id"])
        return runs.shard_counts(workspace, "r1")

    with pytest.raises(runtime.ShardFailures, match=r"elsewhere \(pid 7\) wrote files under .* does not see") as e:
        sharded(lost_task)
    assert "re-run with --run-id r1" in str(e.value) and str(workspace.root) in str(e.value)
    assert not runs.shard_done(workspace, "r1", "a") and not runs.shard_done(workspace, "r1", "b")
    assert sharded(shard_task) == {"rows": 3}
    marker = json.loads((workspace.runs_dir / "r1" / "shards" / "a.json").read_text())
    assert marker["worker"].endswith(f"(pid {os.getpid()})") and commits.RECEIPT not in marker["counts"]
