"""Face alignment: Umeyama similarity from 5 landmarks to the 112x112 ArcFace template, warp, one face per image.

Landmark and box coordinates are pixel-index coordinates (the centre of pixel
(i, j) is (x=j, y=i)), the convention of OpenCV's warpAffine and of the
ArcFace template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from models.arrays import require_rgb
from models.geometry import ARCFACE_TEMPLATE, CROP_SIZE, similarity_transform, transform_points, warp
from pipeline.labellers.base import ERROR, NO_FACE, FaceCrop

DETECT, ALREADY_ALIGNED = "detect", "already_aligned"
ALIGN_MODES = (DETECT, ALREADY_ALIGNED)


def choose_face(detections: Sequence[Any]) -> int:
    """Index of the face to keep: highest score x box area (ties: first)."""
    if not detections:
        raise ValueError("choose_face: no detections to choose from")
    keys = []
    for det in detections:
        box = np.asarray(det[0], dtype=np.float64)
        area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
        keys.append(float(det[1]) * area)
    return int(np.argmax(keys))


class AlignStage:
    """Detect, choose one face, align to the ArcFace template; one FaceCrop per input image.

    In `already_aligned` mode (MS1MV2-style 112x112 inputs) nothing is detected
    for alignment: the image is the crop and the template is the alignment.
    The detector still runs on the crop to MEASURE landmarks for the pose
    stage; when it finds nothing, the crop's `landmarks` stay None.
    """

    name = "align"
    version = "1"

    def __init__(self, detector: Any, mode: str = DETECT, size: int = CROP_SIZE) -> None:
        if mode not in ALIGN_MODES:
            raise ValueError(f"unknown alignment mode {mode!r}; choose one of {ALIGN_MODES}")
        self.detector = detector
        self.mode = mode
        self.size = size
        self.template = ARCFACE_TEMPLATE * (size / CROP_SIZE)

    @property
    def detector_name(self) -> str:
        return getattr(self.detector, "name", type(self.detector).__name__) if self.detector is not None else "none"

    @property
    def detector_version(self) -> str:
        return str(getattr(self.detector, "version", "")) if self.detector is not None else ""

    def _detected(self, sample_id: str, image: np.ndarray) -> FaceCrop:
        dets = list(self.detector.detect(image))
        extra: dict[str, Any] = {"n_faces": len(dets), "aligned_mode": DETECT}
        if not dets:
            h, w = image.shape[:2]
            return FaceCrop(sample_id, None, status=NO_FACE, error=f"no face detected in {w}x{h} image", extra=extra)
        box, score, lm = dets[choose_face(dets)]
        matrix = similarity_transform(lm, self.template)
        crop = warp(image, matrix, self.size)
        extra.update(score=float(score), box=np.asarray(box, np.float64), source_landmarks=np.asarray(lm, np.float64),
                     transform=matrix)
        return FaceCrop(sample_id, crop, landmarks=transform_points(lm, matrix), extra=extra)

    def _already_aligned(self, sample_id: str, image: np.ndarray) -> FaceCrop:
        h, w = image.shape[:2]
        extra: dict[str, Any] = {"aligned_mode": ALREADY_ALIGNED, "n_faces": None}
        crop = image
        if (h, w) != (self.size, self.size):
            crop = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
            extra["resized_from"] = [w, h]
        # The alignment IS the template: source -> crop is the resize.
        extra["transform"] = np.array([[self.size / w, 0.0, 0.0], [0.0, self.size / h, 0.0]])
        measured = None
        if self.detector is not None:
            dets = list(self.detector.detect(crop))
            extra["n_faces"] = len(dets)
            if dets:
                box, score, lm = dets[choose_face(dets)]
                measured = np.asarray(lm, np.float64)
                back = np.array([w / self.size, h / self.size])  # crop -> source pixels
                extra.update(score=float(score), box=np.asarray(box, np.float64).reshape(2, 2) * back,
                             source_landmarks=measured * back)
        return FaceCrop(sample_id, np.ascontiguousarray(crop), landmarks=measured, extra=extra)

    def align(self, sample_id: str, image: Any) -> FaceCrop:
        """Align one decoded image; bad input gives an ERROR crop with the reason, never an exception."""
        try:
            img = require_rgb(image)
            if self.mode == ALREADY_ALIGNED:
                return self._already_aligned(sample_id, img)
            if self.detector is None:
                raise ValueError("alignment mode 'detect' needs a detector")
            return self._detected(sample_id, img)
        except (ValueError, cv2.error, RuntimeError) as e:
            return FaceCrop(sample_id, None, status=ERROR, error=f"alignment failed: {type(e).__name__}: {e}",
                            extra={"aligned_mode": self.mode})

    def __call__(self, batch: Sequence[tuple[str, Any]]) -> list[FaceCrop]:
        return [self.align(sid, img) for sid, img in batch]


def _flat(value: Any, n: int) -> list[float] | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    return arr.tolist() if arr.size == n else None


def face_row(face: FaceCrop, *, detector: str, detector_version: str, crop_file: str | None = None,
             crop_index: int | None = None) -> dict[str, Any]:
    """The `faces` manifest row of one aligned (or failed) sample; the crop's status and reason pass through."""
    ex = face.extra
    return {
        "sample_id": face.sample_id,
        "detector": detector,
        "detector_version": detector_version,
        "n_faces": ex.get("n_faces"),
        "score": ex.get("score"),
        "box": _flat(ex.get("box"), 4),
        "landmarks": _flat(ex.get("source_landmarks"), 10),
        "transform": _flat(ex.get("transform"), 6),
        "crop_file": crop_file,
        "crop_index": crop_index,
        "aligned_mode": ex.get("aligned_mode"),
        "status": face.status,
        "error": face.error,
    }
