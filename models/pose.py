"""Head-pose backends: dlib 68 landmarks + solvePnP, insightface 1k3d68, and a 5-landmark geometric estimate.

All return models.geometry.HeadPose in the convention documented there. The
generic 3D face is the 68-point mean shape shipped in the insightface package
(data/objects/meanshape_68.pkl), read with a restricted unpickler.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import onnx_session
from models.geometry import (
    ARCFACE_TEMPLATE,
    HeadPose,
    angles_from_rotation,
    similarity_transform,
    transform_points,
    umeyama,
)
from models.safe_pickle import RestrictedUnpickler
from models.shape_predictor import ShapePredictor
from models.weights import dlib_model, insightface_pack

# 68-point indices of the 5 alignment landmarks: eye centres, nose tip, mouth corners.
LEFT_EYE_68 = tuple(range(36, 42))
RIGHT_EYE_68 = tuple(range(42, 48))
NOSE_TIP_68, MOUTH_LEFT_68, MOUTH_RIGHT_68 = 30, 48, 54
# dlib's frontal-face box in ArcFace-template coordinates (centre x, centre y, side), measured on package faces.
DLIB_BOX_IN_TEMPLATE = (56.0, 70.0, 84.0)


# Globals a pickled numpy array needs, and nothing else (models.safe_pickle refuses every other one).
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


def _exp_so3(w: np.ndarray) -> np.ndarray:
    """Rotation matrices exp([w]x) of (N, 3) rotation vectors (Rodrigues' formula)."""
    theta = np.linalg.norm(w, axis=1)[:, None, None]
    z = np.zeros(len(w))
    k = np.stack([z, -w[:, 2], w[:, 1], w[:, 2], z, -w[:, 0], -w[:, 1], w[:, 0], z], axis=1).reshape(-1, 3, 3)
    small = theta < 1e-8
    safe = np.where(small, 1.0, theta)
    a = np.where(small, 1.0 - theta**2 / 6, np.sin(safe) / safe)
    b = np.where(small, 0.5 - theta**2 / 24, (1 - np.cos(safe)) / safe**2)
    return np.eye(3) + a * k + b * (k @ k)


def _residuals(model_t: np.ndarray, rot: np.ndarray, t: np.ndarray, k: np.ndarray, points: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The rotated model (N, P, 3) and the pixel residuals (N, P, 2) of projecting it at translation t."""
    rotated = (rot @ model_t).transpose(0, 2, 1)
    cam = rotated + t[:, None, :]
    res = cam[..., :2] / cam[..., 2:]
    res *= (k[0, 0], k[1, 1])
    res += (k[0, 2], k[1, 2])
    res -= points
    return rotated, res


def refine_pnp(model: np.ndarray, points: np.ndarray, rot: np.ndarray, t: np.ndarray, k: np.ndarray,
               max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on the reprojection error of N poses at once: (rotations, translations, cost).

    The objective of cv2.solvePnP's SOLVEPNP_ITERATIVE (sum of squared pixel
    residuals, pinhole K, no distortion), minimised for a whole batch with
    numpy; the rotation is updated as R <- exp([w]x) R. A pose stops when its
    step falls below `tol` (radians and model units) or its damping saturates.
    """
    rot, t = np.array(rot, dtype=np.float64), np.array(t, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    model_t = np.ascontiguousarray(np.asarray(model, dtype=np.float64).T)
    fx, fy = k[0, 0], k[1, 1]
    rotated, res = _residuals(model_t, rot, t, k, pts)
    cost = np.einsum("npk,npk->n", res, res)
    lam = np.full(len(pts), 1e-3)
    active = np.isfinite(cost)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        w, r, tt = rotated[idx], res[idx], t[idx]
        cam = w + tt[:, None, :]
        iz = 1.0 / cam[..., 2]
        x, y = cam[..., 0] * iz, cam[..., 1] * iz  # normalised image coordinates
        jac = np.empty(cam.shape[:2] + (2, 6))  # d(u, v) / d(rotation vector, translation), left perturbation
        jac[..., 0, 0] = -fx * x * w[..., 1] * iz
        jac[..., 0, 1] = fx * (w[..., 2] + x * w[..., 0]) * iz
        jac[..., 0, 2] = -fx * w[..., 1] * iz
        jac[..., 0, 3] = fx * iz
        jac[..., 0, 4] = 0.0
        jac[..., 0, 5] = -fx * x * iz
        jac[..., 1, 0] = -fy * (w[..., 2] + y * w[..., 1]) * iz
        jac[..., 1, 1] = fy * y * w[..., 0] * iz
        jac[..., 1, 2] = fy * w[..., 0] * iz
        jac[..., 1, 3] = 0.0
        jac[..., 1, 4] = fy * iz
        jac[..., 1, 5] = -fy * y * iz
        jac = jac.reshape(len(idx), -1, 6)
        jt = jac.transpose(0, 2, 1)
        hess = jt @ jac
        grad = (jt @ r.reshape(len(idx), -1, 1))[..., 0]
        diag = np.einsum("nii->ni", hess)
        damped = hess + (lam[idx, None] * diag)[:, :, None] * np.eye(6)
        step = -np.linalg.solve(damped, grad[..., None])[..., 0]
        new_rot = _exp_so3(step[:, :3]) @ rot[idx]
        new_t = tt + step[:, 3:]
        new_rotated, new_res = _residuals(model_t, new_rot, new_t, k, pts[idx])
        new_cost = np.einsum("npk,npk->n", new_res, new_res)
        better = (new_cost <= cost[idx]) & np.isfinite(new_cost)
        b = idx[better]
        rot[b], t[b], cost[b] = new_rot[better], new_t[better], new_cost[better]
        rotated[b], res[b] = new_rotated[better], new_res[better]
        lam[idx] = np.where(better, np.maximum(lam[idx] / 10, 1e-12), lam[idx] * 10)
        active[idx] = (np.abs(step).max(axis=1) > tol) & (lam[idx] < 1e12)
    return rot, t, cost


def solve_pnp_batch(image_points: np.ndarray, model_points: np.ndarray, width: int, height: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """Head-to-camera poses fitting model_points (head frame) to N sets of image points.

    cv2.solvePnP with SQPnP (a global solver) starts each pose; `refine_pnp`
    then minimises the reprojection error of all of them at once, the objective
    of solvePnP's iterative refinement. Returns rotations (N, 3, 3),
    translations (N, 3), reprojection RMS in pixels (N,) and per pose None or
    the reason it has none (its rows of the arrays are then NaN).
    """
    img = np.asarray(image_points, dtype=np.float64)
    obj = np.ascontiguousarray(model_points, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 2 or obj.ndim != 2 or obj.shape[1] != 3 or img.shape[1] != len(obj) \
            or len(obj) < 6:
        raise ValueError(f"solvePnP needs >= 6 matching points, got image points {img.shape} and model points "
                         f"{obj.shape}")
    n = len(img)
    k = camera_matrix(width, height)
    rot, t = np.full((n, 3, 3), np.nan), np.full((n, 3), np.nan)
    errors: list[str | None] = [None] * n
    for i in range(n):
        if not np.isfinite(img[i]).all():
            errors[i] = "solvePnP: image points are not finite"
            continue
        ok, rvec, tvec = cv2.solvePnP(obj.reshape(-1, 1, 3), img[i].reshape(-1, 1, 2), k, None,
                                      flags=cv2.SOLVEPNP_SQPNP)
        if not ok:
            errors[i] = "solvePnP found no pose"
            continue
        rot[i], t[i] = cv2.Rodrigues(rvec)[0], tvec[:, 0]
    rms = np.full(n, np.nan)
    good = np.array([e is None for e in errors])
    if good.any():
        r, tt, cost = refine_pnp(obj, img[good], rot[good], t[good], k)
        rot[good], t[good], rms[good] = r, tt, np.sqrt(cost / len(obj))
    for i in np.flatnonzero(good):
        if not (np.isfinite(rot[i]).all() and t[i, 2] > 0):
            errors[i] = "solvePnP found no pose in front of the camera"
            rot[i], t[i], rms[i] = np.nan, np.nan, np.nan
    return rot, t, rms, errors


def solve_pnp_rotation(image_points: np.ndarray, model_points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Head-to-camera rotation fitting model_points (head frame) to one set of image points (see solve_pnp_batch)."""
    img = np.asarray(image_points, dtype=np.float64)
    rot, _, _, errors = solve_pnp_batch(img.reshape(1, -1, 2), model_points, width, height)
    if errors[0]:
        raise (ValueError if "finite" in errors[0] else RuntimeError)(errors[0])
    return rot[0]


def pnp_poses(image_points68: np.ndarray, width: int, height: int) -> list[HeadPose | Exception]:
    """Poses of N faces from their 68 2D landmarks and the generic 3D face (an exception where none is found)."""
    rot, _, rms, errors = solve_pnp_batch(image_points68, generic_face_68(), width, height)
    out: list[HeadPose | Exception] = []
    for r, e, err in zip(rot, rms, errors, strict=True):
        if err:
            out.append((ValueError if "finite" in err else RuntimeError)(err))
            continue
        yaw, pitch, roll = angles_from_rotation(r)
        out.append(HeadPose(yaw, pitch, roll, {"method": "solvepnp-68", "reprojection_rms_px": float(e)}))
    return out


def pnp_pose(image_points68: np.ndarray, width: int, height: int) -> HeadPose:
    """Pose of a face from its 68 2D landmarks and the generic 3D face."""
    pose = pnp_poses(np.asarray(image_points68, dtype=np.float64).reshape(1, -1, 2), width, height)[0]
    if isinstance(pose, Exception):
        raise pose
    return pose


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


def mirror_landmarks5(landmarks5: np.ndarray, width: int) -> np.ndarray:
    """The 5 landmarks of the horizontally mirrored crop: x -> width - 1 - x, left and right swapped."""
    m = np.array(landmarks5, dtype=np.float64).reshape(5, 2)
    m[:, 0] = width - 1 - m[:, 0]
    return m[[1, 0, 2, 4, 3]]


def equalized_gray(crop: np.ndarray) -> np.ndarray:
    """The crop's luminance with its histogram equalised: global light and exposure taken out."""
    arr = np.asarray(crop)
    gray = arr if arr.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    return cv2.equalizeHist(np.ascontiguousarray(gray))


def mirror_average(pose: HeadPose | Exception, mirrored: HeadPose | Exception) -> HeadPose | Exception:
    """One pose from the estimates on a crop and on its mirror image (yaw and roll change sign, pitch does not).

    The average is exactly antisymmetric under a flip of the crop; half the two yaws' disagreement is kept as
    `yaw_disagreement`, a measure of how far the landmarks can be trusted. With one estimate missing, the other.
    """
    if isinstance(pose, Exception) or isinstance(mirrored, Exception):
        if isinstance(pose, Exception) and isinstance(mirrored, Exception):
            return pose
        one = mirrored if isinstance(pose, Exception) else pose
        sign = -1.0 if one is mirrored else 1.0
        return HeadPose(sign * one.yaw, one.pitch, sign * one.roll, {**one.details, "mirror": "one view only"})
    details = {k: v for k, v in pose.details.items() if k != "reprojection_rms_px"}
    details.update(yaw_disagreement=abs(pose.yaw + mirrored.yaw) / 2, yaw_direct=pose.yaw,
                   yaw_mirrored=-mirrored.yaw, mirror="averaged",
                   reprojection_rms_px=max(pose.details["reprojection_rms_px"],
                                           mirrored.details["reprojection_rms_px"]))
    return HeadPose((pose.yaw - mirrored.yaw) / 2, (pose.pitch + mirrored.pitch) / 2,
                    (pose.roll - mirrored.roll) / 2, details)


SPREAD_SHIFT = 0.05  # `yaw_spread_batch`: the predictor's start box moved up and down by this fraction of its height


class DlibPnPPose:
    """dlib's 68-point shape predictor on the crop + a PnP fit to the generic 3D face (the authors' method).

    The predictor's cascade runs batched (models.shape_predictor: numpy, or its
    compiled level function where a C compiler is found; the same landmarks as
    dlib either way); the PnP fits of a batch are refined together.
    `invariant` (the default): the predictor reads the crop's histogram-equalised luminance, and the pose
    is the average of the estimates on the crop and on its mirror image, so that light, exposure and
    noise of the landmarks move the yaw less (docs/DIFFERENCES.md); `invariant=False` is the plain method.
    """

    name = "dlib68-pnp"

    def __init__(self, predictor_path: str | os.PathLike[str] | None = None, invariant: bool = True) -> None:
        path = Path(predictor_path) if predictor_path else dlib_model("shape_predictor_68_face_landmarks.dat")
        self.predictor = ShapePredictor.from_file(path)
        self.invariant = invariant
        self.version = "dlib-68pt+insightface-meanshape68" + ("+equalized-mirrored" if invariant else "")

    @staticmethod
    def _box(landmarks5: np.ndarray | None) -> list[int]:
        return [int(round(v)) for v in dlib_box(landmarks5)]

    def landmarks68_batch(self, crops: Sequence[np.ndarray], landmarks5: Sequence[np.ndarray | None]) -> np.ndarray:
        """(N, 68, 2) landmarks measured on N same-size crops, each seeded with a box from its 5 landmarks."""
        boxes = np.array([self._box(lm) for lm in landmarks5], dtype=np.float64).reshape(-1, 4)
        return self.predictor.predict(np.stack([np.asarray(c) for c in crops]), boxes)

    def _poses(self, crops: Sequence[np.ndarray], landmarks5: Sequence[np.ndarray | None], width: int,
               height: int) -> list[HeadPose | Exception]:
        """Poses of same-size crops: plain, or (invariant) equalised and averaged with the mirror images."""
        if not self.invariant:
            return pnp_poses(self.landmarks68_batch(crops, landmarks5), width, height)
        gray = [equalized_gray(c) for c in crops]
        mirrored = [np.ascontiguousarray(g[:, ::-1]) for g in gray]
        marks = [None if lm is None else mirror_landmarks5(lm, width) for lm in landmarks5]
        pts = self.landmarks68_batch(gray + mirrored, list(landmarks5) + marks)
        poses = pnp_poses(pts, width, height)
        n = len(crops)
        return [mirror_average(a, b) for a, b in zip(poses[:n], poses[n:], strict=True)]

    def yaw_spread_batch(self, crops: Sequence[np.ndarray], landmarks5: Sequence[np.ndarray | None],
                         yaws: Sequence[float]) -> np.ndarray:
        """How far the yaw of each crop moves when the predictor starts from other boxes: the standard deviation
        of `yaws` (the estimates from the usual box) and the estimates from that box moved up and down by
        SPREAD_SHIFT of its height (degrees; NaN where a moved start has no pose).

        The cascade lands on the same landmarks from any nearby start where the face shows them; where a hand,
        mask or hat hides them, the hidden points stay near where they started, and the yaw follows the start.
        Same-size crops only (the label pass's aligned crops); invariant mode only.
        """
        if not self.invariant:
            raise ValueError("yaw_spread_batch needs the invariant (equalised, mirror-averaged) estimator")
        n = len(crops)
        if n == 0:
            return np.empty(0)
        height, width = np.shape(crops[0])[:2]
        gray = [equalized_gray(c) for c in crops]
        images = np.stack(gray + [np.ascontiguousarray(g[:, ::-1]) for g in gray])
        base = np.array([self._box(lm) for lm in landmarks5]
                        + [self._box(None if lm is None else mirror_landmarks5(lm, width)) for lm in landmarks5],
                        dtype=np.float64).reshape(-1, 4)
        runs = [np.asarray(yaws, dtype=np.float64)]
        for shift in (SPREAD_SHIFT, -SPREAD_SHIFT):
            dy = np.round(shift * (base[:, 3] - base[:, 1]))
            boxes = base + dy[:, None] * np.array([0.0, 1.0, 0.0, 1.0])
            poses = pnp_poses(self.predictor.predict(images, boxes), width, height)
            runs.append(np.array([np.nan if isinstance(m, Exception) else m.yaw
                                  for m in (mirror_average(a, b) for a, b in zip(poses[:n], poses[n:], strict=True))]))
        return np.std(np.stack(runs), axis=0)

    def estimate_batch(self, crops: Sequence[np.ndarray], landmarks5: Sequence[np.ndarray | None]
                       ) -> list[HeadPose | Exception]:
        """Poses of many crops (any mix of sizes), or the exception that stopped each one."""
        out: list[HeadPose | Exception] = [ValueError("not estimated")] * len(crops)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            groups.setdefault(np.shape(crop), []).append(i)
        for shape, idx in groups.items():
            if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 1:
                for i in idx:
                    out[i] = ValueError(f"expected an RGB crop (H, W, 3), got shape {shape}")
                continue
            try:
                poses = self._poses([crops[i] for i in idx], [landmarks5[i] for i in idx], shape[1], shape[0])
            except ValueError as e:
                for i in idx:
                    out[i] = e
                continue
            for i, pose in zip(idx, poses, strict=True):
                out[i] = pose
        return out

    def estimate(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> HeadPose:
        pose = self.estimate_batch([crop], [landmarks5])[0]
        if isinstance(pose, Exception):
            raise pose
        return pose


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
           "make_pose_backend", "pnp_pose", "pnp_poses", "refine_pnp", "solve_pnp_batch", "solve_pnp_rotation"]
