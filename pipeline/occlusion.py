"""Label stage "occlusion": P(obstructed) from the occlusion CNN trained on real faces with pasted occluders.

The model (`models.occlusion`) is built at setup from the face-api photos'
faces; it is checked on the package faces it never saw (`python -m
benchmarks.occlusion`). Every row names the labeller, the model's version and
the SHA-256 of its file, so a relabel can tell models apart.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from models.occlusion import OcclusionModel, load_model, predict_proba, predict_views
from pipeline.factors import binary_class
from pipeline.records import ERROR, FaceCrop, crop_problem, factor_row

LABELLER = "occlusion-cnn-pasted"
CPU_FORWARD_BATCH = 32


class OcclusionStage:
    """Per crop: P(obstructed), the obstructed / unobstructed class and the model that decided."""

    name = "occlusion"

    def __init__(self, device: str = "cpu", model_path: str | os.PathLike[str] | None = None,
                 threshold: float | None = None, forward_batch: int = CPU_FORWARD_BATCH) -> None:
        """`model_path`: a checkpoint (default: the model store's); `threshold`: override the stored one."""
        if forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"occlusion threshold must be in (0, 1), got {threshold}")
        self.device = device
        self.forward_batch = forward_batch
        self.model: OcclusionModel = load_model(model_path, device)
        self.version = self.model.version
        self.threshold = float(self.model.threshold if threshold is None else threshold)
        self.labeller = LABELLER

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """P(obstructed) (N,) for uint8 RGB crops (N, 112, 112, 3)."""
        return predict_proba(self.model, crops, batch_size=self.forward_batch, device=self.device)

    def measures(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Every measure of a row, (N,) each: P(obstructed) and the P of the crop and of its mirror image."""
        plain, mirror = predict_views(self.model, crops, batch_size=self.forward_batch, device=self.device)
        return {"p_obstructed": (plain + mirror) / 2, "p_crop": plain, "p_mirror": mirror}

    def _row(self, sample_id: str, **kwargs: Any) -> dict[str, Any]:
        return factor_row(sample_id, "occlusion", labeller=self.labeller, labeller_version=self.version,
                          thresholds={"probability": self.threshold}, **kwargs)

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        """One occlusion row per record; unusable crops get a row with their status and reason."""
        problems = {i: crop_problem(rec) for i, rec in enumerate(batch)}
        usable = [i for i, p in problems.items() if p is None]
        found = self.measures(np.stack([batch[i].crop for i in usable])) if usable else {}
        at = {i: k for k, i in enumerate(usable)}
        rows = []
        for i, rec in enumerate(batch):
            problem = problems[i]
            if problem is not None:
                rows.append(self._row(rec.sample_id, status=problem[0], error=problem[1]))
                continue
            p = float(found["p_obstructed"][at[i]])
            if not np.isfinite(p):
                rows.append(self._row(rec.sample_id, status=ERROR, error=f"non-finite occlusion probability {p}"))
                continue
            details = {
                "p_obstructed": p,
                "p_crop": float(found["p_crop"][at[i]]),
                "p_mirror": float(found["p_mirror"][at[i]]),
                "model_sha256": self.model.sha256,
                "model_file": self.model.path.name,
            }
            rows.append(self._row(rec.sample_id, value=p, decision=binary_class("occlusion", p, self.threshold),
                                  details=details))
        return rows
