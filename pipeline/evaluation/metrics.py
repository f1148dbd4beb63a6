"""Quality-assessment evaluation metrics: EDC (ISO/IEC 29794-1), ERC compatibility mode, FNMR at FMR.

Public API (stable; scripts outside the project call it):

- ``edc(similarity, pair_quality, *, mated=None, starting_error=None, fmr=None,
  threshold=None)`` -> :class:`EdcCurve` with ``.threshold``, ``.discard``,
  ``.error`` and ``.pauc(limit, minus_theoretical_best=False, normalize=False)``.
- ``pair_quality(qa, qb, how="min")``.
- ``fnmr_at_fmr(similarity, mated, fmr, rule="iso")`` -> :class:`OperatingPoint`.
- ``erc(similarity, pair_quality, mated, *, fmr=1e-3)`` -> :class:`ErcCurve`
  (the CR-FIQA / MagFace script convention, kept for comparing with published tables).

All arrays are 1-D over comparisons; similarity scores are "higher = more similar"
and quality scores "higher = better". Everything is pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PairQualityHow = Literal["min", "max", "mean", "product", "geometric"]
ErrorType = Literal["fnmr", "fmr"]
FmrRule = Literal["iso", "closest"]

#: Discard fractions of the CR-FIQA / MagFace ERC scripts: 0, 0.05, ..., 0.95 (20 steps).
ERC_FRACTIONS = np.arange(0, 0.98, 0.05)


def _as_1d(name: str, values: object, dtype: type = np.float64) -> np.ndarray:
    """Return ``values`` as a 1-D array of ``dtype`` or raise naming the argument."""
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D numeric array: {e}") from e
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _check_finite(name: str, array: np.ndarray) -> None:
    """Raise if ``array`` holds NaN (or +-inf where it makes no sense)."""
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (first at index {first}: {array[first]!r})"
        )


def _comparisons(similarity: object, pair_quality: object) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D similarity and pair-quality arrays of equal length (quality NaN refused, -inf allowed)."""
    sims = _as_1d("similarity", similarity)
    quality = _as_1d("pair_quality", pair_quality)
    if sims.shape != quality.shape:
        raise ValueError(f"similarity and pair_quality differ in length: {sims.size} vs {quality.size}")
    _check_finite("similarity", sims)
    if np.isnan(quality).any():
        raise ValueError(f"pair_quality has {int(np.isnan(quality).sum())} NaN values; map failures to -inf first")
    return sims, quality


def _mated_mask(mated: object, n: int) -> np.ndarray:
    """Return the boolean mated mask (default: all comparisons are mated)."""
    if mated is None:
        return np.ones(n, dtype=bool)
    raw = np.asarray(mated)
    if raw.ndim != 1 or raw.shape[0] != n:
        raise ValueError(f"mated must be 1-D with {n} entries, got shape {raw.shape}")
    if raw.dtype != bool:
        if not np.isin(raw, (0, 1)).all():
            raise ValueError("mated must be boolean (or 0/1)")
        raw = raw.astype(bool)
    return raw


def pair_quality(qa: object, qb: object, how: PairQualityHow = "min") -> np.ndarray:
    """Combine per-sample qualities of the two sides of each comparison (ISO default: the minimum)."""
    a = _as_1d("qa", qa)
    b = _as_1d("qb", qb)
    if a.shape != b.shape:
        raise ValueError(f"qa and qb differ in length: {a.shape[0]} vs {b.shape[0]}")
    if how == "min":
        return np.minimum(a, b)
    if how == "max":
        return np.maximum(a, b)
    if how == "mean":
        return (a + b) / 2.0
    if how == "product":
        return a * b
    if how == "geometric":
        if (a < 0).any() or (b < 0).any():
            raise ValueError("how='geometric' needs non-negative qualities")
        return np.sqrt(a * b)
    raise ValueError(f"unknown pair quality rule how={how!r}; use min, max, mean, product or geometric")


# --------------------------------------------------------------------------- FNMR at FMR


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold with the FMR and FNMR it gives on a set of comparisons."""

    threshold: float
    fmr: float
    fnmr: float
    rule: str


def threshold_at_fmr(impostor: object, fmr: float) -> float:
    """Smallest threshold t with FMR(t) = #(impostor >= t) / n <= ``fmr`` (accept when score >= t)."""
    scores = _as_1d("impostor", impostor)
    _check_finite("impostor similarity", scores)
    if scores.size == 0:
        raise ValueError("threshold_at_fmr needs at least one non-mated (impostor) comparison")
    if not 0.0 <= fmr <= 1.0:
        raise ValueError(f"fmr must lie in [0, 1], got {fmr!r}")
    allowed = int(np.floor(fmr * scores.size + 1e-9))
    if allowed >= scores.size:
        return float("-inf")
    ordered = np.sort(scores)[::-1]
    # Accepting the (allowed+1)-th highest impostor score would exceed the target: step just above it.
    return float(np.nextafter(ordered[allowed], np.inf))


def fnmr_at_fmr(similarity: object, mated: object, fmr: float, rule: FmrRule = "iso") -> OperatingPoint:
    """FNMR at a target FMR; the threshold comes from the non-mated comparisons.

    ``rule="iso"``: the smallest threshold whose FMR does not exceed the target,
    accept when score >= threshold. ``rule="closest"``: the CR-FIQA / MagFace
    script rule: among the observed scores, the (lowest) one whose FMR
    (#impostor >= t) is closest to the target; a mated comparison is then
    accepted only when score > threshold.
    """
    sims = _as_1d("similarity", similarity)
    _check_finite("similarity", sims)
    mask = _mated_mask(mated, sims.size)
    genuine, impostor = sims[mask], sims[~mask]
    if genuine.size == 0:
        raise ValueError("fnmr_at_fmr needs at least one mated comparison")
    if impostor.size == 0:
        raise ValueError("fnmr_at_fmr needs at least one non-mated comparison")
    if rule == "iso":
        t = threshold_at_fmr(impostor, fmr)
        return OperatingPoint(
            threshold=t,
            fmr=float(np.count_nonzero(impostor >= t) / impostor.size),
            fnmr=float(np.count_nonzero(genuine < t) / genuine.size),
            rule=rule,
        )
    if rule == "closest":
        candidates = np.unique(sims)
        imp_sorted = np.sort(impostor)
        fmr_at = (impostor.size - np.searchsorted(imp_sorted, candidates, side="left")) / impostor.size
        t = float(candidates[int(np.argmin(np.abs(fmr_at - fmr)))])
        return OperatingPoint(
            threshold=t,
            fmr=float(np.count_nonzero(impostor >= t) / impostor.size),
            fnmr=float(np.count_nonzero(genuine <= t) / genuine.size),
            rule=rule,
        )
    raise ValueError(f"unknown FMR rule {rule!r}; use 'iso' or 'closest'")


# --------------------------------------------------------------------------- EDC


def theoretical_best_area(starting_error: float, limit: float) -> float:
    """Area under max(0, e0 - x) on [0, limit]: the curve of discarding exactly the errors first."""
    area = starting_error**2 / 2.0
    if limit < starting_error:
        area -= (starting_error - limit) ** 2 / 2.0
    return float(area)


@dataclass(frozen=True)
class EdcCurve:
    """An Error-versus-Discard Characteristic: stepwise curve with one point per distinct quality."""

    threshold: float
    discard: np.ndarray  # fraction of comparisons discarded at each point, starts at 0
    error: np.ndarray  # errors left / comparisons left at each point
    discard_count: np.ndarray  # comparisons discarded at each point
    error_count: np.ndarray  # errors left at each point
    comparisons: int
    error_type: str

    @property
    def starting_error(self) -> float:
        """Error at 0 % discard (identical for every quality method on the same comparisons)."""
        return float(self.error[0])

    def error_at(self, fractions: object) -> np.ndarray:
        """Stepwise curve value at each discard fraction: the error after discarding at most that fraction."""
        x = _as_1d("fractions", fractions)
        if ((x < 0) | (x > 1)).any():
            raise ValueError("discard fractions must lie in [0, 1]")
        # Tolerance keeps 0.15 == 3 * 0.05 from landing one step early in float arithmetic.
        idx = np.searchsorted(self.discard, x + 1e-12, side="right") - 1
        return self.error[idx]

    def pauc(self, limit: float, minus_theoretical_best: bool = False, normalize: bool = False) -> float:
        """Stepwise area under the curve on [0, limit].

        ``minus_theoretical_best`` subtracts the area under max(0, e0 - x), the
        hard lower limit; ``normalize`` divides by the area under the
        starting-error line (less the theoretical best when subtracted), so 0
        is the theoretical best and 1 is no better than random discarding.
        """
        if not 0.0 <= limit <= 1.0:
            raise ValueError(f"discard limit must lie in [0, 1], got {limit!r}")
        right = np.append(self.discard[1:], 1.0)
        widths = np.clip(np.minimum(right, limit) - self.discard, 0.0, None)
        area = float(np.sum(self.error * widths))
        floor = theoretical_best_area(self.starting_error, limit) if minus_theoretical_best else 0.0
        area -= floor
        if normalize:
            scale = self.starting_error * limit - floor
            return float(area / scale) if scale > 0 else float("nan")
        return area


def _edc_threshold(
    scores: np.ndarray,
    mask: np.ndarray,
    error_type: ErrorType,
    starting_error: float | None,
    fmr: float | None,
    threshold: float | None,
) -> float:
    """Fix the comparison threshold once, on all comparisons, before any discarding."""
    options = (("starting_error", starting_error), ("fmr", fmr), ("threshold", threshold))
    given = [name for name, v in options if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of starting_error, fmr, threshold (got {given or 'none'})")
    if threshold is not None:
        return float(threshold)
    genuine, impostor = scores[mask], scores[~mask]
    if fmr is not None:
        return threshold_at_fmr(impostor, fmr)
    if not 0.0 <= starting_error <= 1.0:  # type: ignore[operator]
        raise ValueError(f"starting_error must lie in [0, 1], got {starting_error!r}")
    if error_type == "fnmr":
        if genuine.size == 0:
            raise ValueError("starting_error mode (FNMR) needs mated comparisons")
        return float(np.quantile(genuine, starting_error))
    if impostor.size == 0:
        raise ValueError("starting_error mode (FMR) needs non-mated comparisons")
    return float(np.quantile(impostor, 1.0 - starting_error))  # type: ignore[operator]


def edc(
    similarity: object,
    pair_quality: object,
    *,
    mated: object = None,
    starting_error: float | None = None,
    fmr: float | None = None,
    threshold: float | None = None,
    error_type: ErrorType = "fnmr",
) -> EdcCurve:
    """Compute an EDC curve (ISO/IEC 29794-1; Schlett et al., TBIOM 2024).

    Exactly one of ``starting_error`` (threshold = that quantile of the mated
    scores, linear interpolation), ``fmr`` (threshold from the non-mated scores,
    see :func:`threshold_at_fmr`) or ``threshold`` fixes the threshold once on
    all comparisons. The curve is then computed on the mated comparisons
    (``error_type="fnmr"``, error = score < threshold) or on the non-mated ones
    (``"fmr"``, error = score >= threshold), discarding comparisons in
    ascending pair quality; comparisons of equal quality go together, so the
    curve has one point per distinct quality value.
    """
    sims, quality = _comparisons(similarity, pair_quality)
    if error_type not in ("fnmr", "fmr"):
        raise ValueError(f"unknown error_type {error_type!r}; use 'fnmr' or 'fmr'")
    mask = _mated_mask(mated, sims.size)
    t = _edc_threshold(sims, mask, error_type, starting_error, fmr, threshold)

    subset = mask if error_type == "fnmr" else ~mask
    scores, q = sims[subset], quality[subset]
    n = scores.size
    if n == 0:
        raise ValueError(f"no {'mated' if error_type == 'fnmr' else 'non-mated'} comparisons to build the EDC on")
    order = np.argsort(q, kind="stable")
    q = q[order]
    is_error = (scores[order] < t) if error_type == "fnmr" else (scores[order] >= t)
    # errors_left[i]: errors among comparisons i..n-1 once the i lowest-quality ones are gone.
    errors_left = np.cumsum(is_error[::-1], dtype=np.int64)[::-1]
    starts = np.concatenate(([0], np.flatnonzero(q[1:] != q[:-1]) + 1))
    return EdcCurve(
        threshold=t,
        discard=starts / n,
        error=errors_left[starts] / (n - starts),
        discard_count=starts,
        error_count=errors_left[starts],
        comparisons=n,
        error_type=error_type,
    )


# --------------------------------------------------------------------------- ERC compatibility


@dataclass(frozen=True)
class ErcCurve:
    """An ERC in the CR-FIQA / MagFace script convention: FNMR at a re-fitted FMR threshold per step."""

    fmr: float
    discard: np.ndarray
    error: np.ndarray  # FNMR on the comparisons left at each step
    thresholds: np.ndarray  # threshold re-computed on the comparisons left at each step

    def auc(self, limit: float = 0.95) -> float:
        """Trapezoid area over the step points in [0, limit] (the scripts use sklearn.metrics.auc).

        NaN steps (nothing left to measure) are dropped, so the area stops at the last measured step.
        """
        if not 0.0 <= limit <= 1.0:
            raise ValueError(f"discard limit must lie in [0, 1], got {limit!r}")
        finite = np.isfinite(self.error)
        x, y = self.discard[finite], self.error[finite]
        if x.size == 0:
            return float("nan")
        keep = x <= limit + 1e-9
        xs, ys = x[keep], y[keep]
        if xs[-1] < limit - 1e-9 and keep.sum() < x.size:
            ys = np.append(ys, np.interp(limit, x, y))
            xs = np.append(xs, limit)
        return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def erc(
    similarity: object,
    pair_quality: object,
    mated: object,
    *,
    fmr: float = 1e-3,
    fractions: Sequence[float] | np.ndarray = ERC_FRACTIONS,
    rule: FmrRule = "closest",
) -> ErcCurve:
    """ERC as the CR-FIQA / MagFace scripts compute it (for comparison with published tables).

    At each discard fraction u, the int(u * n) lowest-quality comparisons
    (mated and non-mated together, individual pairs, ties broken by a stable
    sort) are dropped; the threshold is re-computed on what is left for the
    target FMR and the FNMR measured there. Unlike the EDC, the threshold moves
    with the discarding, so the curve mixes the FMR and FNMR effects. A step
    left without mated or without non-mated comparisons gets NaN.
    """
    sims, quality = _comparisons(similarity, pair_quality)
    mask = _mated_mask(mated, sims.size)
    steps = _as_1d("fractions", fractions)
    if ((steps < 0) | (steps >= 1)).any():
        raise ValueError("ERC discard fractions must lie in [0, 1)")
    order = np.argsort(quality, kind="stable")
    n = sims.size
    errors, thresholds = [], []
    for u in steps:
        kept = order[int(u * n) :]
        left = mask[kept]
        if left.all() or not left.any():  # nothing to measure an FNMR or fit a threshold on
            errors.append(np.nan)
            thresholds.append(np.nan)
            continue
        point = fnmr_at_fmr(sims[kept], left, fmr, rule=rule)
        errors.append(point.fnmr)
        thresholds.append(point.threshold)
    return ErcCurve(fmr=fmr, discard=steps.copy(), error=np.asarray(errors), thresholds=np.asarray(thresholds))
