"""The DuckDB catalog: `<table>_history` (all rows) and `<table>` (latest per key) views over the manifests.

Two ways in: `refresh(ws)` folds new shards into the snapshot tables of the
latest views and rewrites the views in `catalog.duckdb` (a short read-write
open, for the DuckDB CLI and other tools), and `connect(ws)` / `query(ws, sql)`
give an in-memory, read-only query connection: the history views are Arrow
datasets registered from Python, the snapshots come from `catalog.duckdb`
attached read-only (data_manifest/snapshots.py), and the connection itself is
opened with file access switched off and its configuration locked. User SQL is
checked statement by statement against an allowlist of its parsed tree
before anything runs (see docs/architecture.md, "Read-only inspection").
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from data_manifest import snapshots
from data_manifest.schemas import SCHEMAS, TABLES, duck_type
from data_manifest.workspace import Workspace

SQL_DIR = Path(__file__).with_name("sql")
EXTERNAL_READ_HINT = "pass --allow-external-read to 'fiqa sql' to read other files"


class ReadOnlyError(ValueError):
    """A statement that would change the catalog, write files or read outside what it may read was refused."""


def history_sql(ws: Workspace, table: str) -> str:
    """SELECT over every committed shard of a table (an empty, typed relation when there is none)."""
    base = ws.manifests / table
    if snapshots.shard_files(ws, table):
        glob = snapshots.sql_str((base / "run=*" / "part-*.parquet").as_posix())
        return f"SELECT * FROM read_parquet({glob}, union_by_name = true, hive_partitioning = false)"
    cols = ", ".join(f"CAST(NULL AS {duck_type(f.type)}) AS {f.name}" for f in SCHEMAS[table])
    return f"SELECT {cols} WHERE false"


def latest_sql(table: str) -> str:
    """The latest view computed from the whole history (when there is no usable snapshot)."""
    return f"SELECT * FROM {table}_history {snapshots.newest_first(table)}"


VIEW_NAMES: frozenset[str] = frozenset([*TABLES, *(f"{t}_history" for t in TABLES), "labels"])


def latest_statements(states: dict[str, snapshots.TableState], snap: str,
                      pending: Callable[[str, list[Path]], str]) -> list[str]:
    """CREATE VIEW statements of the latest views: from the snapshots where usable, else from the history.

    `snap` prefixes the snapshot tables (the attached catalog's alias and a dot, or nothing inside
    catalog.duckdb); `pending(table, files)` is a relation over shards the snapshot has not folded yet.
    """
    stmts = []
    for t in TABLES:
        st = states.get(t)
        if st is None or not st.usable:
            body = latest_sql(t)
        elif not st.pending:
            body = f"SELECT * FROM {snap}{snapshots.snapshot_name(t)}"
        else:
            body = snapshots.overlay_sql(t, snap + snapshots.snapshot_name(t), pending(t, st.pending))
        stmts.append(f"CREATE OR REPLACE VIEW {t} AS {body}")
    lab = states.get("labels")
    touched = [t for t in snapshots.LABEL_INPUTS if lab is not None and states[t].pending]
    if lab is None or not lab.usable:
        body = snapshots.labels_sql()
    elif not touched:
        body = f"SELECT * FROM {snap}{snapshots.snapshot_name('labels')}"
    else:
        ids = "(" + " UNION ".join(f"SELECT sample_id FROM {pending(t, states[t].pending)}" for t in touched) + ")"
        body = snapshots.labels_overlay_sql(snap + snapshots.snapshot_name("labels"), ids,
                                            {t: t for t in snapshots.LABEL_INPUTS})
    stmts.append(f"CREATE OR REPLACE VIEW labels AS {body}")
    return stmts


def view_statements(ws: Workspace, states: dict[str, snapshots.TableState] | None = None) -> list[str]:
    """CREATE OR REPLACE VIEW statements (reading the Parquet files and snapshot tables) for catalog.duckdb."""
    stmts = [f"CREATE OR REPLACE VIEW {t}_history AS {history_sql(ws, t)}" for t in TABLES]
    return stmts + latest_statements(states or {}, "",
                                     lambda t, files: f"({snapshots.read_shards_sql(t, files)})")


def history_dataset(ws: Workspace, table: str, shards: Sequence[Path] | None = None) -> pads.Dataset:
    """Shards of a table (default: all) as one Arrow dataset with the table schema (older shards: missing = null)."""
    files = [p.as_posix() for p in (snapshots.shard_files(ws, table) if shards is None else shards)]
    sch = SCHEMAS[table]
    if not files:
        return pads.dataset(sch.empty_table())
    return pads.dataset(files, schema=sch, format="parquet")


# Settings of every query connection, applied in this order before the configuration is locked.
_LOCKDOWN = (
    "SET autoinstall_known_extensions = false",  # no INSTALL behind a query's back (it writes ~/.duckdb)
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET temp_directory = ''",  # never spill to disk
    "SET python_enable_replacements = false",  # no scanning of Python variables by name
    "SET enable_external_access = false",  # no file access but the allowed paths
    "SET lock_configuration = true",  # and none of the above can be SET back
)


def connect(ws: Workspace, *, read_paths: Iterable[str] = (),
            read_dirs: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
    """An in-memory query connection: catalog views over Arrow datasets, no file access, locked configuration.

    `read_paths` / `read_dirs` are the only files / directories a query on it may read
    (the views need none); nothing on it can write a file. A moved or copied workspace first gets
    its catalog.duckdb views rewritten for where it now is (for the DuckDB CLI and other tools).
    """
    refresh_if_moved(ws)
    con = duckdb.connect(":memory:")
    try:
        files = {t: snapshots.shard_files(ws, t) for t in TABLES}  # listed once per connection
        states = _attach_snapshots(con, ws, files)
        for t in TABLES:
            con.register(f"{t}_history", history_dataset(ws, t, files[t]))
        for t, st in states.items():
            if st.usable and st.pending:
                con.register(f"_pending_{t}", history_dataset(ws, t, st.pending))
        for stmt in latest_statements(states, f"{SNAPSHOT_ALIAS}.", lambda t, _files: f"_pending_{t}"):
            con.execute(stmt)
        paths, dirs = sorted(set(read_paths)), sorted(set(read_dirs))
        if paths:
            con.execute("SET allowed_paths = ?", [paths])
        if dirs:
            con.execute("SET allowed_directories = ?", [dirs])
        for s in _LOCKDOWN:
            con.execute(s)
    except BaseException:
        con.close()
        raise
    return con


SNAPSHOT_ALIAS = "snapshot"  # catalog.duckdb, attached read-only to a query connection


def _attach_snapshots(con: duckdb.DuckDBPyConnection, ws: Workspace, files: dict[str, list[Path]],
                      retries: int = 8, wait_s: float = 0.25) -> dict[str, snapshots.TableState]:
    """Attach catalog.duckdb read-only and say which snapshots a query can use ({} without one).

    While a flow folds new shards into it the file is locked for writing: the query waits briefly,
    then answers from the shards themselves (exact, only slower), with a warning.
    """
    if not ws.catalog_path.is_file():
        return {}
    for attempt in range(retries):
        try:
            con.execute(f"ATTACH {snapshots.sql_str(str(ws.catalog_path))} AS {SNAPSHOT_ALIAS} (READ_ONLY)")
            break
        except duckdb.Error as e:
            if "lock" in str(e).lower() and attempt < retries - 1:
                time.sleep(wait_s)
                continue
            warnings.warn(f"catalog {ws.catalog_path} cannot be read now ({type(e).__name__}: {e}); answering "
                          "from the manifest shards, which is slower on a large workspace", stacklevel=3)
            return {}
    return snapshots.table_states(ws, con, SNAPSHOT_ALIAS, files=files)


_BUSY = ("lock", "already attached", "in use")  # another process, or a query connection of this one, has the file


def _open_catalog(ws: Workspace, retries: int, wait_s: float) -> duckdb.DuckDBPyConnection | None:
    """catalog.duckdb opened read-write, waiting while it is busy; None (with a warning) if it stays busy."""
    for attempt in range(retries):
        try:
            return duckdb.connect(str(ws.catalog_path))
        except duckdb.Error as e:
            busy = any(w in str(e).lower() for w in _BUSY)
            if not busy and not isinstance(e, duckdb.IOException):
                raise
            if not busy or attempt == retries - 1:
                warnings.warn(f"catalog {ws.catalog_path} not refreshed: {e}", stacklevel=3)
                return None
            time.sleep(wait_s)
    return None


def history_connection(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """A connection whose latest views are computed from the shards alone (the definition the snapshots must equal;
    what every question cost before them). For checks and benchmarks, not for user SQL: nothing is locked down."""
    con = duckdb.connect(":memory:")
    for t in TABLES:
        con.register(f"{t}_history", history_dataset(ws, t))
    for stmt in latest_statements({}, "", lambda t, _files: ""):
        con.execute(stmt)
    return con


def refresh(ws: Workspace, retries: int = 20, wait_s: float = 0.25, *, fold: bool = True, rebuild: bool = False,
            log: Callable[[str], None] | None = None, folds: list[snapshots.FoldReport] | None = None) -> bool:
    """Fold new shards into the snapshots and rewrite the views in catalog.duckdb.

    `log` receives what the fold has to say (a snapshot rebuilt, and why); `folds` gets its FoldReport.
    Returns False (with a warning) if the file stays locked. A failed fold (out of memory, disk
    full) is a warning too: the shards are committed and queries still answer exactly from them.
    With `rebuild`, every snapshot is recomputed from all shards (what `fiqa compact` does).
    """
    con = _open_catalog(ws, retries, wait_s)
    if con is None:
        return False
    try:
        if fold or rebuild:
            try:
                report = snapshots.update(con, ws, rebuild=rebuild, log=log)
                if folds is not None:
                    folds.append(report)
            except duckdb.Error as e:
                if rebuild:
                    raise
                warnings.warn(f"snapshots in {ws.catalog_path} not updated ({type(e).__name__}: {e}); queries "
                              "read the new shards directly until the next refresh or 'fiqa compact'", stacklevel=2)
        for stmt in view_statements(ws, snapshots.table_states(ws, con)):
            con.execute(stmt)
    finally:
        con.close()
    tmp = ws.catalog_root_path.with_name(ws.catalog_root_path.name + ".tmp")
    tmp.write_text(str(ws.root) + "\n", encoding="utf-8")
    os.replace(tmp, ws.catalog_root_path)
    return True


def catalog_moved(ws: Workspace) -> bool:
    """True when catalog.duckdb exists but its views were written for another location (a moved or copied
    workspace, or one written before the location was recorded): its absolute paths would read the old place."""
    if not ws.catalog_path.is_file():
        return False
    try:
        recorded = ws.catalog_root_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return True
    return recorded != str(ws.root)


def refresh_if_moved(ws: Workspace) -> bool:
    """Rewrite catalog.duckdb's views when the workspace was moved or copied; True when it rewrote them.

    A workspace that cannot be written (a read-only copy) keeps its stale file, with a warning;
    queries through `connect` never read that file, so they are unaffected.
    """
    if not catalog_moved(ws):
        return False
    try:
        return refresh(ws, fold=False)
    except (OSError, duckdb.Error) as e:
        warnings.warn(f"catalog {ws.catalog_path} was written for another location and could not be "
                      f"rewritten here: {e}", stacklevel=2)
        return False


# ---------------------------------------------------------------- statement checks

_ALLOWED_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
_EXPLAIN_RE = re.compile(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?=\S)", re.IGNORECASE)
_GLOB_CHARS = ("*", "?", "[", "{")
_MAX_DEPTH = 4  # query('...') inside query('...') ...
_QUERIES_HINT = "only queries (SELECT, WITH, VALUES, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) are allowed"


@dataclass
class CheckedSQL:
    """A script that passed the checks: its statements in order and the file paths its table functions name."""

    statements: list[str]
    paths: list[str] = field(default_factory=list)


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 80 else flat[:77] + "..."


_PARSERS = threading.local()


def _parser() -> duckdb.DuckDBPyConnection:
    """This thread's locked scratch connection, used only to parse and serialise statements (never to run them)."""
    con = getattr(_PARSERS, "con", None)
    if con is None:
        con = duckdb.connect(":memory:")
        for s in _LOCKDOWN:
            con.execute(s)
        _PARSERS.con = con
    return con


def inspect_sql(sql: str, con: duckdb.DuckDBPyConnection | None = None) -> CheckedSQL:
    """Split a script into statements and check each one; raises ReadOnlyError for anything but a pure query.

    A statement passes only when it is a SELECT (or EXPLAIN of one) whose serialised
    tree holds nothing but SELECT / set-operation / CTE nodes: COPY, INSERT, UPDATE,
    DELETE nodes inside CTEs or subqueries, and statements DuckDB cannot serialise
    as a query (PRAGMA, SET, ATTACH, INSTALL, LOAD, CALL, ...) are refused.
    """
    con = _parser() if con is None else con
    out = CheckedSQL([])
    for text, kind in _split(con, sql):
        _check_statement(con, text, kind, out.paths, 0)
        out.statements.append(text)
    if not out.statements:
        raise ValueError("no SQL statement given")
    return out


def _split(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[str, duckdb.StatementType]]:
    try:
        return [(st.query, st.type) for st in con.extract_statements(sql)]
    except duckdb.Error as e:
        raise ValueError(f"cannot parse SQL: {e}") from e


def _keyword(text: str) -> str:
    """The first word of a statement after any leading comments (INSTALL, COPY, ...)."""
    m = re.match(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z]+)", text, re.DOTALL)
    return m.group(1).upper() if m else ""


def _refuse(what: str, text: str) -> ReadOnlyError:
    return ReadOnlyError(f"refused: {what} ({_short(text)!r}); the catalog is read-only here, {_QUERIES_HINT}")


def _check_statement(con: duckdb.DuckDBPyConnection, text: str, kind: duckdb.StatementType, paths: list[str],
                     depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _refuse("query() nested too deeply", text)
    if kind == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN_RE.match(text)
        inner = _split(con, text[m.end():]) if m else []
        if len(inner) != 1:
            raise _refuse("EXPLAIN that is not 'EXPLAIN [ANALYZE] <one query>'", text)
        _check_statement(con, inner[0][0], inner[0][1], paths, depth + 1)
        return
    if kind == duckdb.StatementType.MULTI:
        raise _refuse("statement that runs as several (PIVOT without an IN list: name the pivot values)", text)
    if kind != duckdb.StatementType.SELECT:
        raise _refuse(f"{_keyword(text) or str(kind).split('.')[-1]} statement", text)
    raw = con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()[0]
    try:
        tree = json.loads(raw)
    except RecursionError:
        raise _refuse("query nested too deeply to be checked", text) from None
    if tree.get("error"):
        raise _refuse(f"statement that cannot be checked as a query ({tree.get('error_message')})", text)
    statements = tree.get("statements") or []
    if len(statements) != 1:
        raise _refuse(f"{len(statements)} statements where one was expected", text)
    _walk(con, statements[0], text, paths, depth)


def _walk(con: duckdb.DuckDBPyConnection, tree: object, text: str, paths: list[str], depth: int) -> None:
    """Allowlist walk over a serialised statement: only query nodes; collect file paths; check query('...')."""
    stack = [tree]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
            continue
        if not isinstance(obj, dict):
            continue
        typ = obj.get("type")
        if isinstance(typ, str) and typ.endswith("_NODE") and typ not in _ALLOWED_NODES:
            raise _refuse(f"{typ.removesuffix('_QUERY_NODE').removesuffix('_NODE')} inside a query", text)
        if "info_type" in obj:
            raise _refuse(f"{obj['info_type']} inside a query", text)
        if typ == "TABLE_FUNCTION" and isinstance(obj.get("function"), dict):
            _table_function(con, obj["function"], text, paths, depth)
        elif typ == "BASE_TABLE":
            name = obj.get("table_name")
            if isinstance(name, str) and name.lower() not in VIEW_NAMES and not obj.get("schema_name"):
                paths.append(name)  # `FROM 'file.csv'` is a replacement scan of a file
        stack.extend(v for v in obj.values() if isinstance(v, dict | list))


def _string_args(fn: dict) -> list[str]:
    """Constant string arguments of a function call (positional, also inside a list literal)."""
    out = []
    for arg in fn.get("arguments") or []:
        if not isinstance(arg, dict) or arg.get("name"):
            continue
        expr = arg.get("expression") or {}
        lit = expr.get("literal") if expr.get("class") == "CONSTANT" else None
        if isinstance(lit, dict) and lit.get("kind") == "STRING":
            out.append(str(lit.get("text")))
        elif expr.get("class") == "FUNCTION" and expr.get("function_name") == "list_value":
            out += _string_args(expr)
    return out


def _table_function(con: duckdb.DuckDBPyConnection, fn: dict, text: str, paths: list[str], depth: int) -> None:
    name = str(fn.get("function_name", "")).lower()
    if name == "query":  # runs its string argument as SQL: that SQL must pass the same checks
        args = _string_args(fn)
        if len(args) != 1:
            raise _refuse("query() with SQL that is not a constant string", text)
        inner = _split(con, args[0])
        if len(inner) != 1:
            raise _refuse("query() with other than one statement", text)
        _check_statement(con, inner[0][0], inner[0][1], paths, depth + 1)
        return
    paths.extend(_string_args(fn))


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    """The statements of a script after the read-only checks (ReadOnlyError / ValueError otherwise)."""
    return inspect_sql(sql, con).statements


# ---------------------------------------------------------------- reading files


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def file_grants(ws: Workspace, paths: Sequence[str], allow_external_read: bool = False) -> tuple[list[str], list[str]]:
    """(files, directories) a query may read: literal paths of existing files inside the workspace, or anywhere
    (glob patterns and directories too) with allow_external_read. Paths computed at run time are never granted."""
    root = os.path.realpath(ws.root)
    files: set[str] = set()
    dirs: set[str] = set()
    for p in paths:
        if "://" in p or not p:
            continue
        full = os.path.abspath(os.path.expanduser(p))
        if any(c in p for c in _GLOB_CHARS):
            if allow_external_read:
                parts = Path(full).parts
                cut = next((i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)), len(parts))
                dirs.add(os.path.join(*parts[:cut]) + os.sep)
            continue
        if allow_external_read and os.path.isdir(full):
            dirs.add(full + os.sep)
        elif allow_external_read:
            files.update([p, full])
        elif os.path.isfile(full) and _inside(os.path.realpath(full), root):
            files.update([p, full])
    return sorted(files), sorted(dirs)


def _permission_message(e: duckdb.Error, ws: Workspace, allow_external_read: bool) -> str:
    m = re.search(r'Cannot access (?:file|directory) "([^"]*)"', str(e))
    what = f"{m.group(1)!r}" if m else "a file"
    if allow_external_read:
        return (f"refused: the query reaches {what}, which it does not name literally or writes to; "
                "only files named in the query can be read, and nothing can be written")
    return (f"refused: the query reads {what}, outside what it may read (the catalog views, and single files inside "
            f"the workspace {ws.root} named literally, not patterns); {EXTERNAL_READ_HINT}")


def query(ws: Workspace, sql: str, params: list | dict | None = None, *,
          allow_external_read: bool = False) -> pa.Table:
    """Run read-only SQL against the catalog views; the result of the last statement as Arrow.

    Every statement passes the same checks and runs in order; `params` bind to the last one.
    """
    checked = inspect_sql(sql)
    files, dirs = file_grants(ws, checked.paths, allow_external_read)
    con = connect(ws, read_paths=files, read_dirs=dirs)
    try:
        try:
            for s in checked.statements[:-1]:
                con.execute(s)
                con.complete()
            return con.sql(checked.statements[-1], params=params).to_arrow_table()
        except duckdb.PermissionException as e:
            raise ReadOnlyError(_permission_message(e, ws, allow_external_read)) from e
    finally:
        con.close()


def selection_sql(base: str, where: str | None = None, query: str | None = None, *, on_labels: bool = True) -> str:
    """Rows of `base` (or of a user `query`) filtered by a SQL `where`, ordered by sample_id.

    With on_labels, `where` is a condition on the `labels` view (any label, anchor or
    sample column); otherwise on the columns of `base` itself.
    """
    if query is not None:
        if where is not None:
            raise ValueError("give either --query or --where, not both")
        return f"SELECT * FROM ({query}) AS t ORDER BY sample_id"
    if where is not None and not where.strip():
        raise ValueError("--where is empty")
    sql = f"SELECT * FROM ({base}) AS t"
    if where:
        sql += f" WHERE sample_id IN (SELECT sample_id FROM labels WHERE {where})" if on_labels else f" WHERE {where}"
    return sql + " ORDER BY sample_id"


def bundled_sql(name: str) -> str:
    """Text of a bundled query from data_manifest/sql/<name>.sql."""
    p = SQL_DIR / f"{name}.sql"
    if not p.exists():
        known = sorted(x.stem for x in SQL_DIR.glob("*.sql"))
        raise FileNotFoundError(f"no bundled query {name!r}; known: {known}")
    return p.read_text()
