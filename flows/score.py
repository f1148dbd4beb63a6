"""`fiqa score`: score any SQL-selected set of samples with a CLIB-FIQA checkpoint into the `scores` table.

Every selected sample gets a row: a quality score with its 5-level and factor
distributions, or, for a sample without a usable aligned crop, a row with a
status and the reason. Shards commit atomically, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import ShardWriter, Workspace, catalog
from flows import runtime
from flows.arguments import add_sql_limits

DEFAULT_METHOD = "clib-fiqa"
SELECT_SQL = runtime.flow_sql("score_selection")
_LOCK = threading.Lock()


def selection_sql(where: str | None = None, query: str | None = None) -> str:
    """SQL giving (sample_id, crop_file, crop_index, face_status, face_error) of the samples to score."""
    return catalog.selection_sql(SELECT_SQL, where, query)


@dataclass(frozen=True)
class ScoreOptions(runtime.RunOptions):
    """Everything one `score` run needs, validated once here."""

    checkpoint: str = ""  # a CLIB-FIQA checkpoint (.pt), stored as an absolute path
    where: str | None = None  # SQL condition over the labels view
    query: str | None = None  # or a full selection query
    method: str = DEFAULT_METHOD  # method name in the scores table
    device: str = "auto"
    batch_size: int = 64
    shard_size: int = 4096  # samples per shard
    workers: int | None = 1  # one scorer per process: shards take turns on it

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.checkpoint:
            raise ValueError("score needs --checkpoint PATH (a CLIB-FIQA checkpoint)")
        ckpt = Path(self.checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        object.__setattr__(self, "checkpoint", str(ckpt))
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.method.strip():
            raise ValueError("--method must not be empty")
        self.selection_sql()  # --where with --query, or an empty --where, fails here

    def selection_sql(self) -> str:
        return selection_sql(self.where, self.query)


@lru_cache(maxsize=4)
def _scorer(checkpoint: str, mtime_ns: int, device: str, batch_size: int) -> Any:
    from models.scorer import load

    return load(checkpoint, device=device, batch_size=batch_size)


def score_rows(ws: Workspace, items: list[dict[str, Any]], checkpoint: str, *, method: str, device: str,
               batch_size: int) -> list[dict[str, Any]]:
    """Score one shard of selected samples; one `scores` row per sample."""
    from data_manifest.crops import PackReader

    model_id = f"{Path(checkpoint).parent.name}/{Path(checkpoint).name}"
    reader = PackReader(ws)
    rows: list[dict[str, Any]] = []
    good, crops = [], []
    for it in items:
        base = {"sample_id": it["sample_id"], "method": method, "model_id": model_id}
        if it.get("crop_file") is None or it.get("crop_index") is None:
            reason = it.get("face_error") or f"no aligned crop (face status: {it.get('face_status') or 'not aligned'})"
            rows.append({**base, "status": "skipped", "error": reason})
            continue
        try:
            crops.append(reader.read(it["crop_file"], int(it["crop_index"])))
            good.append(base)
        except (OSError, ValueError, IndexError) as e:
            rows.append({**base, "status": "error", "error": f"cannot read crop: {e}"})
    if good:
        with _LOCK:  # one model per process; batches from concurrent shards run one at a time
            scorer = _scorer(checkpoint, Path(checkpoint).stat().st_mtime_ns, device, batch_size)
            res = scorer.score(np.stack(crops))
        for i, base in enumerate(good):
            rows.append({**base, "quality": float(res.score[i]), "quality_probs": res.quality[i].tolist(),
                         "marginals": json.dumps({f: v[i].round(6).tolist() for f, v in res.factors.items()}),
                         "status": "ok", "error": None})
    return rows


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard(ws_root: str, run_id: str, shard: str, items: pa.Table, *, checkpoint: str, method: str,
                device: str, batch_size: int) -> dict[str, int]:
    """Score one named shard and write its `scores` file (the flow commits it)."""
    ws = Workspace(ws_root)
    rows = score_rows(ws, items.to_pylist(), checkpoint, method=method, device=device, batch_size=batch_size)
    ShardWriter(ws, "scores", run_id).write(shard, rows)
    return {"rows": len(rows), "ok": sum(r["status"] == "ok" for r in rows)}


@flow(name="score")
def score_run(opts: ScoreOptions) -> dict[str, Any]:
    """Select (frozen with the run), shard, score each shard, write `scores` rows."""
    ws = Workspace(opts.workspace)
    sql = opts.selection_sql()
    params = {"checkpoint": opts.checkpoint, "query": sql, "method": opts.method, "shard_size": opts.shard_size}
    runtime.check_resume(ws, opts.run_id, params)
    with runtime.tracked_run(ws, "score", {**opts.recorded(), **params}, opts.run_id) as state:
        rid = state["run_id"]
        selected = runtime.freeze_selection(ws, rid, sql)
        outcomes = runtime.run_shards(score_shard, runtime.table_shards(selected, opts.shard_size), ws=ws, run_id=rid,
                                    desc="score", progress=opts.progress, checkpoint=opts.checkpoint,
                                    method=opts.method, device=opts.device, batch_size=opts.batch_size)
        state["counts"] = runtime.summarize(outcomes)
        runtime.check_shard_failures(outcomes, rid)
        return {"run_id": rid, "selected": selected.num_rows, **state["counts"]}


def run(opts: ScoreOptions) -> dict[str, Any]:
    """Load the checkpoint (a bad one fails before Prefect starts), then run the flow on its task runner."""
    from models.train import load_checkpoint

    load_checkpoint(opts.checkpoint)
    return runtime.with_runner(score_run, opts)(opts)


def score_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `score` flow from keyword options (the fields of ScoreOptions)."""
    return run(ScoreOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    runtime.add_common_args(p)
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
    out = run(runtime.options_from_args(ScoreOptions, args, workers=args.workers or 1))
    print(json.dumps(out, indent=2, default=str))
    return 0


main = runtime.main_for(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
