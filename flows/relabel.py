"""`fiqa relabel`: re-run chosen labellers on a SQL-selected subset, as a new run.

The documented way to update labels after a labeller changes (new version,
new thresholds, another labeller): the new rows land under a new run id, the
latest-wins views move for exactly the selected samples, and `<table>_history`
keeps the old rows with their labeller and version. Stages other than `align`
reuse the crops of the latest alignment. Moving a workspace from the WIDER
attribute CNN to the real-face labellers (or back) is one call:
`fiqa relabel --where "face_status = 'ok'" --stages attributes [--attributes-checkpoint CKPT]`;
one factor alone: `--stages lighting`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows import label as L
from flows import runtime


def _relabel_flow():
    from prefect import flow

    @flow(name="relabel")
    def relabel(where: str, stages: list[str] | str = "blur,pose", options: dict[str, Any] | None = None,
                workspace: str | None = None, run_id: str | None = None, shard_size: int = 1000,
                progress: bool | None = None) -> dict[str, Any]:
        """Re-label the samples matching `where` (SQL on the `labels` view) with the given stages."""
        if not where or not where.strip():
            raise ValueError("relabel needs a --where condition (use 'fiqa label' to label everything)")
        return L.run_label(stages, where, options=L.options_from(options), workspace=workspace, run_id=run_id,
                           shard_size=shard_size, progress=progress, flow_name="relabel")

    return relabel


relabel = _relabel_flow()


def configure_parser(p: argparse.ArgumentParser) -> None:
    L.configure_parser(p)
    for action in p._actions:
        if action.dest == "where":
            action.required = True
            action.help = "SQL condition on the `labels` view choosing the samples to re-label (required)"
        if action.dest == "stages":
            action.default = "blur,pose"


def run_cli(args: argparse.Namespace) -> int:
    try:
        stages = L.parse_stages(args.stages)
        options = L.options_from_args(args)
        flow_obj = runtime.with_runner(relabel, args)
    except (ValueError, RuntimeError) as e:
        print(f"fiqa relabel: error: {e}", file=sys.stderr)
        return 2
    try:
        result = flow_obj(where=args.where, stages=stages, options=options.to_params(), workspace=args.workspace,
                          run_id=args.run_id, shard_size=args.shard_size,
                          progress=False if args.no_progress else None)
    except runtime.ShardFailures as e:
        print(f"fiqa relabel: error: {e}", file=sys.stderr)
        return 1
    print(f"run {result['run_id']}: re-labelled {result['selected']} samples with {','.join(result['stages'])}")
    print(json.dumps({"counts": result["counts"], "seconds": result["seconds"]}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(runtime.main_for("flows.relabel")())
