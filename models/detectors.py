"""Face detectors behind one interface: RGB uint8 image -> list of Detection(box, score, landmarks5).

Backends: MTCNN (our cascade on the facenet-pytorch weights) and insightface
SCRFD from a model-pack directory (the production default when a pack is
present). Coordinates are pixel-index coordinates (pixel centres at integers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from models import onnx_session
from models.arrays import require_rgb
from models.weights import find_pack, insightface_pack


class Detection(NamedTuple):
    """One face: box (x1, y1, x2, y2), detector score, 5 landmarks (left eye, right eye, nose, mouth l/r)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


class Detector(Protocol):
    """What the alignment stage needs from a detector."""

    name: str
    version: str

    def detect(self, image: np.ndarray) -> list[Detection]: ...


class MTCNNDetector:
    """MTCNN backend (the paper's alignment reference).

    Images whose longer side exceeds `max_side` are detected on an area-downscaled
    copy (results mapped back), which bounds time and memory on huge inputs.
    """

    name = "mtcnn"
    version = "facenet-pytorch-2.6.0-weights"

    def __init__(self, min_face_size: float = 20.0, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 weights: dict[str, Path] | None = None, device: str = "cpu", max_side: int = 2048) -> None:
        from models.mtcnn import MTCNN, MTCNNConfig

        if max_side < 48:
            raise ValueError(f"max_side must be >= 48 pixels, got {max_side}")
        self.max_side = max_side
        self.model = MTCNN(MTCNNConfig(min_face_size=min_face_size, thresholds=thresholds), weights, device)

    def detect(self, image: np.ndarray) -> list[Detection]:
        image = require_rgb(image, "detector input")
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            import cv2

            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            sx, sy = size[0] / w, size[1] / h
        res = self.model.detect(image)
        # Boxes come in the reference's 1-based arithmetic: shift the top-left corner to 0-based.
        out = []
        for b, s, lm in zip(res.boxes, res.scores, res.landmarks, strict=True):
            box, pts = (b - np.array([1, 1, 0, 0], np.float32)).astype(np.float64), lm.astype(np.float64)
            if scale < 1.0:  # pixel-index coordinates: centres map as (x + 0.5) / s - 0.5
                box = (box.reshape(2, 2) + 0.5) / np.array([sx, sy]) - 0.5
                pts = (pts + 0.5) / np.array([sx, sy]) - 0.5
            out.append(Detection(box.reshape(4), float(s), pts))
        return out


def _pack_file(pack_dir: Path, pattern: str, what: str) -> Path:
    hits = sorted(pack_dir.glob(pattern))
    if not hits:
        raise FileNotFoundError(f"model pack {pack_dir} has no {what} ({pattern})")
    return hits[0]


class SCRFDDetector:
    """insightface SCRFD (e.g. buffalo_l det_10g.onnx) from a pack directory or an .onnx path."""

    name = "scrfd"

    def __init__(self, model: str | os.PathLike[str] = "buffalo_l", det_size: tuple[int, int] = (640, 640),
                 det_thresh: float = 0.5, device: str = "cpu") -> None:
        try:
            from insightface.model_zoo.scrfd import SCRFD
        except ImportError as e:
            raise RuntimeError("the SCRFD detector needs the 'insightface' package: pip install insightface") from e
        path = Path(model).expanduser()
        onnx_file = path if path.suffix == ".onnx" and path.is_file() else _pack_file(
            insightface_pack(model), "det_*.onnx", "SCRFD detector")
        session = onnx_session.open_session(onnx_file, device=device, what="SCRFD detector")
        self.model = SCRFD(model_file=str(onnx_file), session=session)
        self.model.prepare(-1 if device == "cpu" else 0, input_size=det_size, det_thresh=det_thresh)
        self.version = onnx_file.name
        self.det_size = det_size

    def detect(self, image: np.ndarray) -> list[Detection]:
        # insightface models read BGR, like cv2
        bgr = np.ascontiguousarray(require_rgb(image, "detector input")[:, :, ::-1])
        det, kps = self.model.detect(bgr, input_size=self.det_size)
        if kps is None:
            raise RuntimeError(f"SCRFD model {self.version} predicts no landmarks; alignment needs a *kps model")
        return [Detection(d[:4].astype(np.float64), float(d[4]), k.astype(np.float64))
                for d, k in zip(det, kps, strict=True)]


DETECTORS = ("auto", "mtcnn", "scrfd")


def make_detector(kind: str = "auto", pack: str | os.PathLike[str] = "buffalo_l", device: str = "cpu",
                  **kwargs: Any) -> Detector:
    """Build a detector by name; 'auto' is SCRFD when the insightface pack is present, else MTCNN."""
    if kind == "auto":
        kind = "scrfd" if find_pack(pack) is not None else "mtcnn"
    if kind == "mtcnn":
        return MTCNNDetector(device=device, **kwargs)
    if kind == "scrfd":
        return SCRFDDetector(pack, device=device, **kwargs)
    raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
