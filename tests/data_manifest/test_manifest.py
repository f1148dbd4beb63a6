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
    with duckdb.connect(str(moved.catalog_path), read_only=True) as con:  # still names the old place
        view = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'samples_history'").fetchone()[0]
        assert str(workspace.root) in view and str(moved.root) not in view
    assert catalog.query(moved, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]
    assert not catalog.catalog_moved(moved)
    with duckdb.connect(str(moved.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples_history").fetchone() == (2,)
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (2,)
    assert moved.catalog_root_path.read_text().strip() == str(moved.root)


def test_refresh_is_not_blocked_by_a_reader_in_another_process(workspace):
    """A process holding catalog.duckdb open read-only (a long `fiqa sql`) does not keep a refresh out: the refresh
    folds into a copy and swaps it in; the reader goes on answering from the file it opened."""
    ShardWriter(workspace, "samples", "r1").write(0, [_sample("a")])
    catalog.refresh(workspace)
    code = (f"import duckdb,sys; c=duckdb.connect({str(workspace.catalog_path)!r}, read_only=True); "
            "print('open', flush=True); sys.stdin.readline(); "
            "print(c.execute('SELECT count(*) FROM snapshot_samples').fetchone()[0], flush=True); c.close()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        assert catalog.query(workspace, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 1}]
        ShardWriter(workspace, "samples", "r2").write(0, [_sample("b")])
        assert catalog.refresh(workspace, retries=1, wait_s=0.0)  # no wait: the reader is still there
        assert proc.poll() is None
        with duckdb.connect(str(workspace.catalog_path), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM snapshot_samples").fetchone() == (2,)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "1"  # the reader's own, older file
    finally:
        proc.communicate(timeout=10)
    assert not list(workspace.root.glob("catalog.duckdb.swap*"))


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


def _arrow_samples(n: int):
    """n `samples` rows as an Arrow table built column-wise (no Python row objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    idx = pa.array(np.arange(n, dtype=np.int64))
    return pa.table({
        "sample_id": pc.binary_join_element_wise("s", pc.cast(idx, pa.string()), ""),
        "dataset": pa.repeat("d", n), "source_kind": pa.repeat("folder", n),
        "source": pc.binary_join_element_wise("/x/", pc.cast(idx, pa.string()), ".jpg", ""),
        "identity": pc.divide(idx, 7), "width": pa.array(np.full(n, 112, dtype=np.int64)),  # int64 -> int32
        "status": pa.repeat("ok", n),
    })


def test_writer_arrow_table_equals_the_dict_path(workspace):
    import pyarrow as pa

    rows = [_sample("a", width=10, height=12, identity=4, bytes=99, error=None),
            _sample("b", status="error", error="bad", identity=None, width=None, height=None, bytes=None)]
    by_dict = pq.read_table(ShardWriter(workspace, "samples", "r1").write(0, rows))
    tbl = pa.Table.from_pylist(rows)  # int64 width/height: cast to the schema's int32
    by_arrow = pq.read_table(ShardWriter(workspace, "samples", "r1").write(1, tbl))
    by_batch = pq.read_table(ShardWriter(workspace, "samples", "r1").write(2, tbl.to_batches()[0]))
    assert by_arrow.schema.equals(schemas.SCHEMAS["samples"], check_metadata=False)
    drop = ["created_at"]  # the time of writing
    assert by_arrow.drop_columns(drop).equals(by_dict.drop_columns(drop))
    assert by_batch.drop_columns(drop).equals(by_dict.drop_columns(drop))
    assert by_arrow.column("created_at").null_count == 0 and set(by_arrow.column("run_id").to_pylist()) == {"r1"}
    # A given created_at is kept, as in the dict path; an empty table writes nothing.
    stamp = by_dict.column("created_at")
    kept = pq.read_table(ShardWriter(workspace, "samples", "r1").write(3, tbl.append_column("created_at", stamp)))
    assert kept.column("created_at").equals(stamp)
    assert ShardWriter(workspace, "samples", "r1").write(4, tbl.slice(0, 0)) is None


def test_writer_arrow_table_rejects_bad_columns(workspace):
    import pyarrow as pa

    w = ShardWriter(workspace, "samples", "r1")
    tbl = pa.Table.from_pylist([_sample("a"), _sample("b")])
    with pytest.raises(ValueError, match=r"samples: unknown column\(s\) \['colour'\]"):
        w.write(0, tbl.append_column("colour", pa.array(["red", "blue"])))
    with pytest.raises(ValueError, match="samples row 1: required column 'dataset' is missing or null"):
        w.write(0, tbl.set_column(tbl.column_names.index("dataset"), "dataset", pa.array(["d", None])))
    with pytest.raises(ValueError, match="samples row 0: required column 'dataset' is missing or null"):
        w.write(0, tbl.drop_columns(["dataset"]))
    with pytest.raises(ValueError, match="column 'width' of type string cannot be cast to int32"):
        w.write(0, tbl.append_column("width", pa.array(["wide", "narrow"])))
    with pytest.raises(ValueError, match="column 'width' of type double cannot be cast to int32"):
        w.write(0, tbl.append_column("width", pa.array([1.5, 2.0])))  # a lossy cast is refused
    with pytest.raises(ValueError, match="column 'box' .* cannot be cast to fixed_size_list"):
        ShardWriter(workspace, "faces", "r1").write(0, pa.table({"sample_id": ["a"], "status": ["ok"],
                                                                  "box": [[1.0, 2.0, 3.0]]}))
    assert not list(w.dir.glob("*.parquet")), "a refused table writes nothing"


def test_writer_million_row_arrow_table_without_python_rows(workspace, monkeypatch):
    """A 1M-row table never takes the dict path, allocates no per-row Python objects and reads back exactly."""
    import tracemalloc

    from data_manifest import writer

    n = 1_000_000
    tbl = _arrow_samples(n)
    monkeypatch.setattr(writer, "_dict_table", lambda *a: pytest.fail("the dict path was used"))
    tracemalloc.start()
    try:
        path = ShardWriter(workspace, "samples", "big").write(0, tbl)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB of Python objects for {n} rows"  # dicts would take > 500 MiB
    back = pq.read_table(path)
    assert back.num_rows == n and back.schema.equals(schemas.SCHEMAS["samples"], check_metadata=False)
    assert back.column("sample_id").equals(tbl.column("sample_id"))
    np.testing.assert_array_equal(back.column("identity").to_numpy(), np.arange(n) // 7)
    assert back.column("width").type == schemas.SCHEMAS["samples"].field("width").type
    assert int(np.asarray(back.column("width")).sum()) == 112 * n
