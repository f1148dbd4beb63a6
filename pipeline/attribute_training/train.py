"""Train the attribute CNN on a run's WIDER crops, choose thresholds, evaluate on val, save the checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_manifest import Workspace
from pipeline.attribute_training.crops import load_crops
from pipeline.labellers.attributes import split_calibration


def train_and_evaluate(
    ws: Workspace, data_ws: Workspace, run_id: str, model_config: str, train_config: dict[str, Any], *,
    calibration_fraction: float, device: str, torch_threads: int | None = None,
) -> dict[str, Any]:
    """Train on the run's train crops (in the data workspace), choose thresholds on the held-out slice,
    evaluate on val, save the checkpoint in the main workspace."""
    import torch

    from models.attributes import load_config, model_id, save_checkpoint
    from models.attributes_train import LabelledCrops, Subset, TrainConfig, evaluate, fit, predict
    from models.devices import resolve_device
    from models.train import PackedCrops

    if torch_threads:
        torch.set_num_threads(torch_threads)
    mcfg = load_config(model_config)
    tcfg = TrainConfig.from_dict(train_config)
    data = load_crops(data_ws, run_id)
    tr, va = data["train"], data["val"]
    if not tr["files"]:
        raise ValueError(f"run {run_id}: no usable train crops (check the images folder and the parse report)")
    if not va["files"]:
        raise ValueError(f"run {run_id}: no usable val crops")
    train_all = LabelledCrops(PackedCrops(data_ws.root, tr["files"], tr["indices"]), tr["targets"])
    held = split_calibration(tr["images"], calibration_fraction, tcfg.seed)
    train_src = Subset(train_all, np.flatnonzero(~held))
    calib_src = Subset(train_all, np.flatnonzero(held)) if held.any() else None
    val_src = LabelledCrops(PackedCrops(data_ws.root, va["files"], va["indices"]), va["targets"])
    dev = str(resolve_device(device))
    result = fit(mcfg, train_src, tcfg, calibration=calib_src, device=dev)
    probs = predict(result.model, val_src, tcfg.batch_size, dev)
    metrics = evaluate(probs, val_src.targets, result.thresholds)
    ckpt_path = ws.checkpoints / f"attributes-{run_id}.pt"
    info = {**result.info, "history": result.history, "run_id": run_id, "val_samples": len(val_src)}
    save_checkpoint(ckpt_path, result.model, thresholds=result.thresholds, metrics=metrics, train=info,
                    version=run_id)
    return {"checkpoint": str(ckpt_path), "model_id": model_id(result.model), "metrics": metrics,
            "thresholds": result.thresholds, "train_info": info}
