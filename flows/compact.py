"""`fiqa compact`: rebuild the snapshots of the latest views from every shard of a workspace.

Flows fold their new shards into the snapshots when they finish, so this is
for a workspace written before snapshots existed, by another tool that follows
the manifest layout, or after shards were changed by hand. Starts no flow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from data_manifest import Workspace, catalog, snapshots


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--json", action="store_true", help="print what was folded as one JSON object")


def compact(ws: Workspace) -> dict:
    """Rebuild every snapshot from all shards there are; what each table got, and the seconds it took. In a
    store's workspace, also commit a checkpoint marker: a new client then reads it instead of every marker."""
    t0 = time.perf_counter()
    folds: list[snapshots.FoldReport] = []
    if not catalog.refresh(ws, rebuild=True, folds=folds):
        raise RuntimeError(f"catalog {ws.catalog_path} is locked by another process; try again when it is free")
    marker = {"commits": ws.store.checkpoint(ws.root)} if ws.store is not None else {}
    return {"workspace": ws.location, "seconds": round(time.perf_counter() - t0, 3), **folds[-1].as_dict(), **marker}


def run_cli(args: argparse.Namespace) -> int:
    ws = Workspace(args.workspace, create=False)
    if not ws.manifests.is_dir():
        raise ValueError(f"{ws.root} is not a workspace: it has no manifests/ directory")
    out = compact(ws)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"compacted {ws.root} in {out['seconds']} s", file=sys.stdout)
    if "commits" in out:
        print(f"  commit checkpoint {out['commits']['checkpoint']}: {out['commits']['files']} files, stands for "
              f"{out['commits']['markers_covered']} markers")
    for table, info in out.get("tables", {}).items():
        if "shards" in info:
            print(f"  {table:<8} {info['rows']} latest rows from {info['shards']} shards")
        elif "samples" in info:
            print(f"  {table:<8} {info['samples']} samples")
        else:
            print(f"  {table} recounted ({info['counted_rows']} rows)")
    return 0
