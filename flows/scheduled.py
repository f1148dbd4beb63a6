"""Flows for scheduled deployments: refresh a watched dataset (new samples only) and train+score on a GPU pool.

Module-level Prefect flows that deployments point at; they only orchestrate the ingest, label, anchors,
train and score flows. A refresh labels only samples without a `faces` row and recomputes a dataset's
anchors when one of its samples has none (centres and normalisation depend on every sample).
See docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, tags

from data_manifest import Workspace, catalog
from data_manifest.sql_guard import sql_str

STEPS = ("ingest", "label", "anchors")
DEFAULT_LABEL_STAGES = ("align", "blur", "pose", "attributes")  # all five factors, real-face labellers
GPU_TAG = "gpu"


def new_samples_where(dataset: str) -> str:
    """Condition on the `labels` view: samples of the dataset that have never been aligned (no `faces` row)."""
    return f"dataset = {sql_str(dataset)} AND sample_id NOT IN (SELECT sample_id FROM faces)"


def missing_anchors_where(dataset: str) -> str:
    """Condition on the `labels` view: samples of the dataset without an `anchors` row."""
    return f"dataset = {sql_str(dataset)} AND sample_id NOT IN (SELECT sample_id FROM anchors)"


def count_where(ws: Workspace, where: str) -> int:
    """Number of `labels` rows matching a condition."""
    return int(catalog.query(ws, f"SELECT count(*) AS n FROM labels WHERE {where}").column("n")[0].as_py())


def parse_steps(steps: str | Sequence[str]) -> list[str]:
    """Validated refresh steps in pipeline order."""
    names = [s.strip() for s in (steps.split(",") if isinstance(steps, str) else steps) if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise ValueError(f"unknown or no refresh steps {names!r}; choose from {', '.join(STEPS)}")
    return [s for s in STEPS if s in names]


@flow(name="refresh-dataset", log_prints=True)
def refresh_dataset(dataset_path: str, dataset: str, workspace: str | None = None, format: str = "auto",
                    steps: list[str] = list(STEPS),  # noqa: B006
                    label_stages: list[str] = list(DEFAULT_LABEL_STAGES),  # noqa: B006
                    label_options: dict[str, Any] | None = None, fr_model: str | None = None,
                    device: str = "auto", shard_size: int = 1000, runner: str = "threads",
                    workers: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Ingest the watched dataset, label its new samples, refresh its anchors when some are missing."""
    from flows.ingest import ingest
    from flows.label import label
    from pipeline.labellers.registry import ALIGN, parse_stages

    todo = parse_steps(steps)
    stages = parse_stages(label_stages)
    if "label" in todo and ALIGN not in stages:
        raise ValueError(f"refresh labels new samples, which must be aligned first: add 'align' to {stages}")
    ws = Workspace(workspace)
    logger = get_run_logger()
    result: dict[str, Any] = {"dataset": dataset, "workspace": str(ws.root), "steps": todo}
    runner_opts = {"runner": runner, "workers": workers, "address": address}

    if "ingest" in todo:
        out = ingest(path=dataset_path, dataset=dataset, format=format, shard_size=shard_size,
                     workspace=str(ws.root), progress=False, **runner_opts)
        result["ingest"] = {"run_id": out["run_id"], "records": out["records"], "counts": out["counts"]}
    if "label" in todo:
        where = new_samples_where(dataset)
        result["new_samples"] = n_new = count_where(ws, where)
        if n_new:
            out = label(stages=stages, where=where, options=label_options, workspace=str(ws.root),
                        shard_size=shard_size, progress=False, **runner_opts)
            result["label"] = {"run_id": out["run_id"], "selected": out["selected"], "counts": out["counts"]}
        logger.info("%s: %d new sample(s) labelled", dataset, n_new)
    if "anchors" in todo:
        n_missing = count_where(ws, missing_anchors_where(dataset))
        result["samples_without_anchors"] = n_missing
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

    out = anchors_flow(workspace=str(ws.root), fr_model=fr_model or DEFAULT_FR_MODEL,
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

    config = dict(train_config or {})
    config.setdefault("device", device)
    ws = Workspace(workspace)
    # Task runs inside carry the `gpu` tag: `prefect concurrency-limit create gpu 1` serialises them.
    with tags(GPU_TAG):
        trained = train_flow(workspace=str(ws.root), model_config=model, train_config=config, where=where)
        checkpoint = trained["checkpoint"]
        scored = score_flow(workspace=str(ws.root), checkpoint=checkpoint, where=score_where,
                            method=method or DEFAULT_METHOD, device=device, batch_size=batch_size)
    return {"train": {"run_id": trained["run_id"], "checkpoint": checkpoint},
            "score": {"run_id": scored["run_id"], "selected": scored["selected"]}}
