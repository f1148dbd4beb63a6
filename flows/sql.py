"""`fiqa sql`: read-only SQL over the catalog views, printed as a table or written as CSV/JSON/Parquet; with no
query, the interactive shell of data_manifest/shell.py on one held connection.

The query runs on a connection with no file access: it reads the catalog views,
and the workspace files it names literally are read for it by the checks (see
docs/architecture.md). It runs under a time and a memory limit. A script of
several statements returns the last statement's result.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

import duckdb

from data_manifest import Workspace, catalog, shell
from flows.arguments import add_sql_limits, int_at_least
from pipeline.reports.query_results import FORMATS, write_result

MAX_SQL_FILE = 1 << 20  # bytes of a --file script


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="?", help="SQL text (or use --file; neither: an interactive shell)")
    p.add_argument("--file", type=Path, help="read the SQL from this file")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--output", type=Path, help="write the result here (required for parquet)")
    p.add_argument("--max-rows", type=int_at_least(0), default=50, help="rows shown in table format (default 50)")
    p.add_argument("--allow-external-read", action="store_true",
                   help="also let the query read files outside the workspace that it names literally "
                        "(writing stays impossible)")
    add_sql_limits(p, prefix="")
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")


def read_sql_file(path: Path, limit: int = MAX_SQL_FILE) -> str:
    """The text of a --file script: a regular file of at most `limit` bytes, UTF-8."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"--file {path} is not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"cannot read SQL file {path}: {e.strerror or e}") from e
    if len(data) > limit:
        raise ValueError(f"--file {path} is larger than {limit} bytes; a SQL script is expected")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--file {path} is not UTF-8 text: {e}") from e


def print_quietly(text: str) -> None:
    """Print; a reader that closed the pipe (`| head`) ends the output quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit flush must not fail again


def run_cli(args: argparse.Namespace) -> int:
    if args.query is not None and args.file is not None:
        raise ValueError("give either a SQL string or --file PATH, not both (neither: the interactive shell)")
    ws = Workspace(args.workspace, create=False)
    if not ws.manifests.is_dir():
        raise FileNotFoundError(f"no manifests in workspace {ws.location} (run 'fiqa ingest' or 'fiqa demo' first)")
    if args.query is None and args.file is None:  # the interactive shell (data_manifest/shell.py)
        if args.output is not None:
            raise ValueError("--output needs a query (or --file); the shell prints its results")
        return shell.run(ws, lambda tbl, fmt: write_result(tbl, fmt, None, args.max_rows),
                         [f for f in FORMATS if f != "parquet"],
                         mode=args.format, allow_external_read=args.allow_external_read, timeout_s=args.timeout,
                         memory=args.memory)
    sql = read_sql_file(args.file) if args.file is not None else args.query
    if args.output is not None:
        ws.check_output(args.output, "--output")
    try:
        tbl = catalog.query(ws, sql, allow_external_read=args.allow_external_read, timeout_s=args.timeout,
                            memory=args.memory)
    except duckdb.Error as e:  # SQL errors: the message, not a traceback
        raise ValueError(str(e)) from e
    try:
        text = write_result(tbl, args.format, args.output, args.max_rows)
    except OSError as e:
        raise OSError(f"cannot write {args.output}: {e}") from e
    if text is not None:
        print_quietly(text)
    return 0


if __name__ == "__main__":
    from flows.command import main_for

    raise SystemExit(main_for("flows.sql")())
