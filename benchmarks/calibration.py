"""Shared pieces of the labeller calibrations: the fit / held-out face sets, threshold fitting, class rates.

Thresholds are FIT on the face-api photos' faces and REPORTED on the faces that
installed packages ship (`pipeline.face_sets`), never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.face_sets import FIT_SOURCE, HELD_OUT_SOURCE, RealFace, face_set


@dataclass(frozen=True)
class Threshold:
    """A fitted threshold, its balanced accuracy on the fit data and the interval of equally good thresholds."""

    value: float
    balanced_accuracy: float
    low: float
    high: float


def balanced_accuracy(negatives: np.ndarray, positives: np.ndarray, threshold: float, bad_above: bool) -> float:
    """Mean of the true-positive and true-negative rates of `value > threshold` (or `<` when not bad_above)."""
    if bad_above:
        tpr, tnr = np.mean(positives > threshold), np.mean(negatives <= threshold)
    else:
        tpr, tnr = np.mean(positives < threshold), np.mean(negatives >= threshold)
    return float((tpr + tnr) / 2.0)


def _short(low: float, high: float) -> float:
    """The midpoint of (low, high), rounded to the fewest decimals (2..6) that keep it strictly inside."""
    mid = (low + high) / 2.0
    if not (math.isfinite(low) and math.isfinite(high)):
        return mid
    for digits in range(2, 7):
        r = round(mid, digits)
        if low < r < high:
            return r
    return mid


def fit_threshold(negatives: Iterable[float], positives: Iterable[float], bad_above: bool) -> Threshold:
    """The threshold separating positives (beyond it) from negatives with the best balanced accuracy.

    Balanced accuracy is constant between consecutive data values; of the
    runs of best candidates, the widest value interval wins and its (short)
    midpoint is returned, so the threshold sits as far from both classes as
    the fit data allow.
    """
    neg = np.asarray(list(negatives), dtype=np.float64)
    pos = np.asarray(list(positives), dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"fit_threshold needs both classes, got {neg.size} negatives and {pos.size} positives")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("fit_threshold: values must be finite")
    values = np.unique(np.concatenate([neg, pos]))
    # Candidate intervals (values[i], values[i+1]) with their midpoints, and the two open ends.
    bounds = np.concatenate([[values[0] - 1.0], values, [values[-1] + 1.0]])
    mids = (bounds[:-1] + bounds[1:]) / 2.0
    scores = np.array([balanced_accuracy(neg, pos, m, bad_above) for m in mids])
    best = scores.max()
    is_best = np.isclose(scores, best, rtol=0, atol=1e-12)
    runs: list[tuple[float, float]] = []
    i = 0
    while i < len(mids):
        if is_best[i]:
            j = i
            while j + 1 < len(mids) and is_best[j + 1]:
                j += 1
            runs.append((float(bounds[i]), float(bounds[j + 1])))
            i = j + 1
        else:
            i += 1
    low, high = max(runs, key=lambda r: r[1] - r[0])
    return Threshold(_short(low, high), float(best), low, high)


def load_sets(fit_photos: str | Path | None = None) -> dict[str, list[RealFace]]:
    """{"fit": face-api faces (from `fit_photos` or the model store), "held_out": the package faces}."""
    return {"fit": face_set(FIT_SOURCE, fit_photos), "held_out": face_set(HELD_OUT_SOURCE)}


def rates(classes: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Share of each class name among `classes` (every name in `names` listed, 0 when absent)."""
    n = len(classes)
    return {name: round(sum(c == name for c in classes) / n, 4) if n else float("nan") for name in names}


def per_variant(faces: Sequence[RealFace], variants: dict[str, Callable[[np.ndarray], np.ndarray]],
                measure: Callable[[RealFace, np.ndarray], object]) -> dict[str, list[object]]:
    """`measure(face, variant crop)` for every variant of every face: variant -> list in face order."""
    return {name: [measure(f, make(f.crop)) for f in faces] for name, make in variants.items()}
