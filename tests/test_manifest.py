"""Manifest store: schemas, atomic shard writes, run registry, latest-wins views, read-only SQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from data_manifest import ShardWriter, catalog, crops, runs, schemas


def _sample(sid: str, **kw):
    row = {"sample_id": sid, "dataset": "d", "source_kind": "folder", "source": f"/x/{sid}.jpg", "status": "ok"}
    row.update(kw)
    return row


def test_writer_round_trip_and_schema(workspace):
    w = ShardWriter(workspace, "samples", "r1")
    path = w.write(3, [_sample("a", width=10, height=12, identity=4), _sample("b", status="error", error="bad")])
    assert path.name == "part-00003.parquet"
    tbl = pq.read_table(path)
    assert tbl.schema.equals(schemas.SCHEMAS["samples"], check_metadata=False)
    rows = tbl.to_pylist()
    assert [r["sample_id"] for r in rows] == ["a", "b"]
    assert rows[0]["width"] == 10 and rows[0]["identity"] == 4 and rows[1]["error"] == "bad"
    assert {r["run_id"] for r in rows} == {"r1"}
    assert not list(w.dir.glob(".*tmp*")), "no temporary file may remain"


def test_writer_rejects_bad_rows(workspace):
    w = ShardWriter(workspace, "samples", "r1")
    with pytest.raises(ValueError, match="unknown column"):
        w.write(0, [_sample("a", colour="red")])
    with pytest.raises(ValueError, match="required column 'dataset'"):
        w.write(0, [{"sample_id": "a", "source_kind": "folder", "source": "x", "status": "ok"}])
    with pytest.raises(ValueError, match="invalid run id"):
        ShardWriter(workspace, "samples", "../escape")
    with pytest.raises(KeyError, match="unknown manifest table"):
        ShardWriter(workspace, "nope", "r1")


def test_latest_wins_and_history(workspace):
    ShardWriter(workspace, "samples", "r1").write(0, [_sample("a", width=1), _sample("b", width=1)])
    time.sleep(0.01)
    ShardWriter(workspace, "samples", "r2").write(0, [_sample("a", width=2)])
    hist = catalog.query(workspace, "SELECT sample_id, width FROM samples_history ORDER BY sample_id, width")
    assert hist.to_pylist() == [{"sample_id": "a", "width": 1}, {"sample_id": "a", "width": 2},
                                {"sample_id": "b", "width": 1}]
    latest = catalog.query(workspace, "SELECT sample_id, width, run_id FROM samples ORDER BY sample_id")
    assert latest.to_pylist() == [{"sample_id": "a", "width": 2, "run_id": "r2"},
                                  {"sample_id": "b", "width": 1, "run_id": "r1"}]


def test_factors_latest_per_factor_and_labels_view(workspace):
    base = {"labeller": "x", "labeller_version": "1", "status": "ok"}
    ShardWriter(workspace, "samples", "s").write(0, [_sample("a")])
    ShardWriter(workspace, "factors", "l1").write(0, [
        {"sample_id": "a", "factor": "blur", "value": 0.2, "class_index": 0, "class_name": "hazy", **base},
        {"sample_id": "a", "factor": "pose", "value": 30.0, "class_index": 0, "class_name": "profile", **base}])
    time.sleep(0.01)
    ShardWriter(workspace, "factors", "l2").write(0, [
        {"sample_id": "a", "factor": "blur", "value": 0.9, "class_index": 2, "class_name": "clear", **base}])
    row = catalog.query(workspace, "SELECT blur_value, blur_class, pose_value, pose_class FROM labels").to_pylist()
    assert row == [{"blur_value": 0.9, "blur_class": "clear", "pose_value": 30.0, "pose_class": "profile"}]


def test_empty_catalog_has_typed_views(workspace):
    assert catalog.query(workspace, "SELECT count(*) AS n FROM anchors").to_pylist() == [{"n": 0}]
    cols = catalog.query(workspace, "DESCRIBE embeddings").to_pylist()
    assert {c["column_name"]: c["column_type"] for c in cols}["embedding"] == "FLOAT[]"


@pytest.mark.parametrize("stmt", ["DROP VIEW samples", "INSERT INTO t VALUES (1)", "COPY (SELECT 1) TO 'out.csv'",
                                  "ATTACH 'other.db'", "CREATE TABLE t AS SELECT 1", "SELECT 1; DROP VIEW runs",
                                  "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", "SET threads = 1"])
def test_sql_refuses_writes_and_catalog_unchanged(workspace, stmt, tmp_path, monkeypatch):
    ShardWriter(workspace, "samples", "r1").write(0, [_sample("a")])
    catalog.refresh(workspace)
    before = workspace.catalog_path.read_bytes()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(catalog.ReadOnlyError, match="refused"):
        catalog.query(workspace, stmt)
    assert workspace.catalog_path.read_bytes() == before
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.csv").exists()
    with duckdb.connect(str(workspace.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (1,)


def test_catalog_file_views_use_absolute_paths(workspace, tmp_path, monkeypatch):
    ShardWriter(workspace, "samples", "r1").write(0, [_sample("a"), _sample("b")])
    assert catalog.refresh(workspace)
    monkeypatch.chdir(tmp_path)  # relative paths would break here
    with duckdb.connect(str(workspace.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (2,)


def test_moved_workspace_catalog_follows_on_the_next_query(workspace, tmp_path):
    """The catalog file's views hold absolute paths; a copied workspace rewrites them on its first query."""
    import shutil

    from data_manifest.workspace import Workspace

    ShardWriter(workspace, "samples", "r1").write(0, [_sample("a"), _sample("b")])
    assert catalog.refresh(workspace) and not catalog.catalog_moved(workspace)
    moved = Workspace(tmp_path / "moved")
    shutil.copytree(workspace.root, moved.root, dirs_exist_ok=True)
    ShardWriter(workspace, "samples", "r2").write(0, [_sample("c")])  # only the original gets "c"
    assert catalog.catalog_moved(moved)
    with duckdb.connect(str(moved.catalog_path), read_only=True) as con:  # still reads the old place
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)
    assert catalog.query(moved, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]
    assert not catalog.catalog_moved(moved)
    with duckdb.connect(str(moved.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (2,)
    assert moved.catalog_root_path.read_text().strip() == str(moved.root)


def test_refresh_survives_a_concurrent_reader(workspace):
    ShardWriter(workspace, "samples", "r1").write(0, [_sample("a")])
    catalog.refresh(workspace)
    code = (f"import duckdb,time; c=duckdb.connect({str(workspace.catalog_path)!r}, read_only=True); "
            "print('open', flush=True); time.sleep(1.5); c.close()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        # The in-memory path is never blocked by another process holding the file.
        assert catalog.query(workspace, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 1}]
        t0 = time.perf_counter()
        assert catalog.refresh(workspace, retries=40, wait_s=0.1)  # waits for the lock, then succeeds
        assert time.perf_counter() - t0 > 0.2
    finally:
        proc.wait(timeout=10)


def test_run_registry_and_shard_commits(workspace):
    rid = runs.start_run(workspace, "ingest", {"path": "/data"})
    assert not runs.shard_done(workspace, rid, "00000")
    runs.mark_shard_done(workspace, rid, "00000", {"rows": 3, "errors": 1})
    runs.mark_shard_done(workspace, rid, "00001", {"rows": 2, "errors": 0})
    assert runs.shard_done(workspace, rid, "00000")
    runs.finish_run(workspace, rid, runs.COMPLETED, metrics={"secs": 1.5})
    row = catalog.query(workspace, "SELECT * FROM runs").to_pylist()[0]
    assert row["status"] == "completed" and row["flow"] == "ingest"
    assert json.loads(row["counts"]) == {"rows": 5, "errors": 1}
    assert json.loads(row["parameters"]) == {"path": "/data"}
    assert row["code_version"]
    # Resuming the same id adds an attempt; the history keeps both attempts.
    assert runs.start_run(workspace, "ingest", {"path": "/data"}, rid) == rid
    assert catalog.query(workspace, "SELECT count(*) AS n FROM runs_history").to_pylist() == [{"n": 3}]
    with pytest.raises(ValueError, match="belongs to flow"):
        runs.start_run(workspace, "label", {}, rid)


def test_crop_pack_round_trip(workspace):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    rel = crops.write_pack(workspace, "r1", 0, arr)
    assert rel == "crops/faces/r1/part-00000.npy"
    reader = crops.PackReader(workspace)
    np.testing.assert_array_equal(reader.read(rel, 3), arr[3])
    np.testing.assert_array_equal(reader.read(rel, [4, 0]), arr[[4, 0]])
    with pytest.raises(IndexError):
        reader.read(rel, 5)
    with pytest.raises(ValueError, match="uint8"):
        crops.write_pack(workspace, "r1", 1, arr.astype(np.float32))
    with pytest.raises(ValueError, match="outside the workspace"):
        reader.read("../../etc/passwd", 0)
