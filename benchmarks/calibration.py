"""Shared pieces of the labeller calibrations: the fit / held-out face sets, threshold fitting, class rates.

Thresholds are FIT on the face-api photos' faces and REPORTED on the faces that
installed packages ship (`models.fit_data.face_sets`), never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.fit_data.face_sets import FIT_SOURCE, HELD_OUT_SOURCE, RealFace, face_set

TRIM = 0.1  # each class's most atypical 10 % are ignored when placing a threshold


@dataclass(frozen=True)
class Threshold:
    """A fitted threshold, how it was placed, and its balanced accuracy on the fit data."""

    value: float
    balanced_accuracy: float
    negatives_edge: float  # the negatives' (1 - TRIM) quantile on the side of the positives
    positives_edge: float  # the positives' TRIM quantile on the side of the negatives
    method: str  # "quantile midpoint" or "best balanced accuracy" (when the edges cross)


def balanced_accuracy(negatives: np.ndarray, positives: np.ndarray, threshold: float, bad_above: bool) -> float:
    """Mean of the true-positive and true-negative rates of `value > threshold` (or `<` when not bad_above)."""
    if bad_above:
        tpr, tnr = np.mean(positives > threshold), np.mean(negatives <= threshold)
    else:
        tpr, tnr = np.mean(positives < threshold), np.mean(negatives >= threshold)
    return float((tpr + tnr) / 2.0)


def _short(low: float, high: float) -> float:
    """The midpoint of (low, high) rounded to 3 decimals (more when needed to stay strictly inside)."""
    mid = (low + high) / 2.0
    for digits in range(3, 8):
        r = round(mid, digits)
        if low < r < high:
            return r
    return mid


def _best_accuracy(neg: np.ndarray, pos: np.ndarray, bad_above: bool) -> float:
    """Midpoint of the widest interval of thresholds with the best balanced accuracy."""
    values = np.unique(np.concatenate([neg, pos]))
    bounds = np.concatenate([[values[0] - 1.0], values, [values[-1] + 1.0]])
    mids = (bounds[:-1] + bounds[1:]) / 2.0
    scores = np.array([balanced_accuracy(neg, pos, m, bad_above) for m in mids])
    is_best = np.isclose(scores, scores.max(), rtol=0, atol=1e-12)
    runs: list[tuple[float, float]] = []
    i = 0
    while i < len(mids):
        if not is_best[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(mids) and is_best[j + 1]:
            j += 1
        runs.append((float(bounds[i]), float(bounds[j + 1])))
        i = j + 1
    low, high = max(runs, key=lambda r: r[1] - r[0])
    return _short(low, high)


def fit_threshold(negatives: Iterable[float], positives: Iterable[float], bad_above: bool,
                  trim: float = TRIM) -> Threshold:
    """A threshold with positives beyond it (above when `bad_above`) and negatives on the other side.

    Quantile midpoint: halfway between the negatives' (1 - trim) quantile and
    the positives' trim quantile (the facing edges of both classes once each
    class's most atypical `trim` share is set aside), so the threshold keeps
    equal room to both and one odd face does not move it. When those edges
    cross, the midpoint of the widest run of thresholds with the best balanced
    accuracy is used instead.
    """
    neg = np.asarray(list(negatives), dtype=np.float64)
    pos = np.asarray(list(positives), dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"fit_threshold needs both classes, got {neg.size} negatives and {pos.size} positives")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("fit_threshold: values must be finite")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), got {trim}")
    neg_edge = float(np.quantile(neg, 1.0 - trim if bad_above else trim))
    pos_edge = float(np.quantile(pos, trim if bad_above else 1.0 - trim))
    separated = neg_edge < pos_edge if bad_above else pos_edge < neg_edge
    if separated:
        value, method = _short(min(neg_edge, pos_edge), max(neg_edge, pos_edge)), "quantile midpoint"
    else:
        value, method = _best_accuracy(neg, pos, bad_above), "best balanced accuracy"
    return Threshold(value, balanced_accuracy(neg, pos, value, bad_above), neg_edge, pos_edge, method)


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
