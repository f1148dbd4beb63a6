"""`fiqa sql` read-only by construction: each reproduction of a hostile attempt, the function corpus, a fuzz run.

The corpus of every DuckDB function that touches files or runs SQL is taken from `duckdb_functions()` of
the installed DuckDB (see data_manifest/sql_functions.py); each call goes through `fiqa sql` (with and
without --allow-external-read), the `--where` of label/relabel, anchors, score and gallery, and
`train --query`; the workspace and an outside folder stay byte-identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from data_manifest import ShardWriter, Workspace, catalog, runs, snapshots, sql_functions
from data_manifest.gallery import GalleryOptions, write_gallery
from flows import anchors, cli, runtime
from pipeline.training.training_set import training_set_sql

ROOT = Path(__file__).resolve().parents[2]


def _samples(n: int, prefix: str = "s") -> list[dict]:
    return [{"sample_id": f"{prefix}{i}", "dataset": "d", "source_kind": "folder", "source": f"/x/{prefix}{i}.png",
             "status": "ok"} for i in range(n)]


# ---------------------------------------------------------------- reproductions of the report


def test_json_execute_serialized_sql_cannot_overwrite_a_shard(hostile, capsys, file_hashes):
    ws, outside, shard = hostile
    before = file_hashes(ws.root, outside)
    ser = ("json_serialize_sql('WITH c AS (COPY (SELECT 1 AS x) TO ''" + str(shard) +
           "'' (FORMAT parquet)) SELECT 1')")
    for stmt in (f"SELECT * FROM json_execute_serialized_sql({ser}), read_parquet('{shard}')",
                 f"SELECT * FROM json_execute_serialized_sql({ser})",
                 f"SELECT * FROM glob('{outside}/*'), json_execute_serialized_sql(json_serialize_sql("
                 f"'WITH c AS (COPY (SELECT ''echo pwned'') TO ''{outside}/p.sh'') SELECT 1'))"):
        for flag in ([], ["--allow-external-read"]):
            assert cli.main(["sql", "--workspace", str(ws.root), *flag, stmt]) == 2
            assert "refused: " in capsys.readouterr().err
        with pytest.raises(catalog.ReadOnlyError):
            write_gallery(ws, None, GalleryOptions(where=f"sample_id IN (SELECT 's0' FROM ({stmt}))"))
    assert file_hashes(ws.root, outside) == before
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 34}]


def test_a_symlink_and_dotdot_do_not_lead_outside(hostile):
    ws, _, _ = hostile
    for path in (f"{ws.root}/link_out/../top.txt", f"{ws.root}/link_out/secret.txt"):
        with pytest.raises(catalog.ReadOnlyError, match="outside what it may read") as e:
            catalog.query(ws, f"SELECT content FROM read_text('{path}')")
        assert "above the link" not in str(e.value) and "top secret" not in str(e.value)
        with pytest.raises(catalog.ReadOnlyError):
            write_gallery(ws, None, GalleryOptions(
                where=f"sample_id = (SELECT content FROM read_text('{path}'))"))


@pytest.mark.slow
def test_glob_characters_in_a_workspace_path_are_literal(tmp_path):
    for name in ("ws1", "ws2", "wsa"):
        w = Workspace(tmp_path / name)
        ShardWriter(w, "samples", "r1").write(0, _samples(3, name))
        catalog.refresh(w)
    with pytest.raises(ValueError, match="contains '\\?'"):
        Workspace(tmp_path / "ws?")
    for name in ("ws*", "new[x]", "ws[12]", "w[!s]*"):
        w = Workspace(tmp_path / name)
        ShardWriter(w, "samples", "r1").write(0, _samples(2, "own"))
        run = runs.start_run(w, "ingest", {})
        ShardWriter(w, "samples", run).write(0, _samples(1, "late"))
        runs.finish_run(w, run, runs.COMPLETED)
        assert catalog.refresh(w)
        got = catalog.query(w, "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist()
        assert got == ["late0", "own0", "own1"], name
        with duckdb.connect(str(w.catalog_path), read_only=True) as con:  # the views of catalog.duckdb too
            assert con.execute("SELECT count(*) FROM samples_history").fetchone() == (3,), name
        own = next(p for p in snapshots.shard_files(w, "samples") if p.parent.name == "run=r1")
        assert catalog.query(w, f"SELECT count(*) AS n FROM read_parquet('{own}')").to_pylist() == [{"n": 2}]


def test_a_symlinked_catalog_is_refused_and_left_alone(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ShardWriter(ws, "samples", "r1").write(0, _samples(2))
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE samples AS SELECT 'intruder' AS sample_id")
    before = other.read_bytes()
    os.symlink(other, ws.catalog_path)
    with pytest.raises(ValueError, match="symlink"):
        catalog.query(ws, "SELECT * FROM samples")
    assert cli.main(["compact", "--workspace", str(ws.root)]) == 2
    assert other.read_bytes() == before


def test_a_shard_leading_outside_the_workspace_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ShardWriter(ws, "samples", "r1").write(0, _samples(2))
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pq.read_table(snapshots.shard_files(ws, "samples")[0]), foreign)
    d = ws.table_dir("samples", "r2")
    d.mkdir(parents=True)
    os.symlink(foreign, d / "part-00000.parquet")
    with pytest.raises(ValueError, match="outside the workspace"):
        catalog.query(ws, "SELECT count(*) FROM samples")


def test_a_run_folder_leading_outside_the_workspace_is_refused_and_one_inside_is_read(tmp_path):
    """Run folders are resolved once each, shard files only when they are links: a linked folder still counts."""
    ws = Workspace(tmp_path / "ws")
    ShardWriter(ws, "samples", "r1").write(0, _samples(2))
    inside = ws.root / "elsewhere" / "run=r2"
    inside.parent.mkdir()
    os.symlink(ws.table_dir("samples", "r1"), inside)  # a folder of the workspace, reached through a link
    os.symlink(inside, ws.table_dir("samples", "r2"))
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples_history").to_pylist() == [{"n": 4}]
    stamps: dict = {}
    shards = catalog.checked_shards(ws, "samples", stamps)
    assert len(shards) == 2 and stamps == {p: snapshots.file_stamp(p) for p in shards}  # through the link too
    outside = tmp_path / "outside" / "run=r3"
    outside.mkdir(parents=True)
    pq.write_table(pq.read_table(snapshots.shard_files(ws, "samples")[0]), outside / "part-00000.parquet")
    os.symlink(outside, ws.table_dir("samples", "r3"))
    with pytest.raises(ValueError, match="outside the workspace"):
        catalog.query(ws, "SELECT count(*) FROM samples")


def _describe(con_query) -> dict[str, list[tuple]]:
    return {v: [(r[0], r[1]) for r in con_query(f"DESCRIBE {v}")] for v in sorted(catalog.VIEW_NAMES)}


@pytest.mark.slow
def test_every_view_has_one_type_per_column_whatever_the_snapshot_state(tmp_path):
    ws = Workspace(tmp_path / "ws")
    box = [0.0, 0.0, 1.0, 1.0]
    face = {"sample_id": "s0", "status": "ok", "box": box, "landmarks": [0.0] * 10, "transform": [0.0] * 6}
    ShardWriter(ws, "samples", "r1").write(0, _samples(1))
    ShardWriter(ws, "faces", "r1").write(0, [face])
    ShardWriter(ws, "embeddings", "r1").write(0, [{"sample_id": "s0", "status": "ok", "model_id": "m",
                                                 "embedding": [0.5] * 4}])

    def answer(sql: str) -> list[tuple]:
        return [tuple(r.values()) for r in catalog.query(ws, sql).to_pylist()]

    no_snapshot = _describe(answer)
    catalog.refresh(ws)
    folded = _describe(answer)
    run = runs.start_run(ws, "label", {})
    ShardWriter(ws, "faces", run).write(0, [{**face, "sample_id": "s1"}])  # pending: newer than the snapshot
    pending = _describe(answer)
    assert no_snapshot == folded == pending
    assert dict(folded["faces"])["box"] == "FLOAT[4]"
    dist = "SELECT array_distance(box, [0, 0, 1, 1]::FLOAT[4]) AS d FROM faces ORDER BY sample_id"
    assert catalog.query(ws, dist).column("d").to_pylist() == [0.0, 0.0]
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:  # and the DuckDB CLI's views agree
        assert _describe(lambda s: con.execute(s).fetchall()) == folded


def test_a_failed_closing_refresh_is_a_warning_and_the_next_one_repairs(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")

    def disk_full(*_a, **_k):
        raise duckdb.IOException("IO Error: Could not write file: No space left on device")

    monkeypatch.setattr(catalog, "view_statements", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with runtime.tracked_run(ws, "ingest", {}) as state:
            ShardWriter(ws, "samples", state["run_id"]).write(0, _samples(3))
    assert any("No space left" in str(w.message) for w in caught)
    assert runs.run_info(ws, state["run_id"])["status"] == runs.COMPLETED
    monkeypatch.undo()
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 3}]  # from the shards
    assert cli.main(["compact", "--workspace", str(ws.root)]) == 0
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)


CROSS_JOIN = "SELECT count(*) AS n FROM range(100000000) a, range(100000000) b WHERE a.range + b.range = -1"


@pytest.mark.slow
def test_a_query_past_its_time_limit_stops_with_a_clear_message(hostile, capsys, monkeypatch):
    from data_manifest.selection import freeze_selection
    from flows.label import selection_sql

    ws, _, _ = hostile
    t0 = time.monotonic()
    assert cli.main(["sql", "--workspace", str(ws.root), "--timeout", "1", CROSS_JOIN]) == 2
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert "stopped after 1 s" in err and "--timeout" in err and "SET threads" not in err
    monkeypatch.setenv(catalog.ENV_TIMEOUT, "1")  # what --sql-timeout of a flow sets
    with pytest.raises(ValueError, match="stopped after 1 s"):
        freeze_selection(ws, "label-run", selection_sql(f"sample_id IN (SELECT 's0' FROM ({CROSS_JOIN}))"), 10)
    with pytest.raises(ValueError, match="stopped after 1 s"):
        write_gallery(ws, None, GalleryOptions(where=f"sample_id IN (SELECT 's0' FROM ({CROSS_JOIN}))"))


def test_a_query_past_its_memory_limit_stops_with_a_clear_message(hostile, capsys):
    ws, _, _ = hostile
    big = "SELECT count(DISTINCT range::VARCHAR || 'x') AS n FROM range(30000000)"
    assert cli.main(["sql", "--workspace", str(ws.root), "--memory", "32MB", big]) == 2
    err = capsys.readouterr().err
    assert "more than 32MB of memory" in err and "--memory" in err


@pytest.mark.slow
def test_a_running_query_blocks_neither_compaction_nor_a_fold(hostile):
    ws, _, _ = hostile
    done: dict = {}

    def long_query():
        try:
            catalog.query(ws, CROSS_JOIN, timeout_s=6)
        except catalog.QueryLimitError as e:
            done["stopped"] = str(e)

    t = threading.Thread(target=long_query)
    t.start()
    try:
        time.sleep(1.0)  # the query holds catalog.duckdb attached
        ShardWriter(ws, "samples", "r2").write(0, _samples(2, "new"))
        t0 = time.monotonic()
        assert cli.main(["compact", "--workspace", str(ws.root)]) == 0
        assert catalog.refresh(ws, retries=1, wait_s=0)
        assert time.monotonic() - t0 < 5 and t.is_alive()
    finally:
        t.join()
    assert "stopped after 6 s" in done["stopped"]
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM snapshot_samples").fetchone() == (36,)


def test_output_never_overwrites_workspace_data(hostile, capsys, file_hashes):
    ws, outside, shard = hostile
    before = file_hashes(ws.root, outside)
    for target in (shard, ws.catalog_path, ws.manifests / "samples" / "new.parquet", ws.root / "link_out" / ".." /
                   "ws" / "manifests" / "x.csv", ws.runs_dir / "r1" / "run.json"):
        for fmt in ("parquet", "csv"):
            assert cli.main(["sql", "--workspace", str(ws.root), "--format", fmt, "--output", str(target),
                             "SELECT 1 AS x"]) == 2
            assert "refused: --output" in capsys.readouterr().err
    assert file_hashes(ws.root, outside) == before
    ok = ws.reports / "q.csv"
    assert cli.main(["sql", "--workspace", str(ws.root), "--format", "csv", "--output", str(ok),
                     "SELECT count(*) AS n FROM samples"]) == 0
    assert ok.read_text().split() == ['"n"', "34"]


def test_sql_files_must_be_small_regular_files(hostile, tmp_path, capsys):
    ws, _, _ = hostile
    big = tmp_path / "big.sql"
    big.write_text("SELECT 1;" + " " * (2 << 20))
    for path, msg in (("/dev/zero", "not a regular file"), (str(tmp_path), "cannot read SQL file"),
                      (str(big), "larger than"), (str(tmp_path / "none.sql"), "cannot read SQL file")):
        assert cli.main(["sql", "--workspace", str(ws.root), "--file", path]) == 2
        assert msg in capsys.readouterr().err, path


def test_a_closed_pipe_ends_quietly(hostile):
    ws, _, _ = hostile
    cmd = (f"{sys.executable} -m flows.cli sql --workspace '{ws.root}' --format csv "
           "'SELECT * FROM range(300000)' 2>err.txt | head -n 2; echo ${PIPESTATUS[0]} > rc.txt")
    subprocess.run(["bash", "-c", cmd], cwd=ws.reports, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL, timeout=120)
    assert (ws.reports / "err.txt").read_text() == ""
    assert (ws.reports / "rc.txt").read_text().strip() == "0"


# ---------------------------------------------------------------- the function corpus


def file_or_sql_functions() -> list[tuple[str, str]]:
    """(name, kind) of every installed DuckDB function a query could use to touch a file or run SQL: the file
    readers, every table function that is not on the allow-list, and every excluded scalar function."""
    kinds = sql_functions.duckdb_function_names()
    out = [(n, "table") for n in sorted(sql_functions.FILE_READERS)]
    out += [(n, "table") for n, k in sorted(kinds.items()) if k & {"table", "table_macro"}
            and n not in sql_functions.TABLE_FUNCTIONS and n not in sql_functions.FILE_READERS]
    out += [(n, "scalar") for n in sorted(sql_functions.EXCLUDED) if kinds.get(n, set()) - {"table", "pragma"}]
    out += [(n, "pragma") for n, k in sorted(kinds.items()) if "pragma" in k]
    return out


def test_every_installed_duckdb_function_is_classified():
    assert sql_functions.unclassified() == []  # a newer DuckDB: classify its new functions, then --write
    assert sorted(sql_functions.allowed_functions()) == sql_functions.generated_allow_list()


def _corpus_statements(fn: str, kind: str, values: dict) -> list[str]:
    copy_sql = f"WITH c AS (COPY (SELECT 1) TO ''{values['shard']}'' (FORMAT parquet)) SELECT 1"
    if kind == "pragma":
        return [f"PRAGMA {fn}", f"PRAGMA {fn}('{values['shard']}')", f"CALL pragma_{fn}()"]
    call = (f"{fn}('{values['shard']}')", f"{fn}('{values['secret']}')", f"{fn}('{copy_sql}')",
            f"{fn}(json_serialize_sql('{copy_sql}'))")
    if kind == "table":
        return [f"SELECT * FROM {c}" for c in call] + [f"SELECT * FROM {fn}()"]
    return [f"SELECT {c}" for c in call] + [f"SELECT {fn}()"]


@pytest.mark.slow
def test_every_file_or_sql_function_is_refused_or_reads_only(hostile, tmp_path, capsys, file_hashes, query_injection,
                                                             where_injection):
    from data_manifest.selection import freeze_selection
    from flows.label import selection_sql

    ws, outside, shard = hostile
    values = {"shard": str(shard), "secret": str(outside / "secret.txt")}
    corpus = file_or_sql_functions()
    assert len(corpus) >= 100 and {"json_execute_serialized_sql", "read_text", "glob", "query_table"} <= {
        n for n, _ in corpus}
    before = file_hashes(ws.root, outside)
    outcomes = {"refused": 0, "read": 0}
    for fn, kind in corpus:
        for stmt in _corpus_statements(fn, kind, values):
            for flag in (False, True):
                try:
                    catalog.query(ws, stmt, allow_external_read=flag, timeout_s=20)
                    outcomes["read"] += 1
                    assert fn in sql_functions.FILE_READERS | sql_functions.TABLE_FUNCTIONS, stmt
                except (ValueError, duckdb.Error):
                    outcomes["refused"] += 1
            if kind == "pragma":
                continue
            for wrapped in (lambda s: catalog.query(ws, anchors.selection_sql(where=where_injection(s))),
                            lambda s: catalog.query(ws, anchors.selection_sql(query=query_injection(s))),
                            lambda s: catalog.query(ws, training_set_sql(query=query_injection(s))),
                            lambda s: freeze_selection(ws, f"corpus-{abs(hash(s))}",
                                                       selection_sql(f"sample_id IN (SELECT 's0' FROM ({s}) x)"), 10),
                            lambda s: write_gallery(ws, tmp_path / "g.html", GalleryOptions(
                                where=f"sample_id IN (SELECT 's0' FROM ({s}) x)"))):
                try:
                    wrapped(stmt)
                except (ValueError, duckdb.Error):
                    pass
        # through the CLI too, once per function
        cli.main(["sql", "--workspace", str(ws.root), _corpus_statements(fn, kind, values)[0]])
        capsys.readouterr()
    for p in ws.runs_dir.glob("corpus-*"):  # the selections the harmless reads froze (a run's own files)
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    (tmp_path / "g.html").unlink(missing_ok=True)
    assert file_hashes(ws.root, outside) == before
    assert outcomes["refused"] > outcomes["read"] > 0


# ---------------------------------------------------------------- a generated fuzz run


