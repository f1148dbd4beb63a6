"""Face geometry shared by every layer: the 112x112 ArcFace template and crop, similarity transforms, and the
head-pose angle convention.

Landmark and box coordinates are pixel-index coordinates (the centre of pixel
(i, j) is (x=j, y=i)), the convention of OpenCV's warpAffine and of the
ArcFace template.

Head-pose sign convention (degrees, camera looking at the subject; OpenCV camera
axes x right, y down, z forward, and a head frame that coincides with them for a
frontal face):
- yaw > 0: the face turns toward the image's right (the nose moves right; the
  subject turns to their own left). A horizontal flip negates yaw.
- pitch > 0: the face tilts up (the nose moves up in the image).
- roll > 0: in-plane rotation clockwise as seen in the image.
The head-to-camera rotation is R = Rz(roll) @ Rx(-pitch) @ Ry(-yaw), with Rx,
Ry, Rz the right-handed elementary rotations about the camera axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

CROP_SIZE = 112  # the aligned ArcFace crop side every label stage reads

# ArcFace 112x112 template: left eye, right eye, nose tip, left mouth corner, right mouth corner (image left/right).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def check_points(points: Any, what: str = "landmarks") -> np.ndarray:
    """5 finite (x, y) points as a (5, 2) float64 array, or a ValueError naming `what`."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.shape != (5, 2):
        raise ValueError(f"{what} must be 5 (x, y) points of shape (5, 2), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain non-finite values: {arr.tolist()}")
    return arr


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst, as a 3x3 matrix.

    Umeyama (1991), "Least-squares estimation of transformation parameters
    between two point patterns", eq. 34-43; reflections are excluded.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / n
    if var_s <= 1e-12:
        raise ValueError(f"degenerate landmarks (all points coincide): {src.tolist()}")
    cov = d_c.T @ s_c / n
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    out = np.eye(dim + 1)
    out[:dim, :dim] = scale * rot
    out[:dim, dim] = mu_d - scale * rot @ mu_s
    return out


def similarity_transform(landmarks5: Any, template: Any = ARCFACE_TEMPLATE) -> np.ndarray:
    """The 2x3 similarity matrix mapping the 5 landmarks onto the template (Umeyama least squares, not RANSAC)."""
    src = check_points(landmarks5, "landmarks")
    dst = check_points(template, "template")
    return umeyama(src, dst)[:2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Apply a 2x3 transform to an RGB uint8 image: a (size, size, 3) crop, black outside the source."""
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 2x3 affine matrix."""
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]



@dataclass(frozen=True)
class HeadPose:
    """Yaw, pitch, roll in degrees (convention in the module docstring) and how they were measured."""

    yaw: float
    pitch: float
    roll: float
    details: dict[str, Any] = field(default_factory=dict)


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

