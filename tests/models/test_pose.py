"""Head pose: angle convention, solvePnP on projected 3D faces, the 5-point estimate, real-face flips, thresholds."""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest

from models.geometry import (
    HeadPose,
    angles_from_rotation,
    rotation_from_angles,
    similarity_transform,
    transform_points,
    warp,
)
from models.pose import (
    DlibPnPPose,
    FiveLandmarkPose,
    InsightFace3D68Pose,
    camera_matrix,
    generic_face_68,
    generic_five,
    pnp_pose,
)
from pipeline.labellers.align import choose_face
from pipeline.labellers.base import ERROR, NO_FACE, OK, FaceCrop
from pipeline.labellers.pose import PoseStage


def test_angles_round_trip_and_sign_convention():
    for yaw, pitch, roll in itertools.product((-70, -25, 0, 10, 45), (-30, 0, 20), (-15, 0, 5)):
        got = angles_from_rotation(rotation_from_angles(yaw, pitch, roll))
        np.testing.assert_allclose(got, (yaw, pitch, roll), atol=1e-9)
    nose = np.array([0.0, 0.0, -1.0])  # the nose points at the camera in the head frame
    assert (rotation_from_angles(20, 0, 0) @ nose)[0] > 0  # yaw > 0: nose toward the image's right
    assert (rotation_from_angles(0, 20, 0) @ nose)[1] < 0  # pitch > 0: nose up (image y points down)
    assert (rotation_from_angles(0, 0, 20) @ np.array([1.0, 0, 0]))[1] > 0  # roll > 0: clockwise on screen
    with pytest.raises(ValueError, match="3x3"):
        angles_from_rotation(np.eye(2))


def _project(points3d: np.ndarray, yaw: float, pitch: float, roll: float, size: int = 112,
             distance: float = 6.0) -> np.ndarray:
    rot = rotation_from_angles(yaw, pitch, roll)
    rvec = cv2.Rodrigues(rot)[0]
    k = camera_matrix(size, size)
    # Face about 2 eye-distances wide in a 112 px frame: scale so the eye distance spans ~35 px.
    tvec = np.array([0.0, 0.1, distance])
    return cv2.projectPoints(points3d, rvec, tvec, k, None)[0].reshape(-1, 2) * 1.0


@pytest.mark.parametrize("yaw", [-60, -40, -25, -10, -3, 0, 3, 10, 25, 40, 60])
def test_solvepnp_recovers_known_yaw_within_one_degree(yaw):
    rng = np.random.default_rng(abs(yaw))
    model = generic_face_68()
    for pitch, roll in ((0, 0), (-15, 5), (12, -8)):
        pts = _project(model, yaw, pitch, roll) + rng.normal(0, 0.3, (68, 2))  # 0.3 px landmark noise
        pose = pnp_pose(pts, 112, 112)
        assert abs(pose.yaw - yaw) < 1.0, (yaw, pitch, roll, pose)
        assert abs(pose.pitch - pitch) < 1.0 and abs(pose.roll - roll) < 1.0
        # Another person's face shape (2% anisotropic scale, 1% point jitter) against the generic model.
        other = model * rng.normal(1.0, 0.02, size=(1, 3)) + rng.normal(0, 0.01, model.shape)
        pose = pnp_pose(_project(other, yaw, pitch, roll) + rng.normal(0, 0.3, (68, 2)), 112, 112)
        assert abs(pose.yaw - yaw) < 2.5, (yaw, pitch, roll, pose)


@pytest.mark.parametrize("yaw", [-50, -25, -10, 0, 10, 25, 50])
def test_five_point_estimate_on_weak_perspective_projection(yaw):
    five = generic_five()
    for roll in (0.0, 12.0):
        rot = rotation_from_angles(yaw, 0.0, roll)
        pts2d = (five @ rot.T)[:, :2] * 40.0 + 56.0  # orthographic projection, 40 px per eye distance
        pose = FiveLandmarkPose().estimate(np.zeros((112, 112, 3), np.uint8), pts2d)
        assert abs(pose.yaw - yaw) < 0.5 and abs(pose.roll - roll) < 0.5, (yaw, roll, pose)
    with pytest.raises(ValueError, match="landmarks measured"):
        FiveLandmarkPose().estimate(np.zeros((112, 112, 3), np.uint8), None)


def _regions(real_face, mtcnn_result) -> list[np.ndarray]:
    """Tom Hanks plus a square region around each large, confident face of t1 (cheap to re-detect)."""
    regions = [np.asarray(real_face("tom_hanks"))]
    t1, img = mtcnn_result("t1"), np.asarray(real_face("t1"))
    for box, score in zip(t1.boxes, t1.scores, strict=True):
        side = box[2] - box[0]
        if score < 0.95 or side < 50:
            continue
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0, y0 = int(max(cx - side, 0)), int(max(cy - side, 0))
        regions.append(np.ascontiguousarray(img[y0:int(cy + side), x0:int(cx + side)]))
    return regions


def _aligned(image: np.ndarray, mtcnn_detector):
    dets = mtcnn_detector().detect(image)
    lm = dets[choose_face(dets)].landmarks
    m = similarity_transform(lm)
    return warp(image, m), transform_points(lm, m)


@pytest.mark.slow
def test_horizontal_flip_flips_the_sign_of_yaw_on_real_faces(real_face, mtcnn_result, mtcnn_detector):
    dlib_pose, five = DlibPnPPose(), FiveLandmarkPose()
    checked = 0
    for region in _regions(real_face, mtcnn_result):
        crop, lm = _aligned(region, mtcnn_detector)
        fcrop, flm = _aligned(np.ascontiguousarray(region[:, ::-1]), mtcnn_detector)
        for backend in (dlib_pose, five):
            a, b = backend.estimate(crop, lm), backend.estimate(fcrop, flm)
            if abs(a.yaw) < 8:  # near-frontal: the sign is noise
                continue
            checked += 1
            assert np.sign(a.yaw) == -np.sign(b.yaw), (backend.name, a.yaw, b.yaw)
            assert abs(a.yaw + b.yaw) < 0.35 * abs(a.yaw) + 3, (backend.name, a.yaw, b.yaw)
    assert checked >= 6
    # Tom Hanks looks to the image's right: positive yaw by the documented convention.
    crop, lm = _aligned(np.asarray(real_face("tom_hanks")), mtcnn_detector)
    assert dlib_pose.estimate(crop, lm).yaw > 10


class _Constant:
    name, version = "constant", "0"

    def __init__(self, yaw):
        self.yaw = yaw

    def estimate(self, crop, landmarks5):
        if self.yaw is None:
            raise ValueError("no landmarks")
        return HeadPose(self.yaw, 1.0, -2.0, {"method": "constant"})


@pytest.mark.parametrize(("yaw", "name"), [
    (0.0, "frontal"), (9.999, "frontal"), (-9.999, "frontal"), (10.0, "slight angle"), (-10.0, "slight angle"),
    (25.0, "slight angle"), (-25.0, "slight angle"), (25.001, "profile"), (-25.001, "profile"), (89.0, "profile"),
])
def test_pose_stage_thresholds_at_their_edges(yaw, name):
    face = FaceCrop("s", np.zeros((112, 112, 3), np.uint8))
    row = PoseStage(_Constant(yaw))([face])[0]
    assert row["factor"] == "pose" and row["status"] == OK
    assert row["class_name"] == name and row["value"] == pytest.approx(yaw)
    assert json.loads(row["thresholds"]) == [10.0, 25.0]
    assert json.loads(row["details"])["pitch"] == 1.0


def test_pose_stage_custom_thresholds_and_bad_rows():
    face = FaceCrop("s", np.zeros((112, 112, 3), np.uint8))
    assert PoseStage(_Constant(12.0), thresholds=(15, 30))([face])[0]["class_name"] == "frontal"
    with pytest.raises(ValueError, match="ordered"):
        PoseStage(_Constant(0.0), thresholds=(30, 15))
    skipped = PoseStage(_Constant(0.0)).label(FaceCrop("n", None, status=NO_FACE, error="no face detected"))
    assert skipped["status"] == NO_FACE and "no face detected" in skipped["error"] and skipped["value"] is None
    failed = PoseStage(_Constant(None)).label(face)
    assert failed["status"] == ERROR and "no landmarks" in failed["error"]
    from data_manifest.writer import to_table

    to_table("factors", [skipped, failed], "run-1")


def _tiny_3d68(path, yaw: float, pitch: float, roll: float) -> None:
    """A 1k3d68-layout ONNX (192x192 input, 3309 outputs) whose last 204 outputs are a rotated generic face."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    face = generic_face_68() @ rotation_from_angles(yaw, pitch, roll).T * 0.45  # head frame, z away from camera
    face[:, 2] *= -1  # insightface's z points toward the viewer
    out = np.zeros((1, 3309), np.float32)
    out[0, -204:] = face.reshape(-1)
    inits = [numpy_helper.from_array(out, "landmarks"), numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero")]
    nodes = [
        helper.make_node("ReduceMean", ["data"], ["avg"], keepdims=1),
        helper.make_node("Reshape", ["avg", "shape11"], ["avg2"]),
        helper.make_node("MatMul", ["avg2", "zero"], ["nil"]),
        helper.make_node("Add", ["landmarks", "nil"], ["fc1"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1, 1], np.int64), "shape11"))
    graph = helper.make_graph(nodes, "tiny_1k3d68",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3309])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize(("yaw", "pitch", "roll"), [(30.0, 0.0, 0.0), (-18.0, 10.0, 6.0), (0.0, -12.0, 0.0)])
def test_insightface_1k3d68_backend_with_a_tiny_generated_model(tmp_path, yaw, pitch, roll):
    pytest.importorskip("insightface", reason="the 1k3d68 backend needs insightface")
    _tiny_3d68(tmp_path / "1k3d68.onnx", yaw, pitch, roll)
    backend = InsightFace3D68Pose(tmp_path)
    crop = np.zeros((112, 112, 3), np.uint8)
    pose = backend.estimate(crop, None)
    np.testing.assert_allclose([pose.yaw, pose.pitch, pose.roll], [yaw, pitch, roll], atol=1e-3)
    pts = backend.landmarks3d(crop, None)
    assert pts.shape == (68, 3) and 20 < pts[30, 0] < 92  # nose tip lands inside the crop


def _reference_pnp(points68: np.ndarray, size: int = 112) -> tuple[float, float]:
    """The previous solve: cv2.solvePnP SQPnP, then its iterative refinement; (yaw, cost in px^2)."""
    model, k = generic_face_68(), camera_matrix(size, size)
    obj, img = model.reshape(-1, 1, 3), points68.reshape(-1, 1, 2)
    _, rvec, tvec = cv2.solvePnP(obj, img, k, None, flags=cv2.SOLVEPNP_SQPNP)
    _, rvec, tvec = cv2.solvePnP(obj, img, k, None, rvec, tvec, useExtrinsicGuess=True,
                                 flags=cv2.SOLVEPNP_ITERATIVE)
    cost = float(((cv2.projectPoints(model, rvec, tvec, k, None)[0].reshape(-1, 2) - points68) ** 2).sum())
    return angles_from_rotation(cv2.Rodrigues(rvec)[0])[0], cost


def test_batched_landmarks_equal_dlib_and_yaw_agrees_with_solvepnp_on_real_faces(aligned_identities):
    """The numpy cascade gives dlib's own 68 points; the batched PnP the yaw of cv2.solvePnP (as good a fit)."""
    dlib = pytest.importorskip("dlib")
    from models.geometry import ARCFACE_TEMPLATE
    from models.weights import dlib_model

    crops = list(aligned_identities().values())
    crops += [np.ascontiguousarray(c[:, ::-1]) for c in crops]
    crops += [cv2.GaussianBlur(c, (0, 0), 1.5) for c in crops] + [np.clip(c * 0.6, 0, 255).astype(np.uint8)
                                                                   for c in crops]
    rng = np.random.default_rng(0)
    # Half the crops get measured 5 landmarks (their own seed box), half the template's box.
    marks = [ARCFACE_TEMPLATE + rng.normal(0, 2, (5, 2)) if i % 2 else None for i in range(len(crops))]
    backend = DlibPnPPose(invariant=False)  # the plain method: the landmarks of the crop itself
    got = backend.landmarks68_batch(crops, marks)
    predictor = dlib.shape_predictor(str(dlib_model("shape_predictor_68_face_landmarks.dat")))
    for crop, lm, pts in zip(crops, marks, got, strict=True):
        box = dlib.rectangle(*backend._box(lm))
        want = np.array([[p.x, p.y] for p in predictor(crop, box).parts()], dtype=np.float64)
        np.testing.assert_array_equal(pts, want)
    poses = backend.estimate_batch(crops, marks)
    yaws = []
    for pts, pose in zip(got, poses, strict=True):
        yaw, cost = _reference_pnp(pts)
        assert abs(pose.yaw - yaw) < 0.05, (pose.yaw, yaw)
        assert pose.details["reprojection_rms_px"] ** 2 * 68 <= cost + 1e-6  # converged at least as far
        yaws.append(yaw)
    assert max(yaws) - min(yaws) > 30  # real faces turned both ways, not only frontal ones
    single = backend.estimate(crops[3], marks[3])
    assert single.yaw == pytest.approx(poses[3].yaw, abs=1e-9)


def test_batched_landmarks_equal_dlib_with_boxes_reaching_outside_the_crop(aligned_identities):
    """Feature pixels that fall outside the image read 0 in the batched cascade as in dlib."""
    dlib = pytest.importorskip("dlib")
    from models.weights import dlib_model

    crops = list(aligned_identities().values())[:4]
    boxes = np.array([[-30, -20, 90, 100], [40, 30, 150, 140], [-60, 10, 170, 240], [20, -50, 60, -10],
                      [0, 0, 111, 111], [10, 25, 102, 117]], dtype=np.float64)
    stack = np.stack([crops[i % len(crops)] for i in range(len(boxes))])
    got = DlibPnPPose().predictor.predict(stack, boxes)
    predictor = dlib.shape_predictor(str(dlib_model("shape_predictor_68_face_landmarks.dat")))
    for crop, box, pts in zip(stack, boxes, got, strict=True):
        want = [[p.x, p.y] for p in predictor(crop, dlib.rectangle(*(int(v) for v in box))).parts()]
        np.testing.assert_array_equal(pts, np.array(want, dtype=np.float64))
    assert (got < 0).any() and (got > 111).any()  # some landmarks land outside the crop


class _Batched(_Constant):
    """A backend with estimate_batch: yaw from the crop's first pixel, an error for a black crop."""

    def __init__(self):
        super().__init__(0.0)
        self.calls = []

    def estimate_batch(self, crops, landmarks5):
        self.calls.append(len(crops))
        return [ValueError("black crop") if c[0, 0, 0] == 0 else HeadPose(float(c[0, 0, 0]), 0.0, 0.0, {})
                for c in crops]


def test_pose_stage_hands_a_batch_to_estimate_batch_in_order():
    faces = [FaceCrop("a", np.full((112, 112, 3), 30, np.uint8)), FaceCrop("b", None, status=NO_FACE, error="x"),
             FaceCrop("c", np.zeros((112, 112, 3), np.uint8)), FaceCrop("d", np.full((112, 112, 3), 5, np.uint8))]
    backend = _Batched()
    rows = PoseStage(backend)(faces)
    assert backend.calls == [3]  # one call with the three usable crops
    assert [r["sample_id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["status"] for r in rows] == [OK, NO_FACE, ERROR, OK]
    assert rows[0]["class_name"] == "profile" and rows[3]["class_name"] == "frontal"
    assert "black crop" in rows[2]["error"]


def _packed(value: int) -> bytes:
    """dlib's packed integer: a byte with the length (and bit 7 for negatives), then little-endian bytes."""
    mag = abs(value)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def _float(x: float) -> bytes:
    import math

    m, e = math.frexp(x)
    return _packed(int(m * (1 << 53))) + _packed(e - 53)


def _tiny_predictor(path) -> None:
    """A 2-point, 1-level model with one depth-1 tree: left (pixel 0 brighter than pixel 1 by > 10) moves
    both points by +0.1, right by -0.1. Pixel 0 sits on point 0, pixel 1 at point 0 + (0.5, 0)."""
    initial = [0.25, 0.5, 0.75, 0.5]
    out = _packed(1) + _packed(-4) + _packed(-1) + b"".join(_float(v) for v in initial)
    out += _packed(1) + _packed(1)  # one level of one tree
    out += _packed(1) + _packed(0) + _packed(1) + _float(10.0)  # one split: pixel 0 - pixel 1 > 10
    out += _packed(2)
    for d in (0.1, -0.1):
        out += _packed(-4) + _packed(-1) + b"".join(_float(d) for _ in range(4))
    out += _packed(1) + _packed(2) + _packed(0) + _packed(0)  # anchors: both on point 0
    out += _packed(1) + _packed(2) + _float(0.0) + _float(0.0) + _float(0.5) + _float(0.0)  # deltas
    path.write_bytes(out)


def test_shape_predictor_reads_dlib_files_and_runs_the_cascade(tmp_path, monkeypatch):
    from models import shape_predictor as sp

    for v in (0, 1, -1, 255, 256, -70000, 2**40, -(2**62)):
        data = np.frombuffer(_packed(v) * 3, np.uint8)
        assert sp._decode(data, sp._token_starts(data)).tolist() == [v] * 3
    _tiny_predictor(tmp_path / "tiny.dat")
    monkeypatch.setenv("FIQA_MODELS", str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    model = sp.load_shape_model(tmp_path / "tiny.dat")
    (cache,) = (tmp_path / "store" / "derived").glob("tiny.*.npz")  # cached for the next load
    assert sp._code_digest() in cache.name  # keyed by the parser's code, not only by the file
    cached = sp.load_shape_model(tmp_path / "tiny.dat")
    np.testing.assert_array_equal(cached.leaves, model.leaves)
    monkeypatch.setattr(sp, "_code_digest", lambda: "0123456789ab")  # another parser: another key
    assert sp._cache_path(tmp_path / "tiny.dat") != cache
    assert (model.levels, model.trees, model.splits_per_tree, model.points) == (1, 1, 1, 2)
    img = np.zeros((2, 40, 40), np.uint8)
    img[0, :, :20] = 200  # image 0: point 0 (x = 10) is bright, pixel 1 (x = 20) dark -> left leaf
    pts = sp.ShapePredictor(model).predict(img, np.array([[0, 0, 40, 40], [0, 0, 40, 40]]))
    np.testing.assert_array_equal(pts[0], [[14, 24], [34, 24]])  # (0.35, 0.6), (0.85, 0.6) * 40
    np.testing.assert_array_equal(pts[1], [[6, 16], [26, 16]])  # (0.15, 0.4), (0.65, 0.4) * 40
    (tmp_path / "cut.dat").write_bytes((tmp_path / "tiny.dat").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        sp.read_shape_model(tmp_path / "cut.dat")
    with pytest.raises(ValueError, match="uint8"):
        sp.ShapePredictor(model).predict(img.astype(np.float32), np.array([[0, 0, 40, 40]] * 2))


def test_invariant_pose_is_antisymmetric_under_a_flip_and_moves_less_in_the_dark(aligned_identities):
    """The default dlib backend averages a crop's pose with its mirror's: a flipped crop gets exactly the
    opposite yaw and roll; on equalised luminance a dark copy moves the yaw less than the plain method's."""
    from models.geometry import ARCFACE_TEMPLATE
    from models.pose import mirror_landmarks5
    from pipeline.synthetic.degrade import dark

    crops = list(aligned_identities().values())
    invariant, plain = DlibPnPPose(), DlibPnPPose(invariant=False)
    assert invariant.version != plain.version
    marks = [ARCFACE_TEMPLATE + np.random.default_rng(i).normal(0, 1.5, (5, 2)) for i in range(len(crops))]
    poses = invariant.estimate_batch(crops, marks)
    flipped = invariant.estimate_batch([np.ascontiguousarray(c[:, ::-1]) for c in crops],
                                       [mirror_landmarks5(m, 112) for m in marks])
    for a, b in zip(poses, flipped, strict=True):
        assert a.yaw == pytest.approx(-b.yaw, abs=1e-9) and a.roll == pytest.approx(-b.roll, abs=1e-9)
        assert a.pitch == pytest.approx(b.pitch, abs=1e-9)
        assert a.details["yaw_disagreement"] == pytest.approx(abs(a.details["yaw_direct"] - a.yaw))
    moved = {}
    for name, backend in (("invariant", invariant), ("plain", plain)):
        clean = backend.estimate_batch(crops, marks)
        darker = backend.estimate_batch([dark(c, 3) for c in crops], marks)
        moved[name] = sum(abs(a.yaw - b.yaw) for a, b in zip(clean, darker, strict=True))
    assert moved["invariant"] < moved["plain"], moved


class _Spread(_Batched):
    """A batched backend that also reports a yaw spread: the crop's second pixel, in tenths of a degree."""

    invariant = True

    def __init__(self):
        super().__init__()
        self.spread_calls = []

    def estimate(self, crop, landmarks5):
        return self.estimate_batch([crop], [landmarks5])[0]

    def yaw_spread_batch(self, crops, landmarks5, yaws):
        self.spread_calls.append(list(yaws))
        return np.array([c[0, 1, 0] / 10 for c in crops])


@pytest.mark.parametrize(("yaw", "spread_tenths", "name", "asked"), [
    (3, 50, "frontal", False),  # far from both thresholds: no spread is measured
    (17, 50, "slight angle", False),
    (12, 3, "slight angle", True),  # near 10 deg but stable
    (12, 5, "slight angle", True),  # at the limit
    (12, 6, None, True),  # near 10 deg and unstable: withheld
    (7, 40, None, True),
    (28, 40, None, True),  # near 25 deg
    (30, 40, "profile", False),
])
def test_pose_class_is_withheld_only_near_a_threshold_when_the_yaw_is_unstable(yaw, spread_tenths, name, asked):
    from pipeline.labellers.pose import AMBIGUOUS_MARGIN, AMBIGUOUS_SPREAD

    assert (AMBIGUOUS_MARGIN, AMBIGUOUS_SPREAD) == (4.0, 0.5)
    crop = np.full((112, 112, 3), yaw, np.uint8)
    crop[0, 1, 0] = spread_tenths
    backend = _Spread()
    stage = PoseStage(backend)
    assert stage.version.endswith("+ambiguous-withheld")
    row = stage([FaceCrop("a", crop)])[0]
    assert row["status"] == OK and row["value"] == yaw and row["class_name"] == name
    details = json.loads(row["details"])
    assert backend.spread_calls == ([[float(yaw)]] if asked else [])
    assert details.get("yaw_spread") == (spread_tenths / 10 if asked else None)
    assert ("class_withheld" in details) == (name is None)
    # one crop at a time (no estimate_batch) takes the same path
    assert PoseStage(backend).label(FaceCrop("a", crop))["class_name"] == name


def test_yaw_spread_is_the_spread_of_three_starts_and_grows_when_the_lower_face_is_hidden(aligned_identities):
    """The spread includes the usual start's yaw (a wrong base yaw widens it by a known amount), is small on
    clean real faces and larger on the same faces under a grey band over the nose and mouth."""
    from models.geometry import ARCFACE_TEMPLATE

    crops = list(aligned_identities().values())
    backend = DlibPnPPose()
    marks = [ARCFACE_TEMPLATE] * len(crops)
    yaws = [p.yaw for p in backend.estimate_batch(crops, marks)]
    clean = backend.yaw_spread_batch(crops, marks, yaws)
    assert np.isfinite(clean).all() and (clean >= 0).all()
    moved = backend.yaw_spread_batch(crops, marks, [y + 30.0 for y in yaws])
    assert (moved > 9.0).all()  # one of three values 30 deg away: a standard deviation of at least 9.4 deg
    banded = [c.copy() for c in crops]
    for c in banded:
        c[60:100, 20:92] = 128
    hidden = backend.yaw_spread_batch(banded, marks, [p.yaw for p in backend.estimate_batch(banded, marks)])
    assert np.median(hidden) > np.median(clean), (hidden, clean)
    with pytest.raises(ValueError, match="invariant"):
        DlibPnPPose(invariant=False).yaw_spread_batch(crops, marks, yaws)


class _Obstruction:
    """An occlusion labeller for the pose stage: P(obstructed) is the crop's third pixel, in hundredths."""

    labeller, version, threshold = "fake-occlusion", "7", 0.5

    def __init__(self):
        self.calls = []

    def probabilities(self, crops):
        self.calls.append(len(crops))
        return np.array([c[0, 2, 0] / 100 for c in crops])


@pytest.mark.parametrize(("yaw", "spread_tenths", "p_pct", "name", "asked"), [
    (15, 3, 90, None, False),  # obstructed and 5 deg from 10: withheld, no spread needed
    (15, 3, 50, None, False),  # P at the occlusion threshold is obstructed
    (15, 3, 49, "slight angle", False),  # not obstructed and more than 4 deg away: the plain rule keeps it
    (17, 5, 90, "slight angle", True),  # obstructed, 7 deg away and stable: kept
    (17, 10, 90, "slight angle", True),  # at the obstructed spread limit
    (17, 11, 90, None, True),  # obstructed, far from the thresholds but unstable: withheld
    (40, 8, 90, "profile", True),
    (40, 40, 10, "profile", False),  # unobstructed and far: no spread is measured
    (12, 6, 10, None, True),  # unobstructed, near 10 deg and unstable: the plain rule withholds
    (12, 5, 10, "slight angle", True),
])
def test_obstructed_faces_get_the_wider_pose_check(yaw, spread_tenths, p_pct, name, asked):
    from pipeline.labellers.pose import OBSTRUCTED_MARGIN, OBSTRUCTED_SPREAD

    assert (OBSTRUCTED_MARGIN, OBSTRUCTED_SPREAD) == (6.0, 1.0)
    crop = np.full((112, 112, 3), yaw, np.uint8)
    crop[0, 1, 0], crop[0, 2, 0] = spread_tenths, p_pct
    backend, occlusion = _Spread(), _Obstruction()
    stage = PoseStage(backend, obstruction=occlusion)
    assert stage.version.endswith("+ambiguous-withheld+obstructed-withheld(fake-occlusion:7)")
    row = stage([FaceCrop("a", crop), FaceCrop("b", None, status=NO_FACE, error="x")])[0]
    assert occlusion.calls == [1]  # once per batch, for the crops with a pose
    assert row["status"] == OK and row["value"] == yaw and row["class_name"] == name
    details = json.loads(row["details"])
    assert details["p_obstructed"] == pytest.approx(p_pct / 100)
    assert backend.spread_calls == ([[float(yaw)]] if asked else [])
    assert ("class_withheld" in details) == (name is None)
    if name is None:
        assert ("face obstructed" in details["class_withheld"]) == (p_pct >= 50)
    assert PoseStage(backend, obstruction=occlusion).label(FaceCrop("a", crop))["class_name"] == name
    # without withholding, the occlusion labeller is not asked and the version does not name it
    plain = PoseStage(_Spread(), withhold=False, obstruction=occlusion)
    assert "obstructed" not in plain.version and plain([FaceCrop("a", crop)])[0]["class_name"] is not None
    assert occlusion.calls == [1, 1]


def test_the_default_pose_stage_reads_the_shared_occlusion_labeller_and_follows_its_rule(aligned_identities):
    """Built by the registry, the pose stage asks the same occlusion stage the `occlusion` stage is; on real faces
    with and without a pasted band its rows withhold the class exactly where the documented rule says, from the
    row's own yaw, spread and P(obstructed); the occlusion rows after it equal a fresh stage's."""
    from models.weights import MissingWeightsError
    from pipeline.labellers import registry as L
    from pipeline.labellers.occlusion import OcclusionStage
    from pipeline.labellers.pose import AMBIGUOUS_SPREAD, OBSTRUCTED_MARGIN, OBSTRUCTED_SPREAD, near_threshold

    try:
        pose = L.get_stage("pose", L.LabelOptions())
        occlusion = L.get_stage("occlusion", L.LabelOptions())
    except MissingWeightsError as e:
        pytest.skip(f"labeller weights missing: {e}")
    assert pose.obstruction is occlusion
    assert pose.version.endswith(f"+obstructed-withheld(occlusion-cnn-pasted:{occlusion.version})")
    crops = list(aligned_identities().values())
    banded = [c.copy() for c in crops]
    for c in banded:
        c[62:100, 18:94] = (40, 90, 160)
    faces = [FaceCrop(f"f{i}", c) for i, c in enumerate(crops + banded)]
    rows = pose(faces)
    seen = []
    for row in rows:
        d = json.loads(row["details"])
        obstructed = d["p_obstructed"] >= occlusion.threshold
        seen.append(obstructed)
        if obstructed:
            withheld = near_threshold(row["value"], pose.thresholds, OBSTRUCTED_MARGIN) or \
                not d["yaw_spread"] <= OBSTRUCTED_SPREAD
        else:
            withheld = "yaw_spread" in d and near_threshold(row["value"], pose.thresholds) and \
                not d["yaw_spread"] <= AMBIGUOUS_SPREAD
        assert (row["class_name"] is None) == withheld == ("class_withheld" in d), d
    assert any(seen[len(crops):]) and not all(seen[:len(crops)])  # the band is seen, not every clean face
    fresh = OcclusionStage()(faces)
    assert [r["value"] for r in occlusion(faces)] == [r["value"] for r in fresh]
    assert [json.loads(r["details"])["p_obstructed"] for r in rows] == pytest.approx([r["value"] for r in fresh])
    # `--pose-withhold ambiguous` / `none`: the narrower check alone, or every face a class (the paper)
    ambiguous = L.get_stage("pose", L.LabelOptions(pose_withhold="ambiguous"))
    assert ambiguous.obstruction is None and ambiguous.version.endswith("+ambiguous-withheld")
    every = L.get_stage("pose", L.LabelOptions(pose_withhold="none"))
    assert not every.withholds and every.version == pose.backend.version
    assert all(r["class_name"] is not None and "p_obstructed" not in json.loads(r["details"]) for r in every(faces))
    kept = [r["class_name"] for r in ambiguous(faces)]
    assert sum(k is None for k in kept) <= sum(r["class_name"] is None for r in rows)
