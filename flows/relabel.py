"""`fiqa relabel`: re-run chosen labellers on a SQL-selected subset, as a new run.

The new rows land under a new run id, the latest-wins views move for exactly the selected samples, and
`<table>_history` keeps the old rows. Stages other than `align` reuse the latest alignment's crops, e.g.
`fiqa relabel --where "face_status = 'ok'" --stages lighting`. See docs/labelling.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from prefect import flow

from data_manifest import catalog
from flows import command
from flows import label as L
from pipeline.deployments import RELABEL_STAGES
from pipeline.labellers.registry import LabelOptions

DEFAULT_STAGES = RELABEL_STAGES
LABELLER_FIELDS = tuple(f.name for f in dataclasses.fields(LabelOptions) if f.name != "extra")


@flow(name="relabel")
def relabel_run(opts: L.LabelRunOptions) -> dict[str, Any]:
    """Re-label the samples matching `opts.where` (SQL on the `labels` view) with the given stages."""
    return L.run_label(opts, "relabel")


def relabel_options(**kwargs: Any) -> L.LabelRunOptions:
    """Label-run options that must name a subset: relabel never re-labels everything by accident."""
    opts = L.LabelRunOptions(**{"stages": DEFAULT_STAGES, **kwargs})
    if not opts.where:
        raise ValueError("relabel needs a --where condition (use 'fiqa label' to label everything)")
    return opts


def checked_options(params: dict[str, Any]) -> L.LabelRunOptions:
    """A relabel run's options from flat parameters (a deployment's, None: the default), checked as `fiqa relabel`
    checks them: the condition by the SQL guard, the task runner, every stage built."""
    labeller = {k: v for k, v in params.items() if k in LABELLER_FIELDS and v is not None}
    opts = relabel_options(**{k: v for k, v in params.items() if k not in LABELLER_FIELDS and v is not None},
                           options=labeller)
    catalog.check_where(opts.where)
    opts.check()
    return opts


def relabel(**kwargs: Any) -> dict[str, Any]:
    """Run the `relabel` flow from keyword options (the fields of flows.label.LabelRunOptions)."""
    return L.run(relabel_options(**kwargs), relabel_run)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--where", required=True,
                   help="SQL condition on the `labels` view choosing the samples to re-label (required)")
    L.configure_parser(p, stages_default=DEFAULT_STAGES, where=False)


def run_cli(args: argparse.Namespace) -> int:
    result = L.run(L.run_options(args), relabel_run)  # --where is required by the parser
    print(f"run {result['run_id']}: re-labelled {result['selected']} samples with {','.join(result['stages'])}")
    print(json.dumps({"counts": result["counts"], "seconds": result["seconds"]}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(command.main_for("flows.relabel")())
