"""`fiqa score`: score any SQL-selected set of samples with a CLIB-FIQA checkpoint into the `scores` table.

Every selected sample gets a row: a quality score with its 5-level and factor
distributions, or, for a sample without a usable aligned crop, a row with a
status and the reason. Shards commit atomically, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import Workspace, catalog, commits, selection
from flows import command, runners, runtime
from flows.arguments import add_sql_limits
from pipeline import scoring

DEFAULT_METHOD = "clib-fiqa"
SELECT_SQL = catalog.bundled_sql("flows/score_selection")


def selection_sql(where: str | None = None, query: str | None = None) -> str:
    """SQL giving (sample_id, crop_file, crop_index, face_status, face_error) of the samples to score."""
    return catalog.selection_sql(SELECT_SQL, where, query)


@dataclass(frozen=True)
class ScoreOptions(command.RunOptions):
    """Everything one `score` run needs, validated once here."""

    checkpoint: str = ""  # a CLIB-FIQA checkpoint (.pt), stored as an absolute path
    where: str | None = None  # SQL condition over the labels view
    query: str | None = None  # or a full selection query
    method: str = DEFAULT_METHOD  # method name in the scores table
    device: str = "auto"
    batch_size: int = 64
    shard_size: int = 4096  # samples per shard
    workers: int | None = 1  # one scorer per process: shards take turns on it

    AT_LEAST_ONE = ("batch_size", "shard_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.checkpoint:
            raise ValueError("score needs --checkpoint PATH (a CLIB-FIQA checkpoint)")
        ckpt = Path(self.checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        object.__setattr__(self, "checkpoint", str(ckpt))
        if not self.method.strip():
            raise ValueError("--method must not be empty")
        self.selection_sql()  # --where with --query, or an empty --where, fails here

    def selection_sql(self) -> str:
        return selection_sql(self.where, self.query)


@task(name="score-shard", cache_policy=NO_CACHE)
@commits.receipted
def score_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, selection_file: str, checkpoint: str,
                method: str, device: str, batch_size: int) -> dict[str, int]:
    """Score one row group of the frozen selection and write its `scores` file (the runtime commits it)."""
    items = selection.task_shard(ws_root, selection_file, row_group).to_pylist()
    return scoring.score_shard(Workspace(ws_root), run_id, shard, items, checkpoint=checkpoint, method=method,
                               device=device, batch_size=batch_size)


@flow(name="score")
def score_run(opts: ScoreOptions) -> dict[str, Any]:
    """Select (frozen with the run), shard, score each shard, write `scores` rows."""
    ws = Workspace(opts.workspace)
    sql = opts.selection_sql()
    params = {"checkpoint": opts.checkpoint, "query": sql, "method": opts.method, "shard_size": opts.shard_size}
    with runtime.tracked_run(ws, "score", {**opts.recorded(), **params}, opts.run_id, decisive=params) as state:
        rid = state["run_id"]
        frozen = selection.freeze_selection(ws, rid, sql, opts.shard_size)
        outcomes = runtime.run_shards(score_shard, selection.selection_shards(frozen), ws=ws, run_id=rid,
                                      desc="score", progress=opts.progress, selection_file=ws.share(frozen),
                                      checkpoint=ws.share(opts.checkpoint), method=opts.method, device=opts.device,
                                      batch_size=opts.batch_size)
        state["counts"] = runtime.summarize(outcomes)
        runtime.check_shard_failures(outcomes, rid)
        return {"run_id": rid, "selected": selection.selected_rows(frozen), **state["counts"]}


def run(opts: ScoreOptions) -> dict[str, Any]:
    """Load the checkpoint (a bad one fails before Prefect starts), then run the flow on its task runner."""
    from models.train import load_checkpoint

    load_checkpoint(opts.checkpoint)
    return runners.with_runner(score_run, opts)(opts)


def score_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `score` flow from keyword options (the fields of ScoreOptions)."""
    return run(ScoreOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    command.add_common_args(p)
    p.add_argument("--checkpoint", required=True, help="a CLIB-FIQA checkpoint (.pt)")
    p.add_argument("--where", default=None, help="SQL filter over the labels view, e.g. \"dataset = 'lfw'\"")
    add_sql_limits(p)
    p.add_argument("--query", default=None,
                   help="SQL returning sample_id, crop_file, crop_index (face_status, face_error optional)")
    p.add_argument("--method", default=DEFAULT_METHOD, help="method name in the scores table")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096)


def run_cli(args: argparse.Namespace) -> int:
    out = run(command.options_from_args(ScoreOptions, args, workers=args.workers or 1))
    print(json.dumps(out, indent=2, default=str))
    return 0


main = command.main_for(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
