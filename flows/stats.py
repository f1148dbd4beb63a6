"""`fiqa stats`: factor distributions, cross-tabs, per-dataset/per-run breakdowns and anchor histograms.

Runs the bundled queries in data_manifest/sql/ (the same files work in the
DuckDB CLI against catalog.duckdb) and draws PNG plots (:mod:`pipeline.reports.stats`). Starts no flow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_manifest import Workspace
from pipeline.reports.query_results import format_table
from pipeline.reports.stats import QUERIES, collect, plot


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--query", action="append", choices=QUERIES + ("joint_factors",),
                   help=f"only these bundled queries (repeatable; default: {', '.join(QUERIES)}; "
                        "joint_factors, the long table of every factor combination, only when asked)")
    p.add_argument("--plots", type=Path, default=None,
                   help="directory for PNG plots (default: <workspace>/reports/stats)")
    p.add_argument("--no-plots", action="store_true", help="print tables only")
    p.add_argument("--max-rows", type=int, default=40)


def run_cli(args: argparse.Namespace) -> int:
    ws = Workspace(args.workspace, create=False)
    if not ws.manifests.is_dir():
        raise FileNotFoundError(f"no manifests in workspace {ws.location} (run 'fiqa ingest' or 'fiqa demo' first)")
    names = tuple(args.query) if args.query else QUERIES
    results = collect(ws, names)
    for name, tbl in results.items():
        print(f"\n== {name} ==")
        print(format_table(tbl, args.max_rows))
    if not args.no_plots:
        out = args.plots or ws.reports / "stats"
        for p in plot(results, out):
            print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    from flows.command import main_for

    raise SystemExit(main_for("flows.stats")())
