"""SQL escape corpus: through `fiqa sql`, `--where` and `--query`, no statement writes and none reads outside.

Every statement below tries to write (COPY, also inside CTEs, subqueries, EXPLAIN and
query()), change the connection (SET, PRAGMA, ATTACH, INSTALL/LOAD) or read files outside
the workspace. Writes must be refused with or without --allow-external-read; outside reads
only with it; the workspace and the outside folder must be byte-identical afterwards.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_manifest import ShardWriter, Workspace, catalog
from flows import anchors, cli
from pipeline.training.training_set import training_set_sql

WRITES = [
    "COPY samples TO '{out}'",
    "COPY (SELECT 1) TO '{shard}' (FORMAT parquet)",
    "COPY samples_history TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)",
    "WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1",
    "WITH c AS (COPY (SELECT * FROM samples LIMIT 1) TO '{shard}' (FORMAT parquet)) SELECT * FROM c",
    "WITH c AS MATERIALIZED (COPY (SELECT 'echo pwned') TO '{out}' (HEADER false, QUOTE '')) SELECT 1",
    "WITH c AS (COPY (SELECT 1) TO '{out}' (USE_TMP_FILE false)) SELECT 1",
    "WITH c AS (COPY (SELECT 1) TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)) "
    "SELECT * FROM read_parquet('{shard}')",
    "WITH a AS (SELECT 1), b AS (COPY (SELECT 1) TO '{out}') SELECT * FROM a",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3), "
    "c AS (COPY (SELECT * FROM r) TO '{out}') SELECT 1",
    "SELECT * FROM (WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1) t",
    "SELECT (WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1)",
    "SELECT 1 WHERE EXISTS (WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1)",
    "SELECT 1 UNION ALL (WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1)",
    "SELECT * FROM samples s JOIN (WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1 AS x) j ON true",
    "SELECT 1 IN (WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1)",
    "EXPLAIN WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1",
    "EXPLAIN ANALYZE WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
    "EXPLAIN COPY (SELECT 1) TO '{out}'",
    "EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{out}'",
    "/* hidden */ EXPLAIN ANALYZE WITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{out}''')",
    "SELECT * FROM query('WITH c AS (COPY (SELECT 1) TO ''{out}'') SELECT 1')",
    "SELECT * FROM query('SELECT * FROM query(''WITH c AS (COPY (SELECT 1) TO ''''{out}'''') SELECT 1'')')",
    "SELECT * FROM query('SELECT ' || '1')",
    "CREATE TABLE t AS SELECT 1",
    "CREATE OR REPLACE VIEW samples AS SELECT 1 AS x",
    "DROP VIEW samples",
    "INSERT INTO samples_history SELECT * FROM samples_history",
    "WITH x AS (INSERT INTO samples_history SELECT * FROM samples_history RETURNING *) SELECT * FROM x",
    "UPDATE samples SET status = 'ok'",
    "DELETE FROM samples",
    "ALTER VIEW samples RENAME TO gone",
    "COMMENT ON VIEW samples IS 'x'",
    "CREATE MACRO m() AS 1",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "ATTACH '{ws}/catalog.duckdb' AS c",
    "ATTACH '{outdb}' AS o; CREATE TABLE o.t AS SELECT 1",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{outside}/evil.duckdb_extension'",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET lock_configuration",
    "SET temp_directory = '{outside}'",
    "SET profiling_output = '{out}'",
    "PRAGMA enable_profiling; PRAGMA profiling_output = '{out}'; SELECT 1",
    "SET VARIABLE v = 1",
    "CALL pragma_version()",
    "EXPORT DATABASE '{outside}/export'",
    "IMPORT DATABASE '{outside}'",
    "CHECKPOINT",
    "VACUUM",
    "PREPARE p AS COPY (SELECT 1) TO '{out}'; EXECUTE p",
    "BEGIN; COPY (SELECT 1) TO '{out}'; COMMIT",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
    "SELECT 1; -- a comment\n /* and another */ COPY (SELECT 1) TO '{out}'",
    "/* leading comment */ COPY (SELECT 1) TO '{out}'",
    "-- line comment\nWITH c AS (COPY (SELECT 1) TO '{out}') SELECT 1",
    "SELECT 1; SELECT * FROM query_table('samples'); COPY samples TO '{out}'",
]

# Literal reads outside the workspace: refused by default, allowed with --allow-external-read.
OUTSIDE_READS = [  # (statement, what its CSV output then holds)
    ("SELECT content FROM read_text('{secret}')", "top secret"),
    ("SELECT content FROM read_blob('{secret}')", "top secret"),
    ("SELECT * FROM read_csv('{secret_csv}')", "1,2"),
    ("SELECT * FROM '{secret_csv}'", "1,2"),
    ("SELECT file FROM glob('{outside}/*') ORDER BY file", "secret.txt"),
    ("SELECT content FROM read_text(['{secret}'])", "top secret"),
    ("SELECT a FROM read_parquet('{outside}/*.parquet')", '"a"\n1'),
    ("SELECT row_group_num_rows FROM parquet_metadata('{outside}/t.parquet')", '"row_group_num_rows"\n1'),
    ("SELECT content FROM read_text('{ws}/../outside/secret.txt')", "top secret"),
    ("SELECT content FROM read_text('{ws}/link_out/secret.txt')", "top secret"),
    ("SELECT * FROM query('SELECT content FROM read_text(''{secret}'')')", "top secret"),
    ("SELECT 1; -- then\nSELECT content FROM read_text('{secret}')", "top secret"),
]
# Reads whose path is computed at run time: refused even with --allow-external-read.
COMPUTED_READS = [
    "SELECT content FROM read_text('{outside}' || '/secret.txt')",
    "SELECT content FROM read_text(concat('/etc/', 'hostname'))",
    "SELECT * FROM read_csv(replace('{secret_csv}', 'X', 'Y'))",
    "SELECT content FROM read_text(lower('{secret}'))",
]


@pytest.fixture
def setting(tmp_path):
    ws = Workspace(tmp_path / "ws")
    shard = ShardWriter(ws, "samples", "r1").write(0, [
        {"sample_id": f"s{i}", "dataset": "d", "source_kind": "folder", "source": f"/x/{i}.png", "status": "ok"}
        for i in range(5)])
    from data_manifest import catalog as cat

    cat.refresh(ws)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    (outside / "secret.csv").write_text("k,v\n1,2\n")
    pq.write_table(pa.table({"a": [1]}), outside / "t.parquet")
    os.symlink(outside, ws.root / "link_out")
    values = {"ws": str(ws.root), "shard": str(shard), "out": str(outside / "pwned.sh"),
              "outdb": str(outside / "o.duckdb"), "outside": str(outside), "secret": str(outside / "secret.txt"),
              "secret_csv": str(outside / "secret.csv")}
    return ws, outside, values


def test_corpus_is_large_enough():
    assert len(WRITES) >= 50 and len(WRITES) + len(OUTSIDE_READS) + len(COMPUTED_READS) >= 70


def test_every_write_is_refused_everywhere_and_nothing_changes(setting, capsys, file_hashes, query_injection,
                                                               where_injection):
    from data_manifest.selection import freeze_selection
    from flows.label import selection_sql

    ws, outside, values = setting
    before = file_hashes(ws.root, outside)
    by_checks = 0
    refusal = "^(refused: |cannot parse SQL: )"  # refused by the checks, or not even valid SQL: nothing ran
    for template in WRITES:
        stmt = template.format(**values)
        for flag in ([], ["--allow-external-read"]):
            assert cli.main(["sql", "--workspace", str(ws.root), *flag, stmt]) == 2, stmt
            err = capsys.readouterr().err
            assert err.startswith(("fiqa sql: error: refused: ", "fiqa sql: error: cannot parse SQL: ")), (stmt, err)
        by_checks += err.startswith("fiqa sql: error: refused: ")
        with pytest.raises(ValueError, match=refusal):  # --where of anchors and score
            catalog.query(ws, anchors.selection_sql(where=where_injection(stmt)))
        with pytest.raises(ValueError, match=refusal):  # --query of anchors and score
            catalog.query(ws, anchors.selection_sql(query=query_injection(stmt)))
        with pytest.raises(ValueError, match=refusal):  # --where of train
            catalog.query(ws, training_set_sql(where=f"true; {stmt}; SELECT * FROM anchors WHERE true"))
        with pytest.raises(ValueError, match=refusal):  # --where of label and relabel
            where = f"true) AS l; {stmt}; SELECT * FROM (SELECT * FROM labels"
            freeze_selection(ws, "label-run", selection_sql(where), 10)
    assert by_checks >= 50, f"only {by_checks} statements reached the read-only checks"
    assert file_hashes(ws.root, outside) == before, "a refused statement changed a file"


def test_outside_reads_need_the_explicit_flag(setting, capsys, file_hashes, query_injection, where_injection):
    ws, outside, values = setting
    before = file_hashes(ws.root, outside)
    for template, expected in OUTSIDE_READS:
        stmt = template.format(**values)
        assert cli.main(["sql", "--workspace", str(ws.root), "--format", "csv", stmt]) == 2, stmt
        err = capsys.readouterr().err
        assert "refused: the query reads" in err and "--allow-external-read" in err, (stmt, err)
        with pytest.raises(catalog.ReadOnlyError, match="outside what it may read"):
            catalog.query(ws, anchors.selection_sql(where=where_injection(stmt)))
        with pytest.raises(catalog.ReadOnlyError, match="outside what it may read"):
            catalog.query(ws, anchors.selection_sql(query=query_injection(stmt)))
        assert cli.main(["sql", "--workspace", str(ws.root), "--format", "csv", "--allow-external-read", stmt]) == 0
        out = capsys.readouterr().out
        assert expected in out, (stmt, out)
    assert file_hashes(ws.root, outside) == before


def test_computed_paths_are_never_readable(setting, capsys):
    ws, outside, values = setting
    for template in COMPUTED_READS:
        stmt = template.format(**values)
        for flag in ([], ["--allow-external-read"]):
            assert cli.main(["sql", "--workspace", str(ws.root), *flag, stmt]) == 2, stmt
            assert "refused: the query re" in capsys.readouterr().err


def test_workspace_files_named_literally_are_readable(setting):
    ws, _, values = setting
    tbl = catalog.query(ws, f"SELECT count(*) AS n FROM read_parquet('{values['shard']}')")
    assert tbl.to_pylist() == [{"n": 5}]
    with pytest.raises(catalog.ReadOnlyError, match="outside what it may read"):
        catalog.query(ws, f"SELECT * FROM glob('{ws.root}/manifests/*')")  # patterns need the flag
    with pytest.raises(catalog.ReadOnlyError, match="runs as several"):
        catalog.query(ws, "PIVOT samples ON status USING count(*)")


def test_allowed_statements_still_work(setting):
    ws, _, _ = setting
    for sql, rows in (("SELECT count(*) AS n FROM samples", 1), ("DESCRIBE samples", 16), ("SHOW TABLES", 17),
                      ("SUMMARIZE samples", 16), ("EXPLAIN SELECT * FROM labels", 1), ("FROM samples", 5),
                      ("VALUES (1), (2)", 2), ("SELECT * FROM query('SELECT 42 AS x')", 1),
                      ("PIVOT (SELECT status FROM samples) ON status IN ('ok') USING count(*)", 1),
                      ("SELECT 1; SELECT * FROM samples WHERE status = 'ok'", 5)):
        assert catalog.query(ws, sql).num_rows == rows, sql


def test_the_connection_itself_cannot_write_or_be_reconfigured(setting):
    """Second layer: even a statement that got past the checks finds the connection locked down."""
    ws, outside, values = setting
    con = catalog.connect(ws)
    try:
        for sql in (f"COPY (SELECT 1) TO '{values['out']}'", f"COPY (SELECT 1) TO '{values['shard']}'",
                    f"WITH c AS (COPY (SELECT 1) TO '{ws.root}/x.csv') SELECT 1",
                    f"SELECT * FROM read_text('{values['secret']}')",
                    f"SELECT * FROM read_parquet('{values['shard']}')",
                    f"ATTACH '{values['outdb']}'", "INSTALL httpfs"):
            with pytest.raises(duckdb_errors()):
                con.execute(sql)
        for setting_sql in ("SET enable_external_access = true", "SET allowed_directories = ['/']",
                            "SET temp_directory = '/tmp'", "SET lock_configuration = false"):
            with pytest.raises(duckdb_errors(), match="locked"):
                con.execute(setting_sql)
        assert con.execute("SELECT count(*) FROM labels").fetchall() == [(5,)]
    finally:
        con.close()
    assert not (outside / "pwned.sh").exists() and not (ws.root / "x.csv").exists()


def duckdb_errors() -> type[Exception]:
    import duckdb

    return duckdb.Error


def test_sql_files_get_the_same_checks(setting, tmp_path, capsys, file_hashes):
    ws, outside, values = setting
    before = file_hashes(ws.root, outside)
    bad = tmp_path / "bad.sql"
    bad.write_text(f"-- looks harmless\nSELECT 1;\n/* then */ WITH c AS (COPY (SELECT 1) TO '{values['shard']}') "
                   "SELECT 1;\n")
    assert cli.main(["sql", "--workspace", str(ws.root), "--file", str(bad)]) == 2
    assert "refused: COPY inside a query" in capsys.readouterr().err
    good = tmp_path / "good.sql"
    good.write_text("-- two queries\nSELECT 1 AS one;\nSELECT count(*) AS n FROM samples; -- the last one wins\n")
    assert cli.main(["sql", "--workspace", str(ws.root), "--file", str(good), "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ['"n"', "5"]
    assert file_hashes(ws.root, outside) == before
