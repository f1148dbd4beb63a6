"""The record that flows between label stages, and the factor row each stage returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.factors import FACTOR_CLASSES, FactorClass

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
