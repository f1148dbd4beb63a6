"""The checks every piece of user SQL passes before it runs, and the files it may read.

User SQL (`fiqa sql`, `--where`, `--query`) is untrusted text. `plan(ws, sql)`:

1. splits the script with DuckDB's parser and checks each statement: it must be a
   query (SELECT, or EXPLAIN of one), and its `json_serialize_sql` tree may hold
   only query nodes (no COPY / INSERT / ... anywhere), only the table functions of
   `sql_functions.TABLE_FUNCTIONS` and `FILE_READERS`, and only the scalar,
   aggregate and window functions of the allow-list (`sql_functions`);
2. takes every file a statement reads (a reader function, `FROM 'file.csv'`) out of
   the statement: its literal path is resolved with every symlink, checked (a
   regular file inside the workspace; anywhere with `allow_external_read`; never
   a path computed at run time), read on a separate connection that may open
   exactly those files, and replaced in the statement by a registered table.

The statements that come out read no file at all, so the connection they run on
(`catalog.connect`) has no file access whatsoever.
"""

from __future__ import annotations

import copy
import glob as globmod
import json
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from data_manifest import sql_functions
from data_manifest.workspace import Workspace

EXTERNAL_READ_HINT = "pass --allow-external-read to 'fiqa sql' to read other files"
_QUERIES_HINT = "only queries (SELECT, WITH, VALUES, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) are allowed"
_ALLOWED_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
_EXPLAIN_RE = re.compile(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?=\S)", re.IGNORECASE)
GLOB_CHARS = ("*", "?", "[")
_MAX_DEPTH = 4  # query('...') inside query('...') ...
_CONSTANT_BUILDERS = frozenset({"list_value", "struct_pack", "row", "array_value"})  # literals of reader options
FILE_TABLE_PREFIX = "_file_"


class ReadOnlyError(ValueError):
    """A statement that would change the catalog, write files or read outside what it may read was refused."""


@dataclass
class FileRead:
    """One file reference of a statement: the reader, its literal paths, and the tree node it replaces."""

    function: str  # a FILE_READERS name, or "" for `FROM 'file'`
    paths: list[str]
    node: dict  # the TABLE_FUNCTION / BASE_TABLE node, rewritten in place to a registered table
    resolved: list[str] = field(default_factory=list)
    name: str = ""


@dataclass
class _Statement:
    text: str
    tree: dict | None = None  # None: EXPLAIN, whose inner statement is `inner`
    explain: str = ""
    inner: _Statement | None = None
    reads: list[FileRead] = field(default_factory=list)
    nested: list[tuple[dict, _Statement]] = field(default_factory=list)  # query('...') literals and their statements


@dataclass
class Plan:
    """A script that passed the checks: statements to run (reading no file) and the tables they read instead."""

    statements: list[str]
    tables: dict[str, pa.Table] = field(default_factory=dict)


def short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 80 else flat[:77] + "..."


def refuse(what: str, text: str) -> ReadOnlyError:
    return ReadOnlyError(f"refused: {what} ({short(text)!r}); the catalog is read-only here, {_QUERIES_HINT}")


_PARSERS = threading.local()
# Settings of every connection that sees user SQL (parser, query, file reader), applied in this order.
LOCKDOWN = (
    "SET autoinstall_known_extensions = false",  # no INSTALL behind a query's back (it writes ~/.duckdb)
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET temp_directory = ''",  # never spill to disk
    "SET python_enable_replacements = false",  # no scanning of Python variables by name
    "SET enable_external_access = false",  # no file access (a file reader's own connection: its files only)
    "SET lock_configuration = true",  # and none of the above can be SET back
)


def parser() -> duckdb.DuckDBPyConnection:
    """This thread's locked scratch connection, used only to parse and serialise statements (never to run them)."""
    con = getattr(_PARSERS, "con", None)
    if con is None:
        con = duckdb.connect(":memory:")
        for s in LOCKDOWN:
            con.execute(s)
        _PARSERS.con = con
    return con


def split(sql: str) -> list[tuple[str, duckdb.StatementType]]:
    try:
        return [(st.query, st.type) for st in parser().extract_statements(sql)]
    except duckdb.Error as e:
        raise ValueError(f"cannot parse SQL: {e}") from e


def _keyword(text: str) -> str:
    """The first word of a statement after any leading comments (INSTALL, COPY, ...)."""
    m = re.match(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z]+)", text, re.DOTALL)
    return m.group(1).upper() if m else ""


def check(sql: str, view_names: frozenset[str]) -> list[_Statement]:
    """Every statement of a script, checked (ReadOnlyError / ValueError otherwise), with its file references."""
    out = [_check_statement(text, kind, view_names, 0) for text, kind in split(sql)]
    if not out:
        raise ValueError("no SQL statement given")
    return out


def _check_statement(text: str, kind: duckdb.StatementType, views: frozenset[str], depth: int) -> _Statement:
    if depth > _MAX_DEPTH:
        raise refuse("query() nested too deeply", text)
    if kind == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN_RE.match(text)
        inner = split(text[m.end():]) if m else []
        if len(inner) != 1:
            raise refuse("EXPLAIN that is not 'EXPLAIN [ANALYZE] <one query>'", text)
        return _Statement(text, explain=text[:m.end()], inner=_check_statement(*inner[0], views, depth + 1))
    if kind == duckdb.StatementType.MULTI:
        raise refuse("statement that runs as several (PIVOT without an IN list: name the pivot values)", text)
    if kind != duckdb.StatementType.SELECT:
        raise refuse(f"{_keyword(text) or str(kind).split('.')[-1]} statement", text)
    raw = parser().execute("SELECT json_serialize_sql(?)", [text]).fetchone()[0]
    try:
        tree = json.loads(raw)
    except RecursionError:
        raise refuse("query nested too deeply to be checked", text) from None
    if tree.get("error"):
        raise refuse(f"statement that cannot be checked as a query ({tree.get('error_message')})", text)
    if len(tree.get("statements") or []) != 1:
        raise refuse(f"{len(tree.get('statements') or [])} statements where one was expected", text)
    st = _Statement(text, tree)
    _walk(st, tree["statements"][0], views, depth)
    return st


def _walk(st: _Statement, tree: object, views: frozenset[str], depth: int) -> None:
    """Allowlist walk over a serialised statement: query nodes, allowed functions; file references collected."""
    allowed = sql_functions.allowed_functions()
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
            raise refuse(f"{typ.removesuffix('_QUERY_NODE').removesuffix('_NODE')} inside a query", st.text)
        if "info_type" in obj:
            raise refuse(f"{obj['info_type']} inside a query", st.text)
        if typ == "TABLE_FUNCTION" and isinstance(obj.get("function"), dict):
            fn = obj["function"]
            name = str(fn.get("function_name", "")).lower()
            if name in sql_functions.FILE_READERS:
                st.reads.append(FileRead(name, _literal_paths(fn, st.text), obj))
                _check_reader_options(fn, st.text)
                continue
            if name not in sql_functions.TABLE_FUNCTIONS:
                raise refuse(f"table function {name}() is not one a query may call", st.text)
            if name == "query":
                _nested_query(st, fn, views, depth)
                continue
            stack.extend(a for a in fn.get("arguments") or [] if isinstance(a, dict))
            stack.extend(v for k, v in obj.items() if k != "function" and isinstance(v, dict | list))
            continue
        if obj.get("class") in ("FUNCTION", "WINDOW") and "function_name" in obj:
            name = str(obj["function_name"]).lower()
            if name not in allowed:
                raise refuse(f"function {name}() is not one a query may call", st.text)
        if typ == "BASE_TABLE":
            name = obj.get("table_name")
            if (isinstance(name, str) and not obj.get("schema_name") and not obj.get("catalog_name")
                    and name.lower() not in views and _looks_like_path(name)):
                st.reads.append(FileRead("", [name], obj))  # `FROM 'file.csv'`: a replacement scan of a file
        stack.extend(v for v in obj.values() if isinstance(v, dict | list))


def _looks_like_path(name: str) -> bool:
    return any(c in name for c in "/.\\~") or any(c in name for c in GLOB_CHARS)


def _literal_paths(fn: dict, text: str) -> list[str]:
    """The constant path (or list of paths) a reader names; a path computed at run time is refused."""
    positional = [a for a in fn.get("arguments") or [] if isinstance(a, dict) and not a.get("name")]
    if len(positional) != 1:
        raise refuse(f"{fn.get('function_name')}() without exactly one path argument", text)
    paths = _strings(positional[0].get("expression") or {})
    if paths is None or not paths:
        raise refuse("the query reads a path computed at run time; only literal paths can be read", text)
    return paths


def _strings(expr: dict) -> list[str] | None:
    """A constant string, or a list literal of constant strings; None for anything computed."""
    if expr.get("class") == "CONSTANT":
        lit = expr.get("literal") or {}
        return [str(lit.get("text"))] if lit.get("kind") == "STRING" else None
    if expr.get("class") == "FUNCTION" and expr.get("function_name") == "list_value":
        out: list[str] = []
        for arg in expr.get("children") or [a.get("expression") for a in expr.get("arguments") or []]:
            got = _strings(arg or {})
            if got is None:
                return None
            out += got
        return out
    return None


def _check_reader_options(fn: dict, text: str) -> None:
    """Named options of a reader (`header = true`, `columns = {...}`) must be literals: they run on its connection."""
    def literal(expr: object) -> bool:
        if not isinstance(expr, dict):
            return False
        if expr.get("class") == "CONSTANT":
            return True
        if expr.get("class") == "FUNCTION" and expr.get("function_name") in _CONSTANT_BUILDERS:
            kids = expr.get("children") or [a.get("expression") for a in expr.get("arguments") or []]
            return all(literal(k) for k in kids)
        return False

    for arg in fn.get("arguments") or []:
        if isinstance(arg, dict) and arg.get("name") and not literal(arg.get("expression")):
            raise refuse(f"{fn.get('function_name')}() option {arg['name']!r} that is not a literal", text)


def _nested_query(st: _Statement, fn: dict, views: frozenset[str], depth: int) -> None:
    args = [a for a in fn.get("arguments") or [] if isinstance(a, dict) and not a.get("name")]
    expr = args[0].get("expression") if len(args) == 1 else None
    texts = _strings(expr or {})
    if not expr or expr.get("class") != "CONSTANT" or texts is None or len(texts) != 1:
        raise refuse("query() with SQL that is not a constant string", st.text)
    inner = split(texts[0])
    if len(inner) != 1:
        raise refuse("query() with other than one statement", st.text)
    st.nested.append((expr["literal"], _check_statement(*inner[0], views, depth + 1)))


# ---------------------------------------------------------------- files a statement reads


def inside(path: str, root: str) -> bool:
    """True when the (resolved) path is the (resolved) root or lies under it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_paths(ws: Workspace, read: FileRead, allow_external_read: bool, text: str) -> list[str]:
    """The real files (every symlink resolved) a reference may read, or ReadOnlyError naming what is wrong."""
    root = os.path.realpath(ws.root)
    out: list[str] = []
    for p in read.paths:
        if "://" in p or not p:
            raise refuse(f"the query reads {p!r}: only local files can be read", text)
        full = os.path.expanduser(p)  # not normalised: `link/..` is the link's parent, as the OS resolves it
        pattern = any(c in p for c in GLOB_CHARS) and not os.path.isfile(full)  # an existing file is itself
        if pattern or read.function == "glob":
            if not allow_external_read:
                raise ReadOnlyError(f"refused: the query reads {p!r}, a pattern, outside what it may read (patterns "
                                    f"and glob() are expanded only with the flag); {EXTERNAL_READ_HINT}")
            found = [os.path.realpath(f) for f in sorted(globmod.glob(full, recursive=True))]
            out += [f for f in found if os.path.isfile(f)]
            continue
        real = os.path.realpath(full)
        if not allow_external_read and not inside(real, root):
            raise ReadOnlyError(f"refused: the query reads {p!r}, outside what it may read (the catalog views, and "
                                f"single files inside the workspace {ws.root} named literally, not patterns; "
                                f"{p!r} resolves to {real!r}); {EXTERNAL_READ_HINT}")
        try:
            mode = os.stat(real).st_mode
        except OSError as e:
            raise ValueError(f"the query reads {p!r}, which cannot be opened: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ReadOnlyError(f"refused: the query reads {p!r}, which is not a regular file")
        out.append(real)
    return sorted(dict.fromkeys(out)) if read.function == "glob" else list(dict.fromkeys(out))


def escape_glob(path: str) -> str:
    """A path DuckDB reads as exactly that file: each glob character becomes a one-character class."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _reader_sql(read: FileRead) -> str:
    """The statement that reads a reference's resolved files: the user's reader and options, our paths."""
    files = [escape_glob(f) for f in read.resolved]
    if not read.function:
        return " UNION ALL BY NAME ".join(f"SELECT * FROM {sql_str(f)}" for f in files)
    fn = copy.deepcopy(read.node["function"])
    lit = parser().execute("SELECT json_serialize_sql(?)",
                           ["SELECT " + ("[" + ", ".join(sql_str(f) for f in files) + "]" if len(files) != 1
                                         else sql_str(files[0]))]).fetchone()[0]
    path_expr = json.loads(lit)["statements"][0]["node"]["select_list"][0]
    args = fn.get("arguments") or []
    first = next(i for i, a in enumerate(args) if isinstance(a, dict) and not a.get("name"))
    args[first] = {**args[first], "expression": path_expr}
    return _deserialize_with_from({"type": "TABLE_FUNCTION", "alias": "", "sample": None,
                                   "query_location": read.node.get("query_location", 0),
                                   "query_location_length": 0, "function": fn, "column_name_alias": [],
                                   "with_ordinality": read.node.get("with_ordinality", "WITHOUT_ORDINALITY")})


def _deserialize_with_from(from_table: dict) -> str:
    tmpl = json.loads(parser().execute("SELECT json_serialize_sql('SELECT * FROM range(1)')").fetchone()[0])
    tmpl["statements"][0]["node"]["from_table"] = from_table
    return _deserialize(tmpl)


def _deserialize(tree: dict) -> str:
    out = parser().execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchone()[0]
    if not out:
        raise ValueError("cannot rewrite the statement's file reads")
    return out


def sql_str(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def read_files(read: FileRead, run: Callable[[list[str], str], pa.Table]) -> pa.Table:
    """The table a file reference reads: glob() listed from Python, readers through `run(files, sql)`, which
    runs `sql` on a connection that may open exactly `files`."""
    if read.function == "glob":
        return pa.table({"file": pa.array(read.resolved, pa.string())})
    if not read.resolved:
        raise ValueError(f"{read.function or 'the query'}: no file matches {read.paths!r}")
    return run(read.resolved, _reader_sql(read))


def _rewrite(st: _Statement) -> str:
    """The statement's text with every file reference replaced by its registered table."""
    if st.inner is not None:
        return st.explain + _rewrite(st.inner)
    changed = False
    for literal, inner in st.nested:
        new = _rewrite(inner)
        if new != inner.text:
            literal["text"], changed = new, True
    for read in st.reads:
        node = read.node
        alias = node.get("alias") or ""
        cols = node.get("column_name_alias") or []
        node.clear()
        node.update({"type": "BASE_TABLE", "alias": alias, "sample": None, "query_location": 0,
                     "query_location_length": 0, "schema_name": "", "table_name": read.name,
                     "column_name_alias": cols, "catalog_name": "", "at_clause": None,
                     "qualified_name": {"path": [read.name]}})
        changed = True
    return _deserialize(st.tree) if changed else st.text


def _all_reads(st: _Statement) -> list[FileRead]:
    if st.inner is not None:
        return _all_reads(st.inner)
    return st.reads + [r for _, inner in st.nested for r in _all_reads(inner)]


def plan(ws: Workspace, sql: str, view_names: frozenset[str], *, allow_external_read: bool = False,
         reader: Callable[[list[str], str], pa.Table]) -> Plan:
    """Check a script, read the files it names (through `reader(files, sql)`), and rewrite it to read none."""
    statements = check(sql, view_names)
    reads = [(st, r) for st in statements for r in _all_reads(st)]
    for st, r in reads:  # every path is checked before any file is read
        r.resolved = resolve_paths(ws, r, allow_external_read, st.text)
    out = Plan([])
    for i, (_, r) in enumerate(reads):
        r.name = f"{FILE_TABLE_PREFIX}{i}"
        out.tables[r.name] = read_files(r, reader)
    out.statements = [_rewrite(st) for st in statements]
    return out
