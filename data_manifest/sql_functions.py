"""Which DuckDB functions user SQL may call: a positive allow-list, and the reviewed exclusions.

A function a user query calls must be named here: the table functions one by one, the scalar,
aggregate, window and macro functions in `sql/allowed_functions.txt`, which is written by
`python -m data_manifest.sql_functions --write` from `duckdb_functions()` minus `EXCLUDED`.
A function DuckDB adds in a later release is therefore refused until someone classifies it:
`tests/data_manifest/test_sql_security.py` fails while any function of the installed DuckDB is neither allowed
nor excluded, and again when the file differs from what the generator writes.

File readers (`read_parquet`, `read_text`, `glob`, ...) are not run on the query connection at
all: `data_manifest.sql_guard` resolves their literal paths, reads them on a separate connection
that may open exactly those files, and hands the result to the query as a registered table.
"""

from __future__ import annotations

import argparse
import re
from functools import cache
from pathlib import Path

import duckdb

ALLOWED_FILE = Path(__file__).with_name("sql") / "allowed_functions.txt"

# Table functions a query may call on the query connection: generators, JSON walks and catalog introspection.
TABLE_FUNCTIONS: frozenset[str] = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "duckdb_columns", "duckdb_constraints", "duckdb_functions", "duckdb_keywords", "duckdb_schemas",
    "duckdb_tables", "duckdb_types", "duckdb_views", "pragma_table_info", "pragma_version", "test_all_types",
    "query",  # its SQL must be a constant string, checked as a statement of its own
})

# Table functions that read files: their literal paths are resolved and read outside the query connection.
FILE_READERS: frozenset[str] = frozenset({
    "read_parquet", "parquet_scan", "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_ndjson",
    "read_ndjson_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson_objects", "read_text",
    "read_blob", "parquet_metadata", "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata",
    "sniff_csv", "glob",
})

# Scalar, aggregate and macro functions left out of the allow-list, with the reason.
EXCLUDED: dict[str, str] = {
    "__internal_json_copy_to_json": "an internal of COPY ... TO (FORMAT json)",
    "__internal_json_copy_to_geojson": "an internal of COPY ... TO (FORMAT geojson)",
    "json_copy_strftime_if_date": "an internal of COPY ... TO (FORMAT json)",
    "json_copy_strftime_if_timestamp": "an internal of COPY ... TO (FORMAT json)",
    "json_serialize_sql": "parses SQL given as a string: SQL-in-strings is not for user queries",
    "json_deserialize_sql": "builds SQL text from a serialised tree",
    "json_serialize_plan": "binds (and so may open the files of) SQL given as a string",
    "json_execute_serialized_sql": "runs serialised SQL that no check sees",
    "write_log": "writes to DuckDB's log",
    "parse_duckdb_log_message": "reads DuckDB's log",
    "sleep_ms": "holds a query without work",
    "pg_sleep": "holds a query without work",
    "nextval": "changes a sequence",
    "setseed": "changes the connection's random state",
    "current_setting": "reads the connection's settings (file grants, limits)",
    "getvariable": "reads the connection's variables",
    "has_database_privilege": "catalog privileges, not data",
    "variant_to_parquet_variant": "an internal of COPY ... TO (FORMAT parquet)",
}
_EXCLUDED_PATTERN = re.compile(r"^__internal|copy_to|_copy_")  # internals of COPY and friends, whatever their name


def duckdb_function_names() -> dict[str, set[str]]:
    """function name -> its kinds ('scalar', 'aggregate', 'table', ...) in the installed DuckDB."""
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute("SELECT DISTINCT lower(function_name), function_type FROM duckdb_functions()").fetchall()
    finally:
        con.close()
    out: dict[str, set[str]] = {}
    for name, kind in rows:
        out.setdefault(name, set()).add(kind)
    return out


def generated_allow_list() -> list[str]:
    """Every scalar, aggregate, window and macro function of the installed DuckDB that is not excluded."""
    names = [n for n, kinds in duckdb_function_names().items()
             if kinds & {"scalar", "aggregate", "window", "macro"}
             and n not in EXCLUDED and not _EXCLUDED_PATTERN.search(n)
             and n not in FILE_READERS and n not in TABLE_FUNCTIONS]
    return sorted(names)


@cache
def allowed_functions() -> frozenset[str]:
    """The scalar, aggregate, window and macro functions a query may call (sql/allowed_functions.txt)."""
    lines = ALLOWED_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(x for x in lines if x and not x.startswith("#"))


def unclassified() -> list[str]:
    """Functions of the installed DuckDB that are neither allowed nor excluded (a newer DuckDB adds some)."""
    allowed = allowed_functions()
    known = allowed | TABLE_FUNCTIONS | FILE_READERS | set(EXCLUDED)
    out = []
    for name, kinds in duckdb_function_names().items():
        if name in known or _EXCLUDED_PATTERN.search(name):
            continue
        if kinds & {"scalar", "aggregate", "window", "macro"}:
            out.append(name)
    return sorted(out)


def write_allow_list() -> int:
    names = generated_allow_list()
    header = ("# Scalar, aggregate, window and macro functions user SQL may call (one per line).\n"
              f"# Written by `python -m data_manifest.sql_functions --write` from DuckDB {duckdb.__version__}'s\n"
              "# duckdb_functions(), minus data_manifest/sql_functions.EXCLUDED.\n")
    ALLOWED_FILE.write_text(header + "\n".join(names) + "\n", encoding="utf-8")
    return len(names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_manifest.sql_functions",
                                description="Check or rewrite the allow-list of functions user SQL may call.")
    p.add_argument("--write", action="store_true", help=f"rewrite {ALLOWED_FILE.name} from the installed DuckDB")
    args = p.parse_args(argv)
    if args.write:
        print(f"{write_allow_list()} functions written to {ALLOWED_FILE}")
        return 0
    missing = unclassified()
    for name in missing:
        print(f"unclassified: {name}")
    print(f"{len(allowed_functions())} allowed, {len(EXCLUDED)} excluded, {len(missing)} unclassified "
          f"(DuckDB {duckdb.__version__})")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
