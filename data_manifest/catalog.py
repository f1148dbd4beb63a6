"""The DuckDB catalog: `<table>_history` (all rows) and `<table>` (latest per key) views over the manifests.

Two ways in: `refresh(ws)` rewrites the views in `catalog.duckdb` (a short
read-write open, for the DuckDB CLI and other tools), and `connect(ws)` builds
the same views in an in-memory connection from the manifest layout, so
inspection never contends for the file lock with a running flow.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import duckdb
import pyarrow as pa

from data_manifest.schemas import KEYS, SCHEMAS, TABLES
from data_manifest.workspace import Workspace
from pipeline.factors import FACTORS

SQL_DIR = Path(__file__).with_name("sql")


class ReadOnlyError(ValueError):
    """A statement that would change the catalog or write files was refused."""


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        return f"{_duck_type(t.value_type)}[]"
    simple = {pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
              pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}
    if t in simple:
        return simple[t]
    raise TypeError(f"no DuckDB type mapping for {t}")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def history_sql(ws: Workspace, table: str) -> str:
    """SELECT over every committed shard of a table (an empty, typed relation when there is none)."""
    base = ws.manifests / table
    if any(base.glob("run=*/part-*.parquet")):
        glob = _sql_str((base / "run=*" / "part-*.parquet").as_posix())
        return f"SELECT * FROM read_parquet({glob}, union_by_name = true, hive_partitioning = false)"
    cols = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in SCHEMAS[table])
    return f"SELECT {cols} WHERE false"


def latest_sql(table: str) -> str:
    keys = ", ".join(KEYS[table])
    return (f"SELECT * FROM {table}_history "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY created_at DESC, run_id DESC) = 1")


def labels_sql() -> str:
    """One wide row per sample: sample info, alignment, each factor's value/class/index, anchor."""
    pivots = []
    for f in FACTORS:
        pivots += [f"max(value) FILTER (WHERE factor = '{f}') AS {f}_value",
                   f"max(class_name) FILTER (WHERE factor = '{f}') AS {f}_class",
                   f"max(class_index) FILTER (WHERE factor = '{f}') AS {f}_index",
                   f"max(status) FILTER (WHERE factor = '{f}') AS {f}_status"]
    return (
        "SELECT s.sample_id, s.dataset, s.source_kind, s.source, s.identity, s.identity_name, "
        "s.status AS sample_status, s.error AS sample_error, "
        "fc.status AS face_status, fc.error AS face_error, fc.n_faces, fc.crop_file, fc.crop_index, "
        + ", ".join(f"fx.{f}_value, fx.{f}_class, fx.{f}_index, fx.{f}_status" for f in FACTORS)
        + ", a.anchor, a.raw AS anchor_raw, a.model_id AS anchor_model "
        "FROM samples s LEFT JOIN faces fc USING (sample_id) "
        f"LEFT JOIN (SELECT sample_id, {', '.join(pivots)} FROM factors GROUP BY sample_id) fx USING (sample_id) "
        "LEFT JOIN anchors a USING (sample_id)"
    )


def view_statements(ws: Workspace) -> list[str]:
    """CREATE OR REPLACE VIEW statements for every table, its history and the `labels` view."""
    stmts = []
    for t in TABLES:
        stmts.append(f"CREATE OR REPLACE VIEW {t}_history AS {history_sql(ws, t)}")
        stmts.append(f"CREATE OR REPLACE VIEW {t} AS {latest_sql(t)}")
    stmts.append(f"CREATE OR REPLACE VIEW labels AS {labels_sql()}")
    return stmts


def connect(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the catalog views built from the manifest layout."""
    con = duckdb.connect(":memory:")
    for s in view_statements(ws):
        con.execute(s)
    return con


def refresh(ws: Workspace, retries: int = 20, wait_s: float = 0.25) -> bool:
    """Rewrite the views in catalog.duckdb; returns False (with a warning) if the file stays locked."""
    stmts = view_statements(ws)
    for attempt in range(retries):
        try:
            with duckdb.connect(str(ws.catalog_path)) as con:
                for s in stmts:
                    con.execute(s)
            return True
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or attempt == retries - 1:
                warnings.warn(f"catalog {ws.catalog_path} not refreshed: {e}", stacklevel=2)
                return False
            time.sleep(wait_s)
    return False


_ALLOWED = {duckdb.StatementType.SELECT}
_EXPLAIN_RE = re.compile(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", re.IGNORECASE)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    """Split a script into statements and refuse any that is not a query."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise ValueError(f"cannot parse SQL: {e}") from e
    if not statements:
        raise ValueError("no SQL statement given")
    out = []
    for st in statements:
        text = st.query
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = _EXPLAIN_RE.sub("", text, count=1)
            inner_types = [s.type for s in con.extract_statements(inner)]
            if inner_types and all(t in _ALLOWED for t in inner_types):
                out.append(text)
                continue
        if kind not in _ALLOWED:
            name = str(kind).split(".")[-1]
            raise ReadOnlyError(f"refused: {name} statement ({text.strip()[:60]!r}); "
                                "the catalog is read-only here, only queries (SELECT, WITH, "
                                "DESCRIBE, SHOW, EXPLAIN) are allowed")
        out.append(text)
    return out


def query(ws: Workspace, sql: str, params: list | dict | None = None) -> pa.Table:
    """Run read-only SQL against the catalog views; the result of the last statement as Arrow."""
    con = connect(ws)
    try:
        statements = check_read_only(con, sql)
        for s in statements[:-1]:
            con.execute(s)
        return con.sql(statements[-1], params=params).to_arrow_table()
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
