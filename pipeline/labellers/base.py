"""The record that flows between label stages, and the factor row each stage returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from data_manifest.vocabulary import FACTOR_CLASSES, FactorClass
from models.geometry import CROP_SIZE

OK = "ok"
ERROR = "error"
NO_FACE = "no_face"
SKIPPED = "skipped"


@dataclass
class FaceCrop:
    """One aligned face: a 112x112 RGB uint8 crop plus what alignment measured.

    `status` is OK when `crop` is usable; otherwise `crop` is None and `error`
    says why, so every stage can still return a row for the sample.
    """

    sample_id: str
    crop: np.ndarray | None
    landmarks: np.ndarray | None = None  # (5, 2) float, crop coordinates
    status: str = OK
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)





def crop_problem(rec: FaceCrop, size: int = CROP_SIZE) -> tuple[str, str] | None:
    """(status, reason) when a record has no usable size x size RGB uint8 crop, else None."""
    if rec.status != OK or rec.crop is None:
        return (rec.status if rec.status != OK else ERROR, rec.error or "no crop")
    crop = rec.crop
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        got = f"{crop.dtype} {crop.shape}" if isinstance(crop, np.ndarray) else type(crop).__name__
        return (ERROR, f"crop must be uint8 (H, W, 3) RGB, got {got}")
    if crop.shape[:2] != (size, size):
        return (ERROR, f"crop must be {size}x{size}, got {crop.shape[1]}x{crop.shape[0]}")
    return None


def split_usable(batch: list[FaceCrop], size: int = CROP_SIZE) -> tuple[list[int], dict[int, tuple[str, str]]]:
    """Indices of the records with a usable crop, and (status, reason) of the others by index."""
    problems = {i: crop_problem(rec, size) for i, rec in enumerate(batch)}
    return [i for i, p in problems.items() if p is None], {i: p for i, p in problems.items() if p is not None}


class FactorStage(Protocol):
    """A label stage: a batch of crops in, one factors row per (crop, factor) out."""

    name: str
    version: str

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]: ...


def factor_row(
    sample_id: str,
    factor: str,
    *,
    labeller: str,
    labeller_version: str,
    value: float | None = None,
    decision: FactorClass | None = None,
    thresholds: Any = None,
    details: dict[str, Any] | None = None,
    status: str = OK,
    error: str | None = None,
) -> dict[str, Any]:
    """Build one `factors` manifest row (long format: one row per sample and factor)."""
    if factor not in FACTOR_CLASSES:
        raise ValueError(f"unknown factor {factor!r}; known: {list(FACTOR_CLASSES)}")
    if decision is not None and decision.factor != factor:
        raise ValueError(f"decision for {decision.factor!r} given to a {factor!r} row")
    return {
        "sample_id": sample_id,
        "factor": factor,
        "value": None if value is None else float(value),
        "class_index": None if decision is None else decision.index,
        "class_name": None if decision is None else decision.name,
        "labeller": labeller,
        "labeller_version": labeller_version,
        "thresholds": None if thresholds is None else json.dumps(thresholds),
        "details": None if details is None else json.dumps(details, default=float),
        "status": status,
        "error": error,
    }
