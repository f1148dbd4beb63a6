"""Compacted snapshots: every latest view read through them equals the window over the whole history,
after ingest, label, relabel, a failed run and its resume, and for rows written out of order or replaced."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import duckdb
import numpy as np
import pytest

from data_manifest import ShardWriter, Workspace, catalog, runs, snapshots
from data_manifest.schemas import KEYS
from flows import runtime


def _sample(i: int, **kw) -> dict:
    return {"sample_id": f"s{i:03d}", "dataset": "gen", "source_kind": "list", "source": f"/gen/{i}.png",
            "status": "ok", "identity": i % 4, **kw}


def _factor(i: int, factor: str, value: float, **kw) -> dict:
    return {"sample_id": f"s{i:03d}", "factor": factor, "value": value, "class_index": int(value > 0.5),
            "class_name": "high" if value > 0.5 else "low", "labeller": "t", "labeller_version": "1",
            "status": "ok", **kw}


def _run(ws: Workspace, flow: str, writes: dict[str, list[dict]], status: str | None = runs.COMPLETED) -> str:
    """A registered run writing one shard per table; finished with `status` (None: still running)."""
    rid = runs.start_run(ws, flow, {})
    for table, rows in writes.items():
        ShardWriter(ws, table, rid).write(0, rows)
    if status is not None:
        runs.finish_run(ws, rid, status)
    return rid


def test_fold_equals_history_and_touches_only_the_change(workspace, assert_views_match_history):
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(40)]})
    _run(ws, "label", {"factors": [_factor(i, f, (i * 7 % 10) / 10) for i in range(40) for f in ("blur", "pose")],
                       "faces": [{"sample_id": f"s{i:03d}", "status": "ok", "n_faces": 1} for i in range(40)]})
    catalog.refresh(ws)
    states = assert_views_match_history(ws)
    assert all(states[t].usable and not states[t].pending for t in (*snapshots.SNAPSHOT_TABLES, "labels"))

    # A relabel of 5 samples folds 10 factor rows and recomputes 5 labels rows, nothing else.
    _run(ws, "relabel", {"factors": [_factor(i, "blur", 0.99) for i in range(0, 10, 2)]})
    folds: list[snapshots.FoldReport] = []
    catalog.refresh(ws, folds=folds)
    report = folds[-1].as_dict()["tables"]
    assert report["factors"] == {"shards": 1, "rows": 5, "rebuilt": False}
    assert report["labels"] == {"samples": 5, "rebuilt": False}
    assert report["samples"] == {"shards": 0, "rows": 0, "rebuilt": False}
    assert_views_match_history(ws)
    got = catalog.query(ws, "SELECT blur_value FROM labels WHERE sample_id = 's004'").column(0).to_pylist()
    assert got == [0.99]
    # 5 of 80 factor rows replaced: kept as deletions; 5 of 40 labels rows: past 10%, rewritten in key order.
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        meta = dict(con.execute("SELECT key, value FROM snapshot_meta").fetchall())
    assert meta["replaced_snapshot_factors"] == "5" and meta["replaced_snapshot_labels"] == "0"


def test_pending_rows_of_running_and_failed_runs_are_overlaid_exactly(workspace, assert_views_match_history):
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(12)]})
    _run(ws, "label", {"factors": [_factor(i, "blur", 0.2) for i in range(12)]})
    catalog.refresh(ws)
    failed = _run(ws, "label", {"factors": [_factor(i, "blur", 0.9) for i in range(3)]}, status=runs.FAILED)
    running = _run(ws, "label", {"factors": [_factor(i, "pose", 0.7) for i in range(2, 6)],
                                 "samples": [_sample(20)]}, status=None)
    catalog.refresh(ws)  # neither run completed: their shards stay pending, not folded
    states = assert_views_match_history(ws)
    assert sorted(p.parent.name for p in states["factors"].pending) == sorted([f"run={failed}", f"run={running}"])
    assert states["labels"].usable and len(states["samples"].pending) == 1
    assert catalog.query(ws, "SELECT count(*) FROM labels").column(0)[0].as_py() == 13

    # The failed run resumes and completes, the running one completes: both fold, nothing stays pending.
    runs.start_run(ws, "label", {}, failed)
    runs.finish_run(ws, failed, runs.COMPLETED)
    runs.finish_run(ws, running, runs.COMPLETED)
    catalog.refresh(ws)
    states = assert_views_match_history(ws)
    assert not any(states[t].pending for t in snapshots.SNAPSHOT_TABLES)


def test_an_older_row_folded_later_does_not_replace_a_newer_one(workspace, assert_views_match_history):
    """A run that started earlier but commits later: the latest row is the newest by created_at, as in history."""
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(4)]})
    new = datetime.now(UTC)
    _run(ws, "label", {"factors": [_factor(i, "blur", 0.8, created_at=new) for i in range(4)]})
    catalog.refresh(ws)
    old = new - timedelta(hours=1)
    late = _run(ws, "label", {"factors": [_factor(i, "blur", 0.1, created_at=old) for i in range(2)]
                              + [_factor(3, "pose", 0.3, created_at=old)]}, status=None)
    assert_views_match_history(ws)  # as pending rows
    runs.finish_run(ws, late, runs.COMPLETED)
    catalog.refresh(ws)  # and folded
    states = assert_views_match_history(ws)
    assert not states["factors"].pending
    rows = catalog.query(ws, "SELECT sample_id, blur_value, pose_value FROM labels ORDER BY 1").to_pylist()
    assert [r["blur_value"] for r in rows] == [0.8] * 4 and rows[3]["pose_value"] == 0.3


def test_a_replaced_or_removed_shard_rebuilds_its_snapshot(workspace, assert_views_match_history):
    ws = workspace
    rid = _run(ws, "ingest", {"samples": [_sample(i) for i in range(6)]})
    _run(ws, "label", {"factors": [_factor(i, "blur", 0.4) for i in range(6)]})
    catalog.refresh(ws)
    ShardWriter(ws, "samples", rid).write(0, [_sample(i, identity=9) for i in range(3)])  # replaced in place
    states = assert_views_match_history(ws)  # answered from the history meanwhile
    assert not states["samples"].usable and not states["labels"].usable and states["factors"].usable
    logs: list[str] = []
    catalog.refresh(ws, log=logs.append)
    assert any("changed or removed" in m for m in logs)
    states = assert_views_match_history(ws)
    assert states["samples"].usable and states["labels"].usable
    assert catalog.query(ws, "SELECT count(*) FROM labels").column(0)[0].as_py() == 3


def _views(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The views registered on the query connection (not those of the attached catalog.duckdb)."""
    return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE temporary").fetchall()}


def test_a_query_that_names_no_history_view_leaves_out_the_history_it_does_not_need(workspace):
    ws = workspace
    rid = _run(ws, "ingest", {"samples": [_sample(i) for i in range(6)]})
    _run(ws, "label", {"factors": [_factor(i, "blur", 0.4) for i in range(6)]})
    catalog.refresh(ws)
    assert not catalog.names_history("SELECT * FROM labels WHERE sample_id = 's001'")
    assert all(catalog.names_history(q) for q in ("SELECT * FROM Factors_History", "SHOW TABLES", "DESCRIBE samples",
                                                  "SELECT * FROM duckdb_views()"))
    con = catalog.connect(ws, history=False)
    try:  # every snapshot usable: no history view is registered, the latest views answer from the snapshots
        assert not any(v.endswith("_history") and v.removesuffix("_history") in snapshots.SNAPSHOT_TABLES
                       for v in _views(con))
        assert con.execute("SELECT count(*) FROM labels").fetchone()[0] == 6
    finally:
        con.close()
    ShardWriter(ws, "samples", rid).write(0, [_sample(i, identity=9) for i in range(3)])  # samples snapshot stale
    con = catalog.connect(ws, history=False)
    try:  # the stale table's latest view falls back on its history, which is registered; the others are not
        names = _views(con)
        assert "samples_history" in names and "factors_history" not in names
        assert con.execute("SELECT count(*), min(identity) FROM samples").fetchone() == (3, 9)
    finally:
        con.close()
    assert catalog.query(ws, "SELECT count(*) FROM factors_history").column(0)[0].as_py() == 6
    assert catalog.query(ws, "SELECT count(*) FROM labels").column(0)[0].as_py() == 3


def test_compact_builds_snapshots_for_a_workspace_written_without_them(workspace, capsys, monkeypatch,
                                                                       assert_views_match_history):
    """Shards laid out by another tool (no run records, no catalog): `fiqa compact` folds them all."""
    from flows import cli

    ws = workspace
    ShardWriter(ws, "samples", "other-tool-1").write("a", [_sample(i) for i in range(8)])
    ShardWriter(ws, "factors", "other-tool-1").write("a", [_factor(i, "pose", 0.6) for i in range(8)])
    ShardWriter(ws, "factors", "other-tool-2").write("a", [_factor(i, "pose", 0.1) for i in range(4)])
    assert not ws.catalog_path.exists()
    monkeypatch.setattr(snapshots, "LABELS_PART", 3)  # `labels` built in sample-id ranges, as at MS1MV2 size
    assert cli.main(["compact", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "factors  8 latest rows from 2 shards" in out and "labels   8 samples" in out
    states = assert_views_match_history(ws)
    assert all(states[t].usable and not states[t].pending for t in (*snapshots.SNAPSHOT_TABLES, "labels"))
    assert catalog.query(ws, "SELECT sum(pose_value) FROM labels").column(0)[0].as_py() == pytest.approx(0.4 + 2.4)


def _snapshot_tables(ws: Workspace) -> dict[str, list[tuple]]:
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        return {t: sorted(con.execute(f"SELECT * FROM {snapshots.snapshot_name(t)}").fetchall(), key=repr)
                for t in (*snapshots.SNAPSHOT_TABLES, "labels")}


# 20 changed rows: past REWRITE_FRACTION of `labels` (rebuilt in ranges); 2: not
@pytest.mark.parametrize("changed", [pytest.param(20, marks=pytest.mark.slow), 2])
def test_a_fold_split_into_steps_equals_one_fold(workspace, monkeypatch, changed, assert_views_match_history):
    """Shards folded a few rows at a time (newest row per key across steps, older rows never winning, `labels`
    replaced in several steps) give exactly the snapshot of one fold, and the history window."""
    import shutil

    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(30)]})
    catalog.refresh(ws)
    t0 = datetime.now(UTC)
    ids = range(changed)
    rid = runs.start_run(ws, "label", {})  # one run, several shards: the same key in two of them
    w = ShardWriter(ws, "factors", rid)
    w.write(0, [_factor(i, "blur", 0.3, created_at=t0) for i in ids])
    w.write(1, [_factor(i, "pose", 0.6, created_at=t0) for i in ids])
    w.write(2, [_factor(i, "blur", 0.7, created_at=t0 + timedelta(minutes=1)) for i in ids[::2]])
    ShardWriter(ws, "faces", rid).write(0, [{"sample_id": f"s{i:03d}", "status": "ok", "n_faces": 1} for i in ids])
    runs.finish_run(ws, rid, runs.COMPLETED)
    # A run committed later whose rows are older: in a later step, they must not replace the newer ones.
    _run(ws, "label", {"factors": [_factor(i, "blur", 0.1, created_at=t0 - timedelta(hours=1)) for i in ids]
                       + [_factor(i, "expression", 0.2, created_at=t0 - timedelta(hours=1)) for i in ids[:1]]})
    before = ws.catalog_path.with_name("before.duckdb")
    shutil.copy(ws.catalog_path, before)

    catalog.refresh(ws)  # one step
    whole = _snapshot_tables(ws)
    shutil.copy(before, ws.catalog_path)
    monkeypatch.setattr(snapshots, "FOLD_ROWS", 1)  # about one staged row a step, one sample of `labels` a step
    monkeypatch.setattr(snapshots, "REWRITE_PART", 1)
    ranges: list[tuple] = []
    fold_range = snapshots._fold_range
    monkeypatch.setattr(snapshots, "_fold_range", lambda con, t, lo, hi: (ranges.append((t, lo, hi)),
                                                                          fold_range(con, t, lo, hi))[1])
    folds: list[snapshots.FoldReport] = []
    catalog.refresh(ws, folds=folds)
    steps = [(lo, hi) for t, lo, hi in ranges if t == "factors"]
    assert len(steps) >= changed and steps[0][0] is None and steps[-1][1] is None  # consecutive, all ids
    assert all(a[1] == b[0] for a, b in zip(steps[:-1], steps[1:], strict=True))
    assert _snapshot_tables(ws) == whole
    assert folds[-1].tables["labels"] == {"samples": changed, "rebuilt": False}
    assert_views_match_history(ws)
    got = catalog.query(ws, "SELECT blur_value, pose_value, expression_value FROM labels WHERE sample_id = 's000'")
    assert got.to_pylist() == [{"blur_value": 0.7, "pose_value": 0.6, "expression_value": 0.2}]


def _duck_mib(con: duckdb.DuckDBPyConnection, tag: str) -> float:
    got = con.execute("SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = ?", [tag]).fetchone()
    return got[0] / 2**20


@pytest.mark.slow
def test_a_step_checkpoint_hands_back_the_blocks_it_read(workspace, monkeypatch):
    """After `_checkpoint` DuckDB no longer holds the table blocks a step read, and the memory limit in use
    (a build's or a step's) is set again; with more pinned than the brief limit (nothing can be evicted), it
    still goes on."""
    monkeypatch.setenv(snapshots.ENV_MEMORY, "3GB")
    monkeypatch.setenv(snapshots.ENV_FOLD_MEMORY, "300MB")

    def limit(con: duckdb.DuckDBPyConnection) -> str:
        return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]

    with duckdb.connect(":memory:") as ref:
        ref.execute("SET memory_limit = '3GB'")
        build_limit = limit(ref)
        ref.execute("SET memory_limit = '300MB'")
        fold_limit = limit(ref)
    with duckdb.connect(str(workspace.catalog_path)) as con:
        snapshots._configure(con, workspace)
        con.execute("CREATE TABLE big AS SELECT range AS i, md5(range::VARCHAR) AS s FROM range(4000000)")
        snapshots._checkpoint(con)
        con.execute("SELECT count(DISTINCT s), sum(i) FROM big").fetchall()  # reads every block back
        held = _duck_mib(con, "BASE_TABLE")
        snapshots._checkpoint(con)
        assert held > 40 and _duck_mib(con, "BASE_TABLE") <= 16  # what fits under RELEASE_LIMIT stays
        assert limit(con) == build_limit
        snapshots._use_limit(con, build=False)
        snapshots._checkpoint(con)
        assert limit(con) == fold_limit
    with duckdb.connect(":memory:") as con:  # no file, no spill directory: nothing can be evicted
        snapshots._use_limit(con, build=True)
        con.execute("CREATE TABLE pinned AS SELECT range AS i, md5(range::VARCHAR) AS s FROM range(1500000)")
        snapshots._checkpoint(con)
        assert con.execute("SELECT count(*) FROM pinned").fetchone()[0] == 1_500_000
        assert limit(con) == build_limit


def test_snapshot_keys_are_the_latest_view_keys():
    assert set(snapshots.SNAPSHOT_TABLES) <= set(KEYS) and set(snapshots.LABEL_INPUTS) <= set(snapshots.SNAPSHOT_TABLES)


@pytest.mark.slow
def test_flows_keep_snapshots_equal_to_history(prefect_harness, workspace, monkeypatch, assert_views_match_history):
    """Label, a relabel of a subset, a failed label run and its resume, through the real flows."""
    from data_manifest.crops import write_pack
    from flows import label as L
    from flows import relabel as R
    from pipeline.labellers import batch

    ws = workspace
    rng = np.random.default_rng(1)
    rel = write_pack(ws, "align-t", 0, rng.integers(0, 255, size=(9, 112, 112, 3), dtype=np.uint8))
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(10)],
                        "faces": [{"sample_id": f"s{i:03d}", "crop_file": rel, "crop_index": i, "status": "ok"}
                                  for i in range(9)] + [{"sample_id": "s009", "status": "no_face"}]})
    kw = {"workspace": str(ws.root), "shard_size": 3, "progress": False}
    L.label(stages=["blur"], **kw)
    assert_views_match_history(ws)
    R.relabel(stages=["blur"], where="sample_id IN ('s001', 's004')", options={"blur_thresholds": "paper"}, **kw)
    assert_views_match_history(ws)
    real = batch.label_rows
    monkeypatch.setattr(batch, "label_rows", lambda ws_, rid, shard, rows, *a: (_ for _ in ()).throw(OSError("gone"))
                        if shard == "00001" else real(ws_, rid, shard, rows, *a))
    with pytest.raises(runtime.ShardFailures):
        L.label(stages=["blur"], **kw, run_id="label-again")
    states = assert_views_match_history(ws)
    assert states["factors"].pending  # the failed run's committed shards: not folded, overlaid
    monkeypatch.setattr(batch, "label_rows", real)
    L.label(stages=["blur"], **kw, run_id="label-again")
    states = assert_views_match_history(ws)
    assert not states["factors"].pending and states["labels"].usable


def test_an_open_query_does_not_block_a_refresh_and_keeps_its_answers(workspace, assert_views_match_history):
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(3)]})
    catalog.refresh(ws)
    con = catalog.connect(ws)  # holds catalog.duckdb attached read-only
    try:
        _run(ws, "label", {"factors": [_factor(0, "blur", 0.9)]})
        assert catalog.refresh(ws, retries=1, wait_s=0.0)  # folded into a copy, swapped in
        assert not assert_views_match_history(ws)["factors"].pending
        assert con.execute("SELECT count(*) FROM factors").fetchone() == (0,)  # what it opened
    finally:
        con.close()
    _run(ws, "label", {"factors": [_factor(1, "blur", 0.5)]})
    assert catalog.refresh(ws)  # and the swapped-in file is an ordinary catalog again
    assert not assert_views_match_history(ws)["factors"].pending


def test_a_refresh_blocked_by_a_writer_warns_and_the_next_one_folds(workspace, assert_views_match_history):
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(3)]})
    catalog.refresh(ws)
    code = (f"import duckdb,sys; c=duckdb.connect({str(ws.catalog_path)!r}); print('open', flush=True); "
            "sys.stdin.readline(); c.close()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        _run(ws, "label", {"factors": [_factor(0, "blur", 0.9)]})
        with pytest.warns(UserWarning, match="not refreshed"):
            assert not catalog.refresh(ws, retries=2, wait_s=0.05)
    finally:
        proc.communicate("\n", timeout=10)
    states = assert_views_match_history(ws)
    assert len(states["factors"].pending) == 1  # not folded yet, still answered exactly
    assert catalog.refresh(ws)
    assert not assert_views_match_history(ws)["factors"].pending


@pytest.mark.slow
def test_scale_benchmark_runs_small_and_folds_only_the_relabel():
    """benchmarks/scale.py end to end on 3,000 samples: the relabel refresh touches exactly the relabelled samples."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "benchmarks/scale.py", "--samples", "3000", "--shard-size", "1000",
                          "--relabel", "250", "--repeats", "1"], cwd=root, capture_output=True, text=True,
                         timeout=300, check=True)
    out = json.loads(res.stdout)
    assert out["snapshot_build"]["snapshots"]["tables"]["factors"] == {"shards": 6, "rows": 15000, "rebuilt": True}
    folded = out["refresh_after_relabel"]["snapshots"]["tables"]
    assert folded["factors"] == {"shards": 1, "rows": 1250, "rebuilt": False}
    assert folded["labels"] == {"samples": 250, "rebuilt": False}
    assert out["queries"]["factor_distribution"]["rows"] == 12 and out["queries"]["lookup_labels"]["rows"] == 1
    assert out["queries"]["lookup_factors"]["rows"] == 5
    assert out["peer_history_window"]["factor_crosstab"]["rows"] == out["queries"]["factor_crosstab"]["rows"] == 9
    assert out["peer_history_window"]["factor_crosstab"]["answer"] == out["queries"]["factor_crosstab"]["answer"]
    assert out["same_answers_queries"] is out["same_answers_queries_after_relabel"] is True
    assert folded["factor_class_counts"] == {"counted_rows": 15000} and out["compact"]["ok"]


def _labelled(i: int, factor: str, k: int, **kw) -> dict:
    """A factor row of sample i with class k of the real vocabulary (what the bundled questions name)."""
    from data_manifest.vocabulary import FACTOR_CLASSES

    classes = FACTOR_CLASSES[factor]
    return {"sample_id": f"s{i:03d}", "factor": factor, "value": k / 10, "class_index": k % len(classes),
            "class_name": classes[k % len(classes)], "labeller": "t", "labeller_version": "1", "status": "ok", **kw}


def _counts(ws: Workspace, name: str) -> list[tuple]:
    return [tuple(r.values()) for r in catalog.query(ws, f"SELECT * FROM {name} ORDER BY ALL").to_pylist()]


def _bundled_match_previous(ws: Workspace, previous_sql: dict[str, str]) -> None:
    """The bundled questions that read the kept counts give what they gave when they scanned the views."""
    for name, previous in previous_sql.items():
        assert catalog.query(ws, catalog.bundled_sql(name)) == catalog.query(ws, previous), name


def test_class_counts_are_kept_by_the_refresh_that_changes_them(workspace, assert_views_match_history,
                                                                 previous_bundled_sql):
    from data_manifest.vocabulary import FACTORS

    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(30)]})
    _run(ws, "label", {"factors": [_labelled(i, f, i % 5) for i in range(30) for f in FACTORS]})
    catalog.refresh(ws)
    states = assert_views_match_history(ws)
    assert states["factor_class_counts"].usable and states["label_class_counts"].usable
    blur = [r for r in _counts(ws, "factor_class_counts") if r[0] == "blur"]
    assert blur == [("blur", 0, "hazy", "ok", 12), ("blur", 1, "blurry", "ok", 12), ("blur", 2, "clear", "ok", 6)]
    _bundled_match_previous(ws, previous_bundled_sql)

    # A relabel of 4 samples (blur -> clear, one an error): the counts move by exactly those rows.
    _run(ws, "relabel", {"factors": [_labelled(i, "blur", 2, **({"status": "error"} if i == 3 else {}))
                                     for i in range(4)]})
    folds: list[snapshots.FoldReport] = []
    catalog.refresh(ws, folds=folds)
    report = folds[-1].as_dict()["tables"]
    assert report["factor_class_counts"] == {"counted_rows": 150} and report["label_class_counts"] == {
        "counted_rows": 30}
    blur = [r for r in _counts(ws, "factor_class_counts") if r[0] == "blur"]  # samples 0-3 were 0, 1, 2, 3 % 3
    assert blur == [("blur", 0, "hazy", "ok", 10), ("blur", 1, "blurry", "ok", 11), ("blur", 2, "clear", "error", 1),
                    ("blur", 2, "clear", "ok", 8)]
    states = assert_views_match_history(ws)
    assert states["factor_class_counts"].usable
    _bundled_match_previous(ws, previous_bundled_sql)

    # Nothing new: nothing recounted. A run still going: its rows are counted on the fly, exactly.
    catalog.refresh(ws, folds=folds)
    assert "factor_class_counts" not in folds[-1].as_dict()["tables"]
    _run(ws, "label", {"factors": [_labelled(i, "pose", 1) for i in range(10)]}, status=None)
    slight = [r[-1] for r in _counts(ws, "factor_class_counts") if r[:3] == ("pose", 1, "slight angle")]
    assert slight == [18]  # 12, less the 4 of samples 0-9 that already were, plus 10
    assert_views_match_history(ws)
    _bundled_match_previous(ws, previous_bundled_sql)


def test_a_refresh_stopped_before_the_recount_leaves_the_counts_stale_not_wrong(
        workspace, monkeypatch, assert_views_match_history):
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(8)]})
    _run(ws, "label", {"factors": [_labelled(i, "blur", 0) for i in range(8)]})
    catalog.refresh(ws)
    _run(ws, "relabel", {"factors": [_labelled(i, "blur", 1) for i in range(3)]})

    def fail(con, name):
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(snapshots, "_recount", fail)
    with pytest.warns(UserWarning, match="not brought up to date"):
        assert catalog.refresh(ws) is False
    states = assert_views_match_history(ws)  # the relabel is folded, the counts it made stale are not read
    assert states["factors"].usable and not states["factors"].pending
    assert not states["factor_class_counts"].usable and not states["label_class_counts"].usable
    assert [r[-1] for r in _counts(ws, "factor_class_counts")] == [5, 3]
    monkeypatch.undo()
    catalog.refresh(ws)
    states = assert_views_match_history(ws)
    assert states["factor_class_counts"].usable and states["label_class_counts"].usable


def test_a_fold_stopped_between_ranges_is_folded_again_to_the_same_snapshot(workspace, monkeypatch,
                                                                             assert_views_match_history):
    import shutil

    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(24)]})
    _run(ws, "label", {"factors": [_factor(i, f, 0.2) for i in range(24) for f in ("blur", "pose")]})
    catalog.refresh(ws)
    _run(ws, "relabel", {"factors": [_factor(i, "blur", 0.9) for i in range(0, 24, 2)]})
    before = ws.catalog_path.with_name("before.duckdb")
    shutil.copy(ws.catalog_path, before)
    catalog.refresh(ws)
    whole = _snapshot_tables(ws)
    shutil.copy(before, ws.catalog_path)

    monkeypatch.setattr(snapshots, "FOLD_ROWS", 2)
    monkeypatch.setattr(snapshots, "REWRITE_PART", 1)
    fold_range, calls = snapshots._fold_range, []

    def stop_at_the_third(con, t, lo, hi):
        calls.append(lo)
        if len(calls) == 3:
            raise duckdb.IOException("disk full")
        return fold_range(con, t, lo, hi)

    monkeypatch.setattr(snapshots, "_fold_range", stop_at_the_third)
    with pytest.warns(UserWarning, match="not brought up to date"):
        assert catalog.refresh(ws) is False
    states = assert_views_match_history(ws)  # two ranges folded, the shard not recorded: overlaid, exactly
    assert len(states["factors"].pending) == 1 and not states["labels"].usable
    monkeypatch.setattr(snapshots, "_fold_range", fold_range)
    catalog.refresh(ws)
    assert _snapshot_tables(ws) == whole
    states = assert_views_match_history(ws)
    assert not states["factors"].pending and states["labels"].usable


def test_a_build_in_ranges_equals_a_build_in_one(workspace, monkeypatch, assert_views_match_history):
    """A build splits the shards by sample-id range in one pass and keeps the newest row per key range by range:
    the same snapshot as one range, whatever the split, the key order kept (point lookups prune on it) and the
    stage removed; a build stopped midway leaves its stage to the next build, which gives the same snapshot."""
    ws = workspace
    _run(ws, "ingest", {"samples": [_sample(i) for i in range(40)]})
    _run(ws, "label", {"factors": [_factor(i, f, (i % 7) / 7) for i in range(40) for f in ("blur", "pose")]})
    _run(ws, "relabel", {"factors": [_factor(i, "blur", 0.95) for i in range(0, 40, 3)]})
    catalog.refresh(ws, rebuild=True)
    whole = _snapshot_tables(ws)
    monkeypatch.setattr(snapshots, "BUILD_PART_ROWS", 7)
    bounds, cut = [], snapshots._bounds
    monkeypatch.setattr(snapshots, "_bounds", lambda con, src, parts: (bounds.append((src, parts)),
                                                                       cut(con, src, parts))[1])
    selects, build_in_ranges = [], snapshots._build_in_ranges
    monkeypatch.setattr(snapshots, "_build_in_ranges", lambda con, target, shape, sel, keys, finish=None: (
        build_in_ranges(con, target, shape, [s for s in sel if not selects.append((target, s))], keys, finish)))
    catalog.refresh(ws, rebuild=True)
    staged = [parts for src, parts in bounds if "read_parquet" in src]
    assert staged == [-(-40 // 7), -(-(80 + 14) // 7)]  # samples; factors: 80 label rows and 14 relabel rows
    # each range reads its own part of the stage, never the shards
    factor_selects = [s for t, s in selects if t == "snapshot_factors"]
    assert len(factor_selects) == staged[1] and all(s.count(snapshots.BUILD_STAGE) == 1 for s in factor_selects)
    assert _snapshot_tables(ws) == whole
    assert_views_match_history(ws)
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT sample_id FROM snapshot_factors").fetchall()]
    assert ids == sorted(ids) and not (ws.root / ".tmp" / snapshots.BUILD_STAGE).exists()

    record = snapshots._record

    def stop_at_factors(con, ws_, table, files):
        if table == "factors":
            raise duckdb.IOException("disk full")
        return record(con, ws_, table, files)

    monkeypatch.setattr(snapshots, "_record", stop_at_factors)
    with pytest.raises(duckdb.IOException):
        catalog.refresh(ws, rebuild=True)
    assert (ws.root / ".tmp" / snapshots.BUILD_STAGE).exists()
    monkeypatch.setattr(snapshots, "_record", record)
    catalog.refresh(ws, rebuild=True)
    assert _snapshot_tables(ws) == whole and not (ws.root / ".tmp" / snapshots.BUILD_STAGE).exists()
    assert_views_match_history(ws)
