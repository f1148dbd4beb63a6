"""`fiqa gallery`: the browsable HTML page of face crops per factor class, quality decile and run.

Builds pipeline/gallery.py's one self-contained page from the catalog (read-only SQL, the same
`--where` as every command). Runs no flow and never starts Prefect; inside a flow (the demo)
`publish_gallery` also leaves a markdown artifact linking the page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import duckdb

from data_manifest import Workspace
from data_manifest.gallery import PICKS, GalleryOptions, write_gallery
from flows.arguments import add_sql_limits, int_at_least


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--where", default=None, help="SQL condition on the labels view selecting the samples shown")
    add_sql_limits(p)
    p.add_argument("--per-class", type=int_at_least(1), default=12,
                   help="crops per class grid and per decile (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pick of crops (default 0)")
    p.add_argument("--pick", choices=PICKS, default="random",
                   help="random crops per class (default), or those nearest the class thresholds")
    p.add_argument("--output", type=Path, default=None,
                   help="HTML file to write (default: <workspace>/reports/gallery.html)")


def publish_gallery(path: Path) -> None:
    """Inside a Prefect flow run, publish a markdown artifact pointing at the page (never fails the run)."""
    from flows.bookkeeping import publish_artifacts

    md = (f"## Gallery\n\nFace crops per factor class, quality decile and run: "
          f"[{path.name}]({path.as_uri()})\n\n`{path}` (one self-contained HTML file; open it from disk)\n")
    publish_artifacts("browsable gallery of the labels", markdown={"gallery": md})


def run_cli(args: argparse.Namespace) -> int:
    ws = Workspace(args.workspace, create=False)
    opts = GalleryOptions(where=args.where, per_class=args.per_class, seed=args.seed, pick=args.pick)
    try:
        path = write_gallery(ws, args.output, opts)
    except duckdb.Error as e:  # a bad --where: the message, not a traceback
        raise ValueError(f"--where {args.where!r}: {str(e).splitlines()[0]}") from e
    print(f"gallery: {path}")
    return 0


if __name__ == "__main__":
    from flows.command import main_for

    raise SystemExit(main_for("flows.gallery")())
