"""The interactive SQL shell (data_manifest/shell.py) driven through in-memory stdin/stdout on a small catalog:
results, dot commands, the guard's refusals, errors and Ctrl-C that leave the shell running."""

from __future__ import annotations

import io
import json

import pytest

from data_manifest import catalog
from data_manifest.shell import Shell, complete, history_path, questions
from pipeline.reports.query_results import write_result

MODES = ("table", "csv", "json", "markdown")


@pytest.fixture
def shell(workspace, write_train_catalog):
    """(shell, ws, ask): `ask(*lines)` feeds lines and returns (stdout, stderr) of just those lines."""
    write_train_catalog(workspace, n=6)
    session = catalog.Session(workspace)
    out, err = io.StringIO(), io.StringIO()
    sh = Shell(session, lambda tbl, mode: write_result(tbl, mode, None, 50), MODES, stdin=io.StringIO(""),
               stdout=out, stderr=err, interactive=False)

    def ask(*lines: str) -> tuple[str, str]:
        for buf in (out, err):
            buf.seek(0)
            buf.truncate()
        for line in lines:
            sh.feed(line)
        return out.getvalue(), err.getvalue()

    yield sh, workspace, ask
    session.close()


def test_a_statement_over_several_lines_prints_its_rows(shell):
    sh, _, ask = shell
    assert ask(".mode json") == ("", "")
    assert ask("SELECT sample_id, dataset FROM samples") == ("", "")  # no ';' yet: the statement goes on
    out, err = ask("WHERE sample_id IN ('gen-001', 'gen-004') ORDER BY 1;")
    assert err == "" and json.loads(out) == [{"sample_id": "gen-001", "dataset": "gen"},
                                             {"sample_id": "gen-004", "dataset": "gen"}]
    out, _ = ask("SELECT count(*) AS n FROM faces WHERE status = 'ok'; SELECT 'a;b' AS s;")  # two, each shown
    assert [json.loads(part) for part in out.replace("]\n[", "]\x00[").split("\x00")] == [[{"n": 6}], [{"s": "a;b"}]]
    ask(".mode table")
    out, _ = ask("SELECT sample_id FROM samples ORDER BY 1 LIMIT 2;")
    assert out.splitlines() == ["sample_id", "---------", "gen-000", "gen-001", "(2 rows)"]


def test_tables_schema_mode_and_timer(shell):
    sh, _, ask = shell
    out, _ = ask(".tables")
    assert out.split() == sorted(catalog.VIEW_NAMES) and "labels" in out.split()
    ask(".mode csv")
    out, _ = ask(".schema anchors")
    assert out.splitlines()[0] == '"column_name","column_type"' and '"anchor","FLOAT"' in out.splitlines()
    assert ask(".mode")[0] == "csv\n"
    out, err = ask(".schema nothing")
    assert out == "" and err.startswith("error: no view 'nothing'")
    assert ask(".timer on") == ("", "")
    out, _ = ask("SELECT 42 AS x;")
    assert out.splitlines()[:2] == ['"x"', "42"] and out.splitlines()[2].startswith("Run Time: ")
    ask(".timer off")
    assert "Run Time" not in ask("SELECT 42 AS x;")[0]
    assert ask(".mode parquet")[1] == "error: usage: .mode table|csv|json|markdown\n" and sh.mode == "csv"
    ask(".mode markdown")
    assert ask("SELECT 'a|b' AS x;")[0] == "| x |\n|---|\n| a\\|b |\n"
    assert ask(".nope")[1].startswith("error: unknown command '.nope'")
    assert ".questions [NAME]" in ask(".help")[0]


def test_refused_statements_print_the_guards_message_and_the_shell_goes_on(shell, file_hashes, tmp_path):
    sh, ws, ask = shell
    target = tmp_path / "out.csv"
    before = file_hashes(ws.root, tmp_path)
    for stmt in (f"COPY samples TO '{target}'", "INSERT INTO samples_history SELECT * FROM samples_history",
                 "SELECT * FROM json_execute_serialized_sql('x')",
                 f"WITH c AS (COPY (SELECT 1) TO '{target}') SELECT 1", "SET enable_external_access = true"):
        with pytest.raises(catalog.ReadOnlyError) as exc:  # what `fiqa sql` says of it
            catalog.query(ws, stmt + ";")
        out, err = ask(stmt + ";")
        assert out == "" and err == f"error: {exc.value}\n" and err.startswith("error: refused: ")
    assert "json_execute_serialized_sql() is not one a query may call" in ask(
        "SELECT * FROM json_execute_serialized_sql('x');")[1]
    out, err = ask("SELECT 1 AS a; COPY samples TO 'x.csv'; SELECT 2 AS b;")  # checked whole before any runs
    assert out == "" and err.startswith("error: refused: COPY statement")
    out, err = ask("SELECT 1 AS a; SELECT nope; SELECT 2 AS b;")  # a failing statement stops the rest
    assert out.split()[0] == "a" and "b" not in out.split() and "nope" in err
    assert not target.exists() and file_hashes(ws.root, tmp_path) == before
    ask(".mode json")
    assert json.loads(ask("SELECT count(*) AS n FROM samples;")[0]) == [{"n": 7}]


def test_files_named_literally_are_read_per_statement_and_outside_ones_refused(shell, tmp_path):
    sh, ws, ask = shell
    (ws.root / "ids.csv").write_text("sample_id\ngen-002\ngen-005\n")
    ask(".mode json")
    q = f"SELECT s.sample_id FROM samples s JOIN read_csv('{ws.root}/ids.csv') USING (sample_id) ORDER BY 1;"
    for _ in range(2):  # the file's table is registered while the statement runs, then dropped
        assert json.loads(ask(q)[0]) == [{"sample_id": "gen-002"}, {"sample_id": "gen-005"}]
    assert "does not exist" in ask("SELECT * FROM _file_0;")[1]
    (tmp_path / "secret.txt").write_text("x\n")
    out, err = ask(f"SELECT * FROM read_text('{tmp_path}/secret.txt');")
    assert out == "" and catalog.EXTERNAL_READ_HINT in err


def test_bad_sql_and_ctrl_c_leave_the_shell_running(shell, monkeypatch):
    sh, _, ask = shell
    out, err = ask("SELECT nope FROM samples;")
    assert out == "" and err.startswith("error: Binder Error") and "nope" in err
    assert ask("SELEC 1;")[1].startswith("error: cannot parse SQL")
    real = sh.session.query

    def interrupted(sql):
        monkeypatch.setattr(sh.session, "query", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(sh.session, "query", interrupted)
    assert ask("SELECT 1;") == ("", "error: cancelled\n")
    assert ask("SELECT 7 AS x;")[0].splitlines()[2] == "7"


def test_questions_list_and_run_the_bundled_ones(shell):
    sh, ws, ask = shell
    out, _ = ask(".questions")
    assert [line.split()[0] for line in out.splitlines()] == sorted(questions()) and "status_summary" in out
    assert "Row status per table" in out
    ask(".mode json")
    out, err = ask(".questions status_summary")
    assert err == "" and json.loads(out) == catalog.query(ws, catalog.bundled_sql("status_summary")).to_pylist()
    assert ask(".questions nope")[1].startswith("error: usage: .questions [NAME]")


def test_run_reads_until_quit_runs_a_last_unterminated_statement_and_survives_ctrl_c(shell):
    sh, _, _ = shell
    sh.stdin = io.StringIO(".mode csv\nSELECT 1 AS a;\n.quit\nSELECT 2 AS b;\n")
    assert sh.run() == 0 and sh.stdout.getvalue() == '"a"\n1\n'
    sh.stdout.truncate(0)
    sh.stdout.seek(0)
    lines = iter(["SELECT 'lost'\n", KeyboardInterrupt, "SELECT 3 AS c\n"])

    class Typing:
        def readline(self):
            line = next(lines, "")
            if line is KeyboardInterrupt:
                raise KeyboardInterrupt
            return line

    sh.stdin = Typing()
    assert sh.run() == 0 and sh.stdout.getvalue() == '"c"\n3\n'  # Ctrl-C dropped the half-typed statement


@pytest.mark.parametrize(("text", "done"), [
    ("SELECT 1;", True), ("SELECT 1", False), ("SELECT ';'", False), ("SELECT 'it''s;'", False),
    ("SELECT 'it''s';", True), ('SELECT 1 AS "a;"', False), ("SELECT 1; -- done", True),
    ("SELECT 1 -- not yet;", False), ("SELECT /* ; */ 1", False), ("SELECT /* ; 1;", False), ("", False),
])
def test_a_statement_is_complete_at_a_semicolon_outside_strings_and_comments(text, done):
    assert complete(text) is done


def test_the_history_file_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FIQA_SQL_HISTORY", str(tmp_path / "h"))
    assert history_path() == tmp_path / "h"
    monkeypatch.setenv("FIQA_SQL_HISTORY", "")
    assert history_path() is None
    monkeypatch.delenv("FIQA_SQL_HISTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert history_path() == tmp_path / "cache" / "fiqa" / "sql_history"


def test_fiqa_sql_without_a_query_and_fiqa_shell_read_statements_from_stdin(shell, monkeypatch, capsys):
    from flows.cli import main

    _, ws, _ = shell
    for command in ("sql", "shell"):
        monkeypatch.setattr("sys.stdin", io.StringIO("SELECT count(*) AS n FROM samples;\nDROP VIEW samples;\n"))
        assert main([command, "--workspace", str(ws.root), "--format", "json"]) == 0
        got = capsys.readouterr()
        assert json.loads(got.out) == [{"n": 7}] and got.err.startswith("error: refused: DROP statement")
    assert main(["sql", "--workspace", str(ws.root), "--output", str(ws.root / "o.csv")]) == 2
    assert "--output needs a query" in capsys.readouterr().err
    assert main(["sql", "--workspace", str(ws.root), "--format", "parquet"]) == 2
    assert "needs a query" in capsys.readouterr().err
