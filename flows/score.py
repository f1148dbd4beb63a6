"""`fiqa score`: score any SQL-selected set of samples with a CLIB-FIQA checkpoint into the `scores` table.

Every selected sample gets a row: a quality score with its 5-level and factor
distributions, or, for a sample without a usable aligned crop, a row with a
status and the reason. Shards commit atomically, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest import ShardWriter, Workspace, catalog, runs
from flows import runtime

DEFAULT_METHOD = "clib-fiqa"
SELECT_SQL = """
SELECT s.sample_id, fc.crop_file, fc.crop_index, fc.status AS face_status, fc.error AS face_error
FROM samples s LEFT JOIN faces fc USING (sample_id)
"""
_LOCK = threading.Lock()


def selection_sql(where: str | None = None, query: str | None = None) -> str:
    """SQL giving (sample_id, crop_file, crop_index, face_status, face_error) of the samples to score."""
    return catalog.selection_sql(SELECT_SQL, where, query)


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


def _score_impl(workspace: str | None, checkpoint: str, where: str | None, query: str | None, method: str,
                device: str, batch_size: int, shard_size: int, run_id: str | None, runner: str,
                workers: int | None) -> dict[str, Any]:
    from prefect import task

    from models.train import load_checkpoint

    ws = Workspace(workspace)
    ckpt_path = str(Path(checkpoint).resolve())
    load_checkpoint(ckpt_path)  # a bad checkpoint fails before any work starts
    sql = selection_sql(where, query)
    try:
        items = catalog.query(ws, sql).to_pylist()
    except Exception as e:
        raise ValueError(f"selection query failed: {e}\nSQL: {sql}") from e
    if items and "sample_id" not in items[0]:
        raise ValueError("the selection query must return a sample_id column")

    @task(name="score-shard")
    def score_shard(ws_root: str, rid: str, shard: str, shard_items: list[dict[str, Any]]) -> dict[str, int]:
        w = Workspace(ws_root)
        rows = score_rows(w, shard_items, ckpt_path, method=method, device=device, batch_size=batch_size)
        ShardWriter(w, "scores", rid).write(shard, rows)
        counts = {"rows": len(rows), "ok": sum(r["status"] == "ok" for r in rows)}
        runs.mark_shard_done(w, rid, shard, counts)
        return counts

    params = {"checkpoint": ckpt_path, "query": sql, "method": method, "shard_size": shard_size}
    with runtime.tracked_run(ws, "score", params, run_id) as state:
        rid = state["run_id"]
        outcomes = runtime.run_shards(score_shard, runtime.chunks(items, shard_size), ws=ws, run_id=rid,
                                      desc="score")
        state["counts"] = runtime.summarize(outcomes)
        runtime.check_shard_failures(outcomes, rid)
        return {"run_id": rid, "selected": len(items), **state["counts"]}


def score_flow(workspace: str | None = None, checkpoint: str = "", where: str | None = None,
               query: str | None = None, method: str = DEFAULT_METHOD, device: str = "auto", batch_size: int = 64,
               shard_size: int = 4096, run_id: str | None = None, runner: str = "threads",
               workers: int | None = 1) -> dict[str, Any]:
    """Run the `score` Prefect flow; returns the run id and counts."""
    from prefect import flow

    f = flow(name="score")(_score_impl).with_options(
        task_runner=runtime.make_task_runner(runner, workers))
    return f(workspace, checkpoint, where, query, method, device, batch_size, shard_size, run_id, runner, workers)


def configure_parser(p: argparse.ArgumentParser) -> None:
    runtime.add_common_args(p)
    p.add_argument("--checkpoint", required=True, help="a CLIB-FIQA checkpoint (.pt)")
    p.add_argument("--where", default=None, help="SQL filter over the labels view, e.g. \"dataset = 'lfw'\"")
    p.add_argument("--query", default=None,
                   help="SQL returning sample_id, crop_file, crop_index (face_status, face_error optional)")
    p.add_argument("--method", default=DEFAULT_METHOD, help="method name in the scores table")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096)


def run_cli(args: argparse.Namespace) -> int:
    out = score_flow(workspace=args.workspace, checkpoint=args.checkpoint, where=args.where, query=args.query,
                     method=args.method, device=args.device, batch_size=args.batch_size, shard_size=args.shard_size,
                     run_id=args.run_id, runner=args.runner, workers=args.workers or 1)
    print(json.dumps(out, indent=2, default=str))
    return 0


main = runtime.main_for(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
