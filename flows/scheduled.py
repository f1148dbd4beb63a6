"""Flows for scheduled deployments: refresh a watched dataset (new samples only) and train+score on a GPU pool.

Module-level Prefect flows that deployments point at; they only orchestrate the ingest, label, anchors,
train and score flows. A refresh labels only samples without a `faces` row and recomputes a dataset's
anchors when one of its samples has none (centres and normalisation depend on every sample).
See docs/operations.md.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, tags

from data_manifest import Workspace, catalog, runs
from data_manifest.sql_guard import sql_str
from flows.bookkeeping import die_with_runner
from pipeline import deployments as D


def check_refresh(params: dict[str, Any]) -> list[str]:
    """Build every sub-flow's options from refresh parameters as the sub-flows do (a bad one fails with their
    message, at deploy time and before a run's first step); returns the steps."""
    from flows.anchors import DEFAULT_FR_MODEL, AnchorsOptions
    from flows.ingest import IngestOptions
    from flows.label import LabelRunOptions
    from pipeline.labellers.registry import ALIGN, parse_stages

    p = {"format": "auto", "steps": D.STEPS, "label_stages": D.DEFAULT_LABEL_STAGES, "shard_size": 1000, **params}
    run = {k: p.get(k) for k in ("workspace", "runner", "workers", "address") if p.get(k) is not None}
    todo, stages = D.parse_steps(p["steps"]), parse_stages(p["label_stages"])
    if "label" in todo and ALIGN not in stages:
        raise ValueError(f"--label-stages must include '{ALIGN}': refresh labels new, never aligned samples")
    IngestOptions(path=p["dataset_path"], dataset=p["dataset"], format=p["format"], shard_size=p["shard_size"], **run)
    if "label" in todo:
        LabelRunOptions(stages=stages, where=D.new_samples_where(p["dataset"]), shard_size=p["shard_size"],
                        options=p.get("label_options") or {}, **run).check()
    if "anchors" in todo:
        AnchorsOptions(fr_model=p.get("fr_model") or DEFAULT_FR_MODEL, device=p.get("device") or "auto",
                       where=f"dataset = {sql_str(p['dataset'])}", reuse_embeddings=True,
                       **{**run, "workers": run.get("workers") or 1}).check()
    return todo


def recover(workspace: str | None) -> Workspace:
    """The workspace, its runs whose process died recorded as crashed; this run stops with its runner."""
    die_with_runner()
    ws = Workspace(workspace)
    for rid in runs.recover_crashed(ws):
        get_run_logger().warning("run %s was running in a process that died: recorded as crashed", rid)
    return ws


def check_train(params: dict[str, Any]) -> None:
    """Build the train options of train+score parameters as the train flow does, and check the score condition."""
    from flows.train import TrainOptions

    TrainOptions(model_config=params.get("model", "clib-rn50"), where=params.get("where"),
                 train_config=params.get("train_config") or {})
    if params.get("score_where") is not None:
        catalog.check_where(params["score_where"])


@flow(name="refresh-dataset", log_prints=True)
def refresh_dataset(dataset_path: str, dataset: str, workspace: str | None = None, format: str = "auto",
                    steps: list[str] = list(D.STEPS),  # noqa: B006
                    label_stages: list[str] = list(D.DEFAULT_LABEL_STAGES),  # noqa: B006
                    label_options: dict[str, Any] | None = None, fr_model: str | None = None,
                    device: str = "auto", shard_size: int = 1000, runner: str = "threads",
                    workers: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Ingest the watched dataset, label its new samples, refresh its anchors when some are missing."""
    todo, stages = check_refresh(dict(locals())), list(label_stages)  # every option, before the first step
    from flows.ingest import ingest
    from flows.label import LabelRunOptions, label

    ws, logger = recover(workspace), get_run_logger()
    result: dict[str, Any] = {"dataset": dataset, "workspace": ws.location, "steps": todo}
    runner_opts = {"runner": runner, "workers": workers, "address": address}

    if "ingest" in todo:
        out = ingest(path=dataset_path, dataset=dataset, format=format, shard_size=shard_size,
                     workspace=ws.location, progress=False, **runner_opts)
        result["ingest"] = {"run_id": out["run_id"], "records": out["records"], "counts": out["counts"]}
        logger.info("%s: ingest run %s read %d record(s)", dataset, out["run_id"], out["records"])
    if "label" in todo:
        where = D.new_samples_where(dataset)
        planned = LabelRunOptions(stages=stages, where=where, shard_size=shard_size, options=label_options or {})
        if crashed := runs.resumable(ws, "label", planned.run_params()):  # its committed shards are kept
            logger.info("%s: resuming crashed label run %s", dataset, crashed)
            label(stages=stages, where=where, options=label_options, workspace=ws.location, shard_size=shard_size,
                  progress=False, run_id=crashed, **runner_opts)
        result["new_samples"] = n_new = D.count_where(ws, where)
        if n_new:
            out = label(stages=stages, where=where, options=label_options, workspace=ws.location,
                        shard_size=shard_size, progress=False, **runner_opts)
            result["label"] = {"run_id": out["run_id"], "selected": out["selected"], "counts": out["counts"]}
        logger.info("%s: %d new sample(s) labelled", dataset, n_new)
    if "anchors" in todo:
        result["samples_without_anchors"] = n_missing = D.count_where(ws, D.missing_anchors_where(dataset))
        if n_missing:
            result["anchors"] = _refresh_anchors(ws, dataset, fr_model=fr_model, device=device, runner=runner,
                                                 workers=workers, address=address)
        logger.info("%s: %d sample(s) without anchors%s", dataset, n_missing,
                    "; anchors recomputed for the whole dataset" if n_missing else "")
    return result


def _refresh_anchors(ws: Workspace, dataset: str, *, fr_model: str | None, device: str, runner: str,
                     workers: int | None, address: str | None) -> dict[str, Any]:
    """Anchors over every sample of the dataset (centers and normalisation need all of them).

    Stored embeddings of the same model are reused, so only new samples are embedded.
    """
    from flows.anchors import DEFAULT_FR_MODEL, anchors_flow

    out = anchors_flow(workspace=ws.location, fr_model=fr_model or DEFAULT_FR_MODEL,
                       where=f"dataset = {sql_str(dataset)}", device=device, runner=runner,
                       workers=workers or 1, address=address, progress=False, reuse_embeddings=True)
    return {"run_id": out["run_id"], "selected": out.get("selected"), "embeddings_reused": True}


@flow(name="train-and-score", log_prints=True)
def train_and_score(workspace: str | None = None, model: str = "clib-rn50",
                    train_config: dict[str, Any] | None = None, where: str | None = None,
                    score_where: str | None = None, method: str | None = None, device: str = "auto",
                    batch_size: int = 64) -> dict[str, Any]:
    """Train CLIB-FIQA on the catalog, then score the selected samples with the new checkpoint (GPU work)."""
    from flows.score import DEFAULT_METHOD, score_flow
    from flows.train import train_flow

    check_train({"model": model, "where": where, "train_config": train_config, "score_where": score_where})
    config = dict(train_config or {})
    config.setdefault("device", device)
    ws = recover(workspace)
    # Task runs inside carry the `gpu` tag: `prefect concurrency-limit create gpu 1` serialises them.
    with tags(D.GPU_TAG):
        trained = train_flow(workspace=ws.location, model_config=model, train_config=config, where=where)
        checkpoint = trained["checkpoint"]
        scored = score_flow(workspace=ws.location, checkpoint=checkpoint, where=score_where,
                            method=method or DEFAULT_METHOD, device=device, batch_size=batch_size)
    return {"train": {"run_id": trained["run_id"], "checkpoint": checkpoint},
            "score": {"run_id": scored["run_id"], "selected": scored["selected"]}}


@flow(name="relabel-subset", log_prints=True)
def relabel_subset(where: str, stages: list[str] | None = None, workspace: str | None = None,
                   shard_size: int | None = None, detector: str | None = None, pack: str | None = None,
                   align_mode: str | None = None, min_face_size: float | None = None, pose_backend: str | None = None,
                   pose_thresholds: list[float] | None = None, pose_withhold: str | None = None,
                   blur_thresholds: list[float] | str | None = None,
                   attributes_checkpoint: str | None = None, device: str | None = None, runner: str | None = None,
                   workers: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Re-label the samples `where` selects (SQL on the `labels` view) with `stages`, as `fiqa relabel` does
    (None: `fiqa relabel`'s default). Checked before any work the way `fiqa relabel` checks its options."""
    params = dict(locals())
    from flows import label, relabel

    opts, _ = relabel.checked_options(params), recover(workspace)
    out = label.run(opts, relabel.relabel_run)
    print(f"run {out['run_id']}: re-labelled {out['selected']} samples with {','.join(out['stages'])}")
    return {"run_id": out["run_id"], "selected": out["selected"], "counts": out["counts"]}
