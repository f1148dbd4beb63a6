"""Head pose: the yaw/pitch/roll convention, rotation <-> angles, and the pose label stage.

Sign convention (degrees, camera looking at the subject; OpenCV camera axes
x right, y down, z forward, and a head frame that coincides with them for a
frontal face):
- yaw > 0: the face turns toward the image's right (the nose moves right; the
  subject turns to their own left). A horizontal flip negates yaw.
- pitch > 0: the face tilts up (the nose moves up in the image).
- roll > 0: in-plane rotation clockwise as seen in the image.
The head-to-camera rotation is R = Rz(roll) @ Rx(-pitch) @ Ry(-yaw), with Rx,
Ry, Rz the right-handed elementary rotations about the camera axes.
Only |yaw| decides the pose class (paper Sec. 4.1: faces are already aligned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.factors import POSE_THRESHOLDS, pose_class
from pipeline.records import ERROR, OK, FaceCrop, factor_row


@dataclass(frozen=True)
class HeadPose:
    """Yaw, pitch, roll in degrees (convention in the module docstring) and how they were measured."""

    yaw: float
    pitch: float
    roll: float
    details: dict[str, Any] = field(default_factory=dict)


class PoseBackend(Protocol):
    """Estimates head pose on an aligned crop, using measured 5 landmarks (crop pixels) when given."""

    name: str
    version: str

    def estimate(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> HeadPose: ...


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-to-camera rotation for angles in degrees (the module's convention)."""
    y, p, r = (math.radians(v) for v in (yaw, pitch, roll))
    return _rz(r) @ _rx(-p) @ _ry(-y)


def angles_from_rotation(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a head-to-camera rotation (inverse of rotation_from_angles)."""
    m = np.asarray(rot, dtype=np.float64)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"expected a finite 3x3 rotation matrix, got shape {m.shape}")
    # R = Rz(c) Rx(b) Ry(a) has last row (-cos b sin a, sin b, cos b cos a) and column 1 (-sin c cos b, cos c cos b, .).
    b = math.asin(max(-1.0, min(1.0, m[2, 1])))
    a = math.atan2(-m[2, 0], m[2, 2])
    c = math.atan2(-m[0, 1], m[1, 1])
    return -math.degrees(a), -math.degrees(b), math.degrees(c)


class PoseStage:
    """Label stage: one `pose` factors row per crop, value = yaw in degrees, class by |yaw| thresholds."""

    name = "pose"

    def __init__(self, backend: PoseBackend, thresholds: tuple[float, float] = POSE_THRESHOLDS) -> None:
        pose_class(0.0, thresholds)  # validates the thresholds before any work
        self.backend = backend
        self.thresholds = (float(thresholds[0]), float(thresholds[1]))
        self.labeller = f"pose/{backend.name}"
        self.version = str(backend.version)

    def label(self, face: FaceCrop) -> dict[str, Any]:
        """The factors row of one crop; failures become rows with a status and reason."""
        common = {"labeller": self.labeller, "labeller_version": self.version, "thresholds": list(self.thresholds)}
        if face.status != OK:
            return factor_row(face.sample_id, "pose", status=face.status,
                              error=face.error or f"no crop (status {face.status})", **common)
        if face.crop is None:
            return factor_row(face.sample_id, "pose", status=ERROR, error="crop is missing although status is ok",
                              **common)
        try:
            pose = self.backend.estimate(face.crop, face.landmarks)
            decision = pose_class(pose.yaw, self.thresholds)
        except (ValueError, RuntimeError) as e:
            return factor_row(face.sample_id, "pose", status=ERROR, error=f"{type(e).__name__}: {e}", **common)
        details = {"yaw": pose.yaw, "pitch": pose.pitch, "roll": pose.roll, **pose.details}
        return factor_row(face.sample_id, "pose", value=pose.yaw, decision=decision, details=details, **common)

    def __call__(self, batch: Sequence[FaceCrop]) -> list[dict[str, Any]]:
        return [self.label(face) for face in batch]
