"""A query result (Arrow table) rendered as an aligned text table or a Markdown table, or written as CSV / JSON /
Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

FORMATS = ("table", "csv", "json", "markdown", "parquet")


def printable(text: str) -> str:
    """The text with newlines, tabs, escape sequences and other non-printing characters shown as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def format_table(tbl: pa.Table, max_rows: int = 50) -> str:
    """An aligned plain-text rendering of an Arrow table."""
    cols = tbl.column_names
    shown = tbl.slice(0, max_rows)
    rows = list(zip(*(c.to_pylist() for c in shown.columns), strict=True)) if shown.num_columns else []

    def cell(v: object) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, float):
            return f"{v:.6g}"
        s = printable(str(v))
        return s if len(s) <= 60 else s[:57] + "..."

    body = [[cell(v) for v in r] for r in rows]
    header = [printable(c) for c in cols]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *(line(b) for b in body)]
    more = tbl.num_rows - len(rows)
    out.append(f"({tbl.num_rows} row{'s' if tbl.num_rows != 1 else ''}{f', {more} not shown' if more > 0 else ''})")
    return "\n".join(out)


def format_markdown(tbl: pa.Table, max_rows: int = 50) -> str:
    """A Markdown (pipe) table of an Arrow table: its first `max_rows` rows, `|` in a cell escaped."""
    def cell(v: object) -> str:
        text = "NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else printable(str(v))
        return text.replace("|", "\\|")

    shown = tbl.slice(0, max_rows)
    out = ["| " + " | ".join(cell(c) for c in tbl.column_names) + " |", "|" + "---|" * tbl.num_columns]
    rows = zip(*(c.to_pylist() for c in shown.columns), strict=True) if shown.num_columns else []
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    if tbl.num_rows > shown.num_rows:
        out.append(f"\n({tbl.num_rows} rows, {tbl.num_rows - shown.num_rows} not shown)")
    return "\n".join(out)


def csv_ready(tbl: pa.Table) -> pa.Table:
    """CSV has no lists or structs: such columns (landmarks, embeddings, ...) become JSON text cells."""
    for i, f in enumerate(tbl.schema):
        if pa.types.is_nested(f.type) or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            cells = [None if v is None else json.dumps(v, default=str) for v in tbl.column(i).to_pylist()]
            tbl = tbl.set_column(i, pa.field(f.name, pa.string()), pa.array(cells, pa.string()))
    return tbl


def write_result(tbl: pa.Table, fmt: str, output: Path | None, max_rows: int = 50) -> str | None:
    """Write or render a result in the chosen format; returns text to print (or None)."""
    if fmt == "parquet":
        if output is None:
            raise ValueError("--format parquet needs --output PATH")
        import pyarrow.parquet as pq

        pq.write_table(tbl, output)
        return None
    if fmt == "csv":
        import pyarrow.csv as pcsv

        tbl = csv_ready(tbl)
        if output is not None:
            pcsv.write_csv(tbl, output)
            return None
        sink = pa.BufferOutputStream()
        pcsv.write_csv(tbl, sink)
        return sink.getvalue().to_pybytes().decode()
    if fmt == "json":
        text = json.dumps(tbl.to_pylist(), default=str, indent=1)
    elif fmt == "markdown":
        text = format_markdown(tbl, max_rows)
    else:
        text = format_table(tbl, max_rows)
    if output is not None:
        output.write_text(text + "\n")
        return None
    return text
