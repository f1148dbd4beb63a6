"""Analytic lighting measures on the face region (ISO/IEC 29794-5 / OFIQ style) and the lighting label stage.

The measures follow OFIQ's definitions on an aligned 112x112 crop, with the
face region derived from the five landmarks instead of OFIQ's 98-point mask:

- luminance: relative luminance of linearised sRGB with Rec. 709 weights,
  Y = 0.2126 R + 0.7152 G + 0.0722 B, stored as round(255 Y) (OFIQ's
  `GetLuminanceImageFromBGR`; not Y of YCbCr, not CIELAB L*);
- `luminance_mean`, `luminance_variance`: mean and variance of Y / 255 over the
  face region (OFIQ LuminanceMean / LuminanceVariance);
- `illumination_uniformity`: sum of bin-wise minima of the normalised 256-bin
  luminance histograms of the left and right face halves (OFIQ uses two cheek
  zones; the halves hold more pixels on a 112 px crop); `half_mean_ratio`: darker
  half's mean luminance over the brighter half's; `half_median_ratio`: the same with
  medians, which a few bright highlights (eye whites, specular spots) do not move;
- `dynamic_range_bits`: entropy of the 256-bin luminance histogram (OFIQ
  DynamicRange); `luminance_p01`, `luminance_p99`: 1st / 99th percentiles of Y / 255;
- `under_exposure`, `over_exposure`: fractions of face pixels with Y in 0..25 and
  247..255 (OFIQ's ranges).

`lighting_decision` turns them into the "extreme lighting" / "normal lighting"
class with `LightingRule`, whose defaults were calibrated on real faces
(`python -m benchmarks.calibrate_lighting`, see docs/labelling.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_manifest.vocabulary import FactorClass, binary_class
from models.geometry import ARCFACE_TEMPLATE, check_points
from pipeline.colour import REC709, SRGB_TO_LINEAR
from pipeline.labellers.base import ERROR, OK, FaceCrop, factor_row

VERSION = "2"  # 2: dark on the 99th percentile, uneven on half medians (1: mean and under-exposure)
LABELLER = "analytic-lighting"
CROP_SIZE = 112
UNDER_EXPOSURE_MAX = 25  # OFIQ UnderExposurePrevention range 0..25 (inclusive)
OVER_EXPOSURE_MIN = 247  # OFIQ OverExposurePrevention range 247..255 (inclusive)
# Face ellipse from the landmarks: centred midway between the eye midpoint and the mouth midpoint,
# semi-axes in units of the inter-eye distance (across) and the eye-to-mouth distance (along the face).
REGION_HALF_WIDTH = 0.95  # x inter-eye distance: cheek to cheek
REGION_HALF_HEIGHT = 1.05  # x eye-to-mouth distance: forehead to chin
MIN_REGION_PIXELS = 200  # fewer face pixels than this: the measures are not meaningful

MEASURES: tuple[str, ...] = (
    "luminance_mean",
    "luminance_variance",
    "illumination_uniformity",
    "half_mean_ratio",
    "half_median_ratio",
    "dynamic_range_bits",
    "luminance_p01",
    "luminance_p99",
    "under_exposure",
    "over_exposure",
    "face_pixels",
)


def luma_reference(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> uint8 floor(255 Y + 0.5), Y of linear sRGB with Rec. 709 weights (computed)."""
    y = SRGB_TO_LINEAR[pixels] @ REC709
    return np.floor(y * 255.0 + 0.5).astype(np.uint8)


@functools.cache
def _luma_table() -> np.ndarray:
    """`luma_reference` of every 24-bit RGB colour, indexed by R << 16 | G << 8 | B (16 MiB, built once per
    process in about 0.3 s): the label pass then looks each pixel up instead of computing it, 6x faster."""
    table = np.empty(1 << 24, np.uint8)
    colours = np.empty((1 << 16, 3), np.uint8)
    low = np.arange(1 << 16)
    colours[:, 1], colours[:, 2] = low >> 8, low & 0xFF
    for r in range(256):
        colours[:, 0] = r
        table[r << 16:(r + 1) << 16] = luma_reference(colours)
    return table


def _luma(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> uint8 floor(255 Y + 0.5), Y of linear sRGB with Rec. 709 weights (looked up)."""
    p = np.asarray(pixels)
    index = p[..., 0].astype(np.uint32) << 16
    index |= p[..., 1].astype(np.uint32) << 8
    index |= p[..., 2]
    return _luma_table()[index]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 luminance floor(255 Y + 0.5), Y of linear sRGB with Rec. 709 weights (OFIQ)."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"luminance needs a uint8 (H, W, 3) RGB image, got {arr.dtype} {arr.shape}")
    return _luma(arr)


def face_frame(landmarks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Centre, across-unit vector (image left -> right eye), along-unit vector (eyes -> mouth), IED, eye-mouth distance.

    Landmark order as the ArcFace template: left eye, right eye, nose, left and right mouth corners.
    """
    pts = check_points(landmarks)
    eyes = (pts[0] + pts[1]) / 2.0
    mouth = (pts[3] + pts[4]) / 2.0
    across = pts[1] - pts[0]
    ied = float(np.hypot(*across))
    down = mouth - eyes
    emd = float(np.hypot(*down))
    if ied < 1e-6 or emd < 1e-6:
        raise ValueError(f"degenerate landmarks (eyes or eyes and mouth coincide): {pts.tolist()}")
    return (eyes + mouth) / 2.0, across / ied, down / emd, ied, emd


def face_region(landmarks: Any, shape: tuple[int, int] = (CROP_SIZE, CROP_SIZE)) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (face ellipse, its image-left half) from the 5 landmarks, in crop coordinates.

    The ellipse is centred midway between the eye and mouth midpoints, oriented
    along the eyes-to-mouth axis, with semi-axes REGION_HALF_WIDTH x inter-eye
    distance and REGION_HALF_HEIGHT x eye-to-mouth distance; the left half is
    the part left of the face's vertical axis (pixel centres on it go right).
    """
    centre, across, down, ied, emd = face_frame(landmarks)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    u = dx * across[0] + dy * across[1]  # signed distance across the face (to the image right)
    v = dx * down[0] + dy * down[1]  # signed distance along the face (downwards)
    inside = (u / (REGION_HALF_WIDTH * ied)) ** 2 + (v / (REGION_HALF_HEIGHT * emd)) ** 2 <= 1.0
    return inside, inside & (u < 0)


@dataclass(frozen=True)
class RegionIndex:
    """Raster-order pixel indices of a face region in a flattened crop, and the positions of its two halves."""

    pixels: np.ndarray  # (n,) indices into H * W
    left: np.ndarray  # positions within `pixels` of the image-left half
    right: np.ndarray  # positions within `pixels` of the image-right half
    shape: tuple[int, int]


@functools.lru_cache(maxsize=64)
def _region_index(points: bytes, shape: tuple[int, int]) -> RegionIndex:
    region, left = face_region(np.frombuffer(points, dtype=np.float64).reshape(5, 2), shape)
    n = int(region.sum())
    if n < MIN_REGION_PIXELS:
        raise ValueError(
            f"face region from the landmarks covers {n} pixels of the {shape[1]}x{shape[0]} crop "
            f"(< {MIN_REGION_PIXELS}); landmarks outside the crop or too close together"
        )
    pixels = np.flatnonzero(region)
    is_left = left.reshape(-1)[pixels]
    if is_left.all() or not is_left.any():
        raise ValueError("face region has an empty left or right half; landmarks are not a face")
    out = RegionIndex(pixels, np.flatnonzero(is_left), np.flatnonzero(~is_left), shape)
    for a in (out.pixels, out.left, out.right):
        a.setflags(write=False)  # shared through the cache
    return out


def region_index(landmarks: Any, shape: tuple[int, int] = (CROP_SIZE, CROP_SIZE)) -> RegionIndex:
    """The face region of `face_region` as pixel indices (cached per landmarks and shape); ValueError when it is
    too small (< MIN_REGION_PIXELS) or a half is empty."""
    points = np.ascontiguousarray(check_points(landmarks), dtype=np.float64)
    return _region_index(points.tobytes(), (int(shape[0]), int(shape[1])))


def histogram_counts(values: np.ndarray) -> np.ndarray:
    """256-bin counts (N, 256), as int64, of the rows of uint8 values (N, n): OpenCV's histogram row by row (the
    integers np.bincount gives, several times faster on a batch)."""
    import cv2

    out = np.empty((len(values), 256), np.int64)
    for i, row in enumerate(np.ascontiguousarray(values, dtype=np.uint8)):
        out[i] = cv2.calcHist([row.reshape(1, -1)], [0], None, [256], [0, 256]).reshape(-1)
    return out


def _histograms(values: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Normalised 256-bin histograms (N, 256) of the rows of uint8 values (N, n), n > 0."""
    return (histogram_counts(values) if counts is None else counts).astype(np.float64) / values.shape[1]


def count_medians(counts: np.ndarray) -> np.ndarray:
    """np.median of the values counted in each row of 256-bin counts (N, 256): the middle value, or the mean of
    the two, each row with its own count (0 for a row that counts nothing)."""
    n = counts.sum(axis=1)[:, None]
    cum = np.cumsum(counts, axis=1)
    upper = (cum > n // 2).argmax(axis=1)
    lower = (cum > (n - 1) // 2).argmax(axis=1)
    return (lower + upper) / 2.0


def _entropy_bits(hist: np.ndarray) -> float:
    p = hist[hist > 0]
    return float(-(p * np.log2(p)).sum())


def batch_lighting_measures(crops: np.ndarray, landmarks: Any) -> dict[str, np.ndarray]:
    """`lighting_measures` of N uint8 RGB crops (N, H, W, 3) that share one set of landmarks: (N,) per measure.

    The face region is found once; every measure is computed for all crops at once.
    """
    arr = np.asarray(crops)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(f"lighting measures need uint8 (N, H, W, 3) RGB crops, got {arr.dtype} {arr.shape}")
    index = region_index(landmarks, arr.shape[1:3])
    y = _luma(arr.reshape(len(arr), -1, 3)[:, index.pixels])  # (N, n) face-pixel luminance, raster order
    n = y.shape[1]
    hist = _histograms(y)
    levels = np.arange(256) / 255.0
    mean = (hist * levels).sum(axis=1)
    variance = (hist * (levels - mean[:, None]) ** 2).sum(axis=1)
    yl, yr = y[:, index.left], y[:, index.right]
    ml, mr = yl.mean(axis=1), yr.mean(axis=1)
    cl, cr = histogram_counts(yl), histogram_counts(yr)
    dl, dr = count_medians(cl), count_medians(cr)
    p01, p99 = np.percentile(y, [1.0, 99.0], axis=1) / 255.0
    hi_mean, hi_median = np.maximum(ml, mr), np.maximum(dl, dr)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_ratio = np.where(hi_mean == 0, 1.0, np.minimum(ml, mr) / hi_mean)
        median_ratio = np.where(hi_median == 0, 1.0, np.minimum(dl, dr) / hi_median)
    return {
        "luminance_mean": mean,
        "luminance_variance": variance,
        "illumination_uniformity": np.minimum(_histograms(yl, cl), _histograms(yr, cr)).sum(axis=1),
        "half_mean_ratio": mean_ratio,
        "half_median_ratio": median_ratio,
        "dynamic_range_bits": np.array([_entropy_bits(h) for h in hist]),
        "luminance_p01": p01,
        "luminance_p99": p99,
        "under_exposure": np.count_nonzero(y <= UNDER_EXPOSURE_MAX, axis=1) / n,
        "over_exposure": np.count_nonzero(y >= OVER_EXPOSURE_MIN, axis=1) / n,
        "face_pixels": np.full(len(arr), float(n)),
    }


def lighting_measures(crop: np.ndarray, landmarks: Any) -> dict[str, float]:
    """OFIQ-style lighting measures of the face region of an aligned RGB uint8 crop (see the module docstring)."""
    arr = np.asarray(crop)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"luminance needs a uint8 (H, W, 3) RGB image, got {arr.dtype} {arr.shape}")
    return {k: float(v[0]) for k, v in batch_lighting_measures(arr[None], landmarks).items()}


@dataclass(frozen=True)
class LightingRule:
    """Thresholds of the extreme-lighting rule (calibrated: `python -m benchmarks.calibrate_lighting`).

    A face is "extreme lighting" when any criterion passes its threshold:
    dark: luminance_p99 < p99_low (even the brightest face pixels, eye whites
    and specular highlights, are dim: under-exposure, not dark skin);
    bright: luminance_mean > mean_high; overexposed: over_exposure > over_max;
    uneven: half_median_ratio < ratio_min (one half much darker: strong side light).

    The dark test reads the 99th percentile, not the mean or the under-exposure
    fraction: a darker skin under good light lowers the mean and raises the share
    of dark pixels as much as a dim exposure does, but leaves the highlights bright.
    """

    p99_low: float = 0.203  # fitted: clean vs dark levels 2-3
    mean_high: float = 0.8  # OFIQ's upper LuminanceMean sigmoid centre (not fitted)
    over_max: float = 0.009  # fitted: clean vs overexpose levels 2-3
    ratio_min: float = 0.405  # fitted: clean vs side_light levels 2-3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"LightingRule.{name} must lie strictly between 0 and 1, got {value}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_RULE = LightingRule()
STEEPNESS = 8.0  # logistic slope over the distance from a threshold to the end of the 0..1 range


def ramp(value: float, threshold: float, bad_above: bool) -> float:
    """Criterion score in [0, 1]: 0.5 at the threshold, logistic in the excess relative to the range left.

    The excess is divided by the distance from the threshold to the end of the
    0..1 range on the value's side, so the score reaches 1 / (1 + e**-8) = 0.9997
    (or 0.0003) at the ends of the range whatever the threshold.
    """
    excess = value - threshold if bad_above else threshold - value
    towards_high_end = (excess >= 0) == bad_above  # the value lies between the threshold and 1
    room = 1.0 - threshold if towards_high_end else threshold
    z = STEEPNESS * excess / room
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


CRITERIA: dict[str, tuple[str, str, bool]] = {  # criterion -> (measure, rule field, bad when above)
    "dark": ("luminance_p99", "p99_low", False),
    "bright": ("luminance_mean", "mean_high", True),
    "overexposed": ("over_exposure", "over_max", True),
    "uneven": ("half_median_ratio", "ratio_min", False),
}


def criterion_scores(measures: dict[str, float], rule: LightingRule = DEFAULT_RULE) -> dict[str, float]:
    """Per-criterion extreme-lighting scores in [0, 1] (0.5 exactly at each threshold)."""
    out: dict[str, float] = {}
    for criterion, (measure, field, bad_above) in CRITERIA.items():
        if measure not in measures:
            raise ValueError(f"lighting measures lack {measure!r} (have {sorted(measures)})")
        value = float(measures[measure])
        if not math.isfinite(value):
            raise ValueError(f"lighting measure {measure} is not finite: {value}")
        out[criterion] = ramp(value, getattr(rule, field), bad_above)
    return out


def lighting_decision(measures: dict[str, float], rule: LightingRule = DEFAULT_RULE) -> tuple[float, FactorClass]:
    """(score of "extreme lighting" in [0, 1], class): the largest criterion score; extreme when it is >= 0.5."""
    score = max(criterion_scores(measures, rule).values())
    return score, binary_class("lighting", score, 0.5)


class LightingStage:
    """Label stage "lighting": analytic measures of each aligned crop -> one `lighting` factors row."""

    name = "lighting"
    labeller = LABELLER
    version = f"{VERSION};region={REGION_HALF_WIDTH},{REGION_HALF_HEIGHT}"

    def __init__(self, rule: LightingRule = DEFAULT_RULE) -> None:
        self.rule = rule

    def _row(self, sample_id: str, **kw: Any) -> dict[str, Any]:
        return factor_row(sample_id, "lighting", labeller=self.labeller, labeller_version=self.version,
                          thresholds=self.rule.to_dict(), **kw)

    def _prepare(self, face: FaceCrop) -> dict[str, Any] | tuple[np.ndarray, np.ndarray, str]:
        """(crop, landmarks (5, 2), their source) of a usable record, or the row that says why it is not."""
        if face.status != OK:
            return self._row(face.sample_id, status=face.status, error=face.error or f"no crop (status {face.status})")
        if face.crop is None:
            return self._row(face.sample_id, status=ERROR, error="crop is missing although status is ok")
        crop = np.asarray(face.crop)
        if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
            return self._row(face.sample_id, status=ERROR,
                             error=f"crop must be uint8 (H, W, 3) RGB, got {crop.dtype} {crop.shape}")
        # An already-aligned crop without measured landmarks is aligned to the template by definition.
        if face.landmarks is None and crop.shape[:2] != (CROP_SIZE, CROP_SIZE):
            return self._row(face.sample_id, status=ERROR, error=f"no landmarks, and a {crop.shape[1]}x"
                             f"{crop.shape[0]} crop is not on the {CROP_SIZE}x{CROP_SIZE} template")
        landmarks, source = (ARCFACE_TEMPLATE, "template") if face.landmarks is None else (face.landmarks, "measured")
        try:
            points = np.ascontiguousarray(check_points(landmarks), dtype=np.float64)
        except ValueError as e:
            return self._row(face.sample_id, status=ERROR, error=f"lighting measures failed: {e}")
        return crop, points, source

    def _measured_row(self, sample_id: str, measures: dict[str, float], source: str) -> dict[str, Any]:
        try:
            criteria = criterion_scores(measures, self.rule)
        except ValueError as e:
            return self._row(sample_id, status=ERROR, error=f"lighting measures failed: {e}")
        score = max(criteria.values())  # as lighting_decision
        details = {**measures, "criteria": criteria, "strongest": max(criteria, key=criteria.__getitem__),
                   "landmarks": source}
        return self._row(sample_id, value=score, decision=binary_class("lighting", score, 0.5), details=details)

    def label(self, face: FaceCrop) -> dict[str, Any]:
        """One factors row for one crop; unusable crops or landmarks give a row with a status and reason."""
        return self([face])[0]

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        """One row per record, in order. Crops that share their landmarks and size (every already-aligned crop
        uses the template) are measured together, the face region found once."""
        rows: list[dict[str, Any] | None] = [None] * len(batch)
        groups: dict[tuple[tuple[int, ...], bytes], list[tuple[int, np.ndarray, np.ndarray, str]]] = {}
        for i, face in enumerate(batch):
            prepared = self._prepare(face)
            if isinstance(prepared, dict):
                rows[i] = prepared
                continue
            crop, points, source = prepared
            groups.setdefault((crop.shape, points.tobytes()), []).append((i, crop, points, source))
        for members in groups.values():
            try:
                found = batch_lighting_measures(np.stack([m[1] for m in members]), members[0][2])
            except ValueError as e:
                for i, *_ in members:
                    rows[i] = self._row(batch[i].sample_id, status=ERROR, error=f"lighting measures failed: {e}")
                continue
            for k, (i, _, _, source) in enumerate(members):
                measures = {name: float(found[name][k]) for name in MEASURES}
                rows[i] = self._measured_row(batch[i].sample_id, measures, source)
        return [r for r in rows if r is not None]
