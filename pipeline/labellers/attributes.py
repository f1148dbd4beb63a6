"""Occlusion / expression / lighting: WIDER FACE training crops and targets, and the label stage.

Training crops follow the labelling input as closely as the data allows: an
ArcFace-aligned 112x112 crop when a detector finds a face whose five landmarks
lie inside the annotated box, else a square crop of the box with a margin.
The label stage runs a checkpoint of `models.attributes` on aligned crops and
returns one `factors` row per sample and attribute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from data_manifest.vocabulary import binary_class
from models import geometry
from models.attributes import HEADS, AttributeNet, load_checkpoint, predict_proba, to_input
from models.detectors import Detection, Detector
from models.fast_forward import AUTO, TORCH, TORCHSCRIPT, FastForward, batched, resolve_backend
from pipeline.labellers import align
from pipeline.labellers.base import ERROR, OK, FaceCrop, factor_row, split_usable
from pipeline.readers.wider import WiderFace

CROP_SIZE = geometry.CROP_SIZE
DEFAULT_MARGIN = 0.15  # box crop: extra context on each side, as a fraction of the box's longer side
MIN_LANDMARK_IOU = 0.3  # a detection is matched to a WIDER box only above this IoU
CPU_FORWARD_BATCH = 8  # on CPU the stage forwards its batch in chunks this size: ~3x faster than 256 at once
# Measured fastest on one core (benchmarks/attributes.py): ~1.7x eager torch; onnxruntime is slower than eager
# torch on MobileFaceNet (its PReLU runs unfused, between layout reorders).
CPU_BACKEND = TORCHSCRIPT
ALIGNED = "aligned"
BOX = "box"


def wider_targets(face: WiderFace) -> np.ndarray:
    """Targets in HEADS order: obstructed (occlusion 1/2), exaggerated (expression 1), extreme (illumination 1)."""
    rule = {
        "occlusion": face.occlusion in (1, 2),
        "expression": face.expression == 1,
        "lighting": face.illumination == 1,
    }
    return np.array([rule[h] for h in HEADS], dtype=np.float32)


@dataclass
class TrainingCrop:
    """One training crop and how it was made."""

    crop: np.ndarray  # (112, 112, 3) uint8 RGB
    method: str  # ALIGNED | BOX
    transform: np.ndarray  # (2, 3) float: source pixels -> crop pixels
    landmarks: np.ndarray | None = None  # (5, 2) in source pixels when aligned
    score: float | None = None  # detector score when aligned


def box_transform(
    box: tuple[float, float, float, float], margin: float = DEFAULT_MARGIN, size: int = CROP_SIZE
) -> np.ndarray:
    """2x3 matrix: source pixels -> a square size x size crop centred on box (x, y, w, h), with margin.

    Pixel-index coordinates (pixel centres at integers), as `pipeline.labellers.align`:
    the box covers pixels x .. x + w - 1, its centre maps to the crop centre.
    """
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"box {box} has no area")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    scale = size / (max(w, h) * (1.0 + 2.0 * margin))
    cx, cy, c = x + (w - 1) / 2.0, y + (h - 1) / 2.0, (size - 1) / 2.0
    return np.array([[scale, 0.0, c - scale * cx], [0.0, scale, c - scale * cy]], dtype=np.float64)


def antialiased_warp(image: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """`models.geometry.warp`, after area-downsampling the source when the crop shrinks it by over 1.5x.

    WIDER faces can be several hundred pixels wide; bilinear warping straight
    to 112x112 would alias. The matrix is adjusted to the downsampled source.
    """
    m = np.asarray(matrix, dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    src = image
    if scale < 1 / 1.5:
        factor = int(np.floor(1.0 / scale))
        h, w = image.shape[:2]
        small = (max(1, round(w / factor)), max(1, round(h / factor)))
        src = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
        sx, sy = small[0] / w, small[1] / h
        # A source pixel centre x maps to (x + 0.5) * sx - 0.5 in the downsampled image.
        adj = m.copy()
        adj[:, 0] = m[:, 0] / sx
        adj[:, 1] = m[:, 1] / sy
        adj[:, 2] = m[:, 2] + m[:, 0] * (0.5 / sx - 0.5) + m[:, 1] * (0.5 / sy - 0.5)
        m = adj
    return geometry.warp(np.ascontiguousarray(src), m, size)


def box_crop(image: np.ndarray, box: tuple[float, float, float, float], margin: float = DEFAULT_MARGIN) -> TrainingCrop:
    """Square crop of a WIDER box with margin, resized to 112x112."""
    m = box_transform(box, margin)
    return TrainingCrop(antialiased_warp(image, m), BOX, m)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_detection(detections: list[Detection], box: tuple[float, float, float, float]) -> int | None:
    """Index of the best-scoring detection whose 5 landmarks all lie inside `box` (x, y, w, h)
    and whose box overlaps it (IoU >= MIN_LANDMARK_IOU), or None."""
    x, y, w, h = (float(v) for v in box)
    target = np.array([x, y, x + w - 1, y + h - 1])
    best, best_score = None, -np.inf
    for i, det in enumerate(detections):
        pts = np.asarray(det.landmarks, dtype=np.float64).reshape(5, 2)
        inside = (pts >= target[:2]).all(axis=1) & (pts <= target[2:]).all(axis=1)
        if inside.all() and _iou(np.asarray(det.box, dtype=np.float64), target) >= MIN_LANDMARK_IOU:
            if det.score > best_score:
                best, best_score = i, float(det.score)
    return best


def training_crop(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    *,
    detector: Detector | None = None,
    margin: float = DEFAULT_MARGIN,
    context: float = 0.5,
) -> TrainingCrop:
    """Aligned crop when `detector` finds landmarks inside the box, else the square box crop.

    The detector sees only the box enlarged by `context` on each side (fast on
    crowded WIDER images); its coordinates are mapped back to the source.
    """
    if detector is None:
        return box_crop(image, box, margin)
    x, y, w, h = (float(v) for v in box)
    hgt, wid = image.shape[:2]
    x0, y0 = int(max(0, np.floor(x - context * w))), int(max(0, np.floor(y - context * h)))
    x1, y1 = int(min(wid, np.ceil(x + w + context * w))), int(min(hgt, np.ceil(y + h + context * h)))
    if x1 - x0 < 12 or y1 - y0 < 12:
        return box_crop(image, box, margin)
    offset = np.array([x0, y0], dtype=np.float64)
    found = [
        Detection(np.asarray(d.box, np.float64) + np.r_[offset, offset], float(d.score),
                  np.asarray(d.landmarks, np.float64).reshape(5, 2) + offset)
        for d in detector.detect(np.ascontiguousarray(image[y0:y1, x0:x1]))
    ]
    i = match_detection(found, box)
    if i is None:
        return box_crop(image, box, margin)
    m = geometry.similarity_transform(found[i].landmarks)
    return TrainingCrop(antialiased_warp(image, m), ALIGNED, m, landmarks=found[i].landmarks.astype(np.float32),
                        score=found[i].score)


WIDER_DATASET = "wider_face"
WIDER_GT_LABELLER, WIDER_GT_LABELLER_VERSION = "wider_face_gt", "1"
BOX_CROPPER, BOX_CROPPER_VERSION = "wider_box", "1"  # the faces-row "detector" of crops made without a detector


def wider_face_key(rel: str, box: tuple[int, int, int, int], seen: dict[str, int]) -> str:
    """Stable key of a face within the dataset: image path and box (a repeated box gets a ~n suffix)."""
    key = f"{rel}#{box[0]},{box[1]},{box[2]},{box[3]}"
    n = seen.get(key, 0)
    seen[key] = n + 1
    return key if n == 0 else f"{key}~{n}"


def _read_image(path: Path) -> tuple[Any, str, str | None]:
    """(DecodedImage or None, status, error) for one source image."""
    from pipeline import images

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, images.MISSING, f"image file {path} does not exist"
    except OSError as e:
        return None, images.UNREADABLE, f"cannot read {path}: {e}"
    dec = images.decode(data)
    return dec, dec.status, dec.error if dec.status != images.OK else None


@dataclass
class WiderRows:
    """One shard of WIDER faces as manifest rows plus the crops to pack (faces rows index into `crops`)."""

    samples: list[dict[str, Any]]
    faces: list[dict[str, Any]]
    factors: list[dict[str, Any]]
    crops: list[np.ndarray]
    counts: dict[str, int]


def wider_rows(items: list[tuple[str, Any]], images_dirs: dict[str, str], *, detector: Detector | None = None,
               margin: float = DEFAULT_MARGIN) -> WiderRows:
    """`samples`, `faces` and ground-truth `factors` rows and training crops of (split, WiderImage) items.

    Every annotated face gets a sample row (dataset ``wider_face/<split>``), a faces row (aligned when the
    detector finds its landmarks, else a box crop; or the reason there is no crop) and one factor row per
    attribute head with the WIDER target (labeller ``wider_face_gt``).
    """
    from pipeline import images as img
    from pipeline.ids import sample_id

    samples, faces, factors, packed = [], [], [], []
    counts = {"images": 0, "faces": 0, "crops": 0, "aligned": 0, "box": 0, "failed": 0}
    for split, rec in items:
        counts["images"] += 1
        path = Path(images_dirs[split]) / rec.path
        decoded, status, error = (None, None, None) if not rec.faces else _read_image(path)
        seen: dict[str, int] = {}
        dataset = f"{WIDER_DATASET}/{split}"
        for face in rec.faces:
            counts["faces"] += 1
            key = wider_face_key(rec.path, face.box, seen)
            sid = sample_id(dataset, key)
            crop = None
            if status == img.OK:
                try:
                    crop = training_crop(decoded.rgb, face.box, detector=detector, margin=margin)
                except (ValueError, np.linalg.LinAlgError) as e:
                    status_f, error_f = ERROR, f"crop failed for box {face.box}: {e}"
                else:
                    status_f, error_f = OK, None
            else:
                status_f, error_f = status, error
            samples.append({
                "sample_id": sid, "dataset": dataset, "source_kind": "wider", "source": f"{path}#{key.split('#')[1]}",
                "identity": -1, "width": getattr(decoded, "width", None), "height": getattr(decoded, "height", None),
                "channels": 3 if status == img.OK else None, "format": getattr(decoded, "format", None),
                "status": status, "error": error,
            })
            x, y, w, h = face.box
            row = {"sample_id": sid, "n_faces": 1, "box": [x, y, x + w - 1, y + h - 1], "status": status_f,
                   "error": error_f, "detector": detector.name if detector is not None else BOX_CROPPER,
                   "detector_version": detector.version if detector is not None else BOX_CROPPER_VERSION}
            if crop is not None:
                row.update(transform=crop.transform.reshape(-1).tolist(), crop_index=len(packed),
                           aligned_mode=align.DETECT if crop.method == ALIGNED else "box", score=crop.score,
                           landmarks=None if crop.landmarks is None else crop.landmarks.reshape(-1).tolist())
                packed.append(crop.crop)
                counts["crops"] += 1
                counts["aligned" if crop.method == ALIGNED else "box"] += 1
            else:
                counts["failed"] += 1
            faces.append(row)
            target = wider_targets(face)
            for h_i, factor in enumerate(HEADS):
                value = float(target[h_i])
                factors.append(factor_row(sid, factor, labeller=WIDER_GT_LABELLER,
                                          labeller_version=WIDER_GT_LABELLER_VERSION, value=value,
                                          decision=binary_class(factor, value),
                                          details={"split": split, "wider": face.attributes()}))
    return WiderRows(samples, faces, factors, packed, counts)


def split_calibration(images: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out for threshold calibration, whole source images at a time."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    unique = sorted(set(images))
    rng = np.random.default_rng(seed)
    n_cal = int(round(fraction * len(unique)))
    held = set(rng.permutation(len(unique))[:n_cal].tolist())
    held_names = {unique[i] for i in held}
    return np.array([im in held_names for im in images], dtype=bool)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint path as given, or a name in the model store's `attributes/` folder."""
    direct = Path(path).expanduser()
    if direct.is_file():
        return direct
    from models.weights import MissingWeightsError, models_dir

    stored = models_dir() / "attributes" / str(path)
    if stored.is_file():
        return stored
    raise MissingWeightsError(
        f"attribute checkpoint {str(path)!r} not found (tried {direct} and {stored}); "
        "train one with `fiqa train-attributes` or pass the path of a checkpoint file"
    )


class AttributeProbabilities(nn.Module):
    """Adverse-class probabilities (N, 3) of an AttributeNet for normalised input: the exported forward."""

    def __init__(self, model: AttributeNet) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


class AttributeStage:
    """Label stage "attributes": per crop the adverse-class probability, class and model id of each head."""

    name = "attributes"

    def __init__(
        self,
        checkpoint_path: str | os.PathLike[str],
        device: str = "cpu",
        batch_size: int = 256,
        *,
        forward_batch: int | None = None,
        backend: str = AUTO,
    ) -> None:
        """`batch_size`: crops per call of the stage; `forward_batch`: crops per network forward
        (default: CPU_FORWARD_BATCH on CPU, `batch_size` on an accelerator). Results do not depend on either.
        `backend`: `auto` (CPU_BACKEND on CPU, eager torch elsewhere), `torch`, `onnx` or `torchscript`
        (the last two CPU only, checked against eager torch when built)."""
        if batch_size < 1 or (forward_batch is not None and forward_batch < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size} forward_batch={forward_batch}")
        self.checkpoint_path = resolve_checkpoint(checkpoint_path)
        self.device = device
        self.batch_size = batch_size
        on_cpu = str(device).startswith("cpu")
        self.forward_batch = forward_batch or (min(batch_size, CPU_FORWARD_BATCH) if on_cpu else batch_size)
        self.backend = resolve_backend(backend, device, CPU_BACKEND)
        self.checkpoint = load_checkpoint(self.checkpoint_path, device)
        size = self.checkpoint.model.config.input_size
        self.fast = (None if self.backend == TORCH else
                     FastForward(AttributeProbabilities(self.checkpoint.model), (3, size, size), self.backend))
        self.labeller = self.checkpoint.model_id
        self.version = self.checkpoint.version
        self.thresholds = self.checkpoint.thresholds

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Adverse-class probabilities (N, 3) in HEADS order for uint8 RGB crops (N, H, W, 3)."""
        if self.fast is not None and len(crops):
            fast, size = self.fast, self.checkpoint.model.config.input_size
            return batched(lambda c: fast(to_input(c, "cpu", size).numpy()), np.asarray(crops), self.forward_batch)
        return predict_proba(self.checkpoint.model, crops, batch_size=self.forward_batch, device=self.device)

    def _row(self, sample_id: str, factor: str, **kwargs: Any) -> dict[str, Any]:
        return factor_row(sample_id, factor, labeller=self.labeller, labeller_version=self.version, **kwargs)

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        """One factors row per (crop, head); unusable crops get rows with their status and reason."""
        usable, failed = split_usable(batch, CROP_SIZE)
        probs = self.probabilities(np.stack([batch[i].crop for i in usable])) if usable else np.empty((0, 3))
        prob_of = {i: probs[k] for k, i in enumerate(usable)}
        rows: list[dict[str, Any]] = []
        for i, rec in enumerate(batch):
            for h, factor in enumerate(HEADS):
                threshold = self.thresholds[factor]
                if i in failed:
                    status, error = failed[i]
                    rows.append(self._row(rec.sample_id, factor, thresholds={"probability": threshold},
                                          status=status, error=error))
                    continue
                p = float(prob_of[i][h])
                if not np.isfinite(p):
                    rows.append(self._row(rec.sample_id, factor, thresholds={"probability": threshold},
                                          status=ERROR, error=f"non-finite {factor} probability {p}"))
                    continue
                rows.append(self._row(
                    rec.sample_id,
                    factor,
                    value=p,
                    decision=binary_class(factor, p, threshold),
                    thresholds={"probability": threshold},
                    details={"checkpoint": self.checkpoint_path.name},
                ))
        return rows
