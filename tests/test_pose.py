"""Head pose: angle convention, solvePnP on projected 3D faces, the 5-point estimate, real-face flips, thresholds."""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest

from models.pose import (
    DlibPnPPose,
    FiveLandmarkPose,
    InsightFace3D68Pose,
    camera_matrix,
    generic_face_68,
    generic_five,
    pnp_pose,
)
from pipeline.align import choose_face, similarity_transform, transform_points, warp
from pipeline.pose import HeadPose, PoseStage, angles_from_rotation, rotation_from_angles
from pipeline.records import ERROR, NO_FACE, OK, FaceCrop
from tests._faces import mtcnn_detector, mtcnn_result, real_face


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


def _regions() -> list[np.ndarray]:
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


def _aligned(image: np.ndarray):
    dets = mtcnn_detector().detect(image)
    lm = dets[choose_face(dets)].landmarks
    m = similarity_transform(lm)
    return warp(image, m), transform_points(lm, m)


def test_horizontal_flip_flips_the_sign_of_yaw_on_real_faces():
    dlib_pose, five = DlibPnPPose(), FiveLandmarkPose()
    checked = 0
    for region in _regions():
        crop, lm = _aligned(region)
        fcrop, flm = _aligned(np.ascontiguousarray(region[:, ::-1]))
        for backend in (dlib_pose, five):
            a, b = backend.estimate(crop, lm), backend.estimate(fcrop, flm)
            if abs(a.yaw) < 8:  # near-frontal: the sign is noise
                continue
            checked += 1
            assert np.sign(a.yaw) == -np.sign(b.yaw), (backend.name, a.yaw, b.yaw)
            assert abs(a.yaw + b.yaw) < 0.35 * abs(a.yaw) + 3, (backend.name, a.yaw, b.yaw)
    assert checked >= 6
    # Tom Hanks looks to the image's right: positive yaw by the documented convention.
    crop, lm = _aligned(np.asarray(real_face("tom_hanks")))
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
