"""Alignment: Umeyama vs scikit-image, warping geometry, face choice, real faces, modes, and the SCRFD backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_manifest.writer import to_table
from models.detectors import Detection
from models.geometry import ARCFACE_TEMPLATE, similarity_transform, transform_points, warp
from pipeline.labellers.align import ALREADY_ALIGNED, AlignStage, choose_face, face_row
from pipeline.labellers.base import ERROR, NO_FACE, OK


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def test_transform_equals_scikit_image_estimate():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(7)
    cases = [ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2)) for _ in range(20)]
    cases += [transform_points(ARCFACE_TEMPLATE, _similarity(s, a, 300, -40)) + rng.normal(0, 2, (5, 2))
              for s, a in ((3.0, 25.0), (0.5, -170.0), (1.7, 90.0))]
    for lm in cases:
        ours = similarity_transform(lm)
        ref = SimilarityTransform.from_estimate(lm, ARCFACE_TEMPLATE)
        np.testing.assert_allclose(ours, ref.params[:2], atol=1e-6, rtol=0)


def test_exact_similarity_is_recovered_and_inverted():
    known = _similarity(2.5, 17.0, 123.4, 56.7)
    lm = transform_points(ARCFACE_TEMPLATE, known)  # template -> image
    m = similarity_transform(lm)  # image -> template
    np.testing.assert_allclose(transform_points(lm, m), ARCFACE_TEMPLATE, atol=1e-9)
    assert math.isclose(math.hypot(m[0, 0], m[1, 0]), 1 / 2.5, rel_tol=1e-12)
    assert math.isclose(math.degrees(math.atan2(m[1, 0], m[0, 0])), -17.0, abs_tol=1e-9)


def test_least_squares_not_ransac_every_point_counts():
    lm = ARCFACE_TEMPLATE.copy()
    lm[2] += (10.0, 0.0)  # one outlier moves the fit (a RANSAC fit would ignore it)
    m = similarity_transform(lm)
    assert np.abs(m - np.eye(3)[:2]).max() > 0.3
    residual = transform_points(lm, m) - ARCFACE_TEMPLATE
    np.testing.assert_allclose(residual.sum(axis=0), 0.0, atol=1e-9)  # least squares: residuals balance


@pytest.mark.parametrize(("bad", "match"), [
    (np.zeros((4, 2)), r"shape \(4, 2\)"),
    (np.full((5, 2), np.nan), "non-finite"),
    (np.ones((5, 2)), "degenerate"),
])
def test_bad_landmarks_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        similarity_transform(bad)


def test_warp_moves_a_marked_pixel_where_the_transform_says():
    img = np.zeros((300, 400, 3), np.uint8)
    img[150, 200] = 255
    m = _similarity(0.5, 0.0, -44.0, -19.0)  # (200, 150) -> (56, 56)
    crop = warp(img, m)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    y, x = np.unravel_index(np.argmax(crop[:, :, 0]), crop.shape[:2])
    assert (x, y) == (56, 56)


def test_choose_face_by_score_times_area():
    small_sure = Detection(np.array([0, 0, 10, 10.0]), 0.99, ARCFACE_TEMPLATE)
    big_unsure = Detection(np.array([0, 0, 40, 40.0]), 0.70, ARCFACE_TEMPLATE)
    big_sure = Detection(np.array([0, 0, 30, 30.0]), 0.98, ARCFACE_TEMPLATE)
    assert choose_face([small_sure, big_unsure, big_sure]) == 1  # 1120 > 882 > 99
    assert choose_face([small_sure, big_sure]) == 1
    with pytest.raises(ValueError, match="no detections"):
        choose_face([])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t1", "tom_hanks", "astronaut"])
def test_real_faces_redetected_on_the_crop_land_where_the_transform_puts_them(name, mtcnn_detector, mtcnn_result,
                                                                              real_face):
    """Crop -> re-detect: landmarks within 3 px of the aligned landmarks; the template gap is the fit's own."""
    det = mtcnn_detector()
    res = mtcnn_result(name)
    keep = choose_face(list(zip(res.boxes, res.scores, res.landmarks, strict=True)))
    lm = res.landmarks[keep]
    m = similarity_transform(lm)
    crop = warp(np.asarray(real_face(name)), m)
    again = det.detect(crop)
    assert len(again) >= 1
    found = again[choose_face(again)].landmarks
    aligned = transform_points(lm, m)
    assert np.linalg.norm(found - aligned, axis=1).max() < 3.0
    # Distance to the template: the similarity cannot remove the face's own shape/pose residual,
    # so compare with that residual (on these faces up to about 9 px on the nose of a turned head).
    to_template = np.linalg.norm(found - ARCFACE_TEMPLATE, axis=1).mean()
    residual = np.linalg.norm(aligned - ARCFACE_TEMPLATE, axis=1).mean()
    assert to_template < residual + 1.0
    assert np.linalg.norm(found[:2] - ARCFACE_TEMPLATE[:2], axis=1).max() < 3.5  # eyes land on the template


class _FixedDetector:
    name, version = "fixed", "0"

    def __init__(self, dets):
        self.dets = dets
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        return list(self.dets)


def test_stage_picks_one_face_and_records_n_faces():
    img = np.zeros((200, 300, 3), np.uint8)
    lm_a = transform_points(ARCFACE_TEMPLATE, _similarity(0.5, 0, 10, 10))
    lm_b = transform_points(ARCFACE_TEMPLATE, _similarity(1.5, 5, 120, 20))
    dets = [Detection(np.array([10, 10, 66, 66.0]), 0.99, lm_a), Detection(np.array([120, 20, 288, 188.0]), 0.9, lm_b)]
    face = AlignStage(_FixedDetector(dets)).align("s1", img)
    assert face.status == OK and face.crop.shape == (112, 112, 3)
    assert face.extra["n_faces"] == 2 and face.extra["score"] == pytest.approx(0.9)
    np.testing.assert_allclose(face.landmarks, ARCFACE_TEMPLATE, atol=1e-9)
    row = face_row(face, detector="fixed", detector_version="0", crop_file="crops/x.npy", crop_index=3)
    assert row["landmarks"] == pytest.approx(lm_b.reshape(-1).tolist())
    to_table("faces", [row], "run-1")  # fits the manifest schema


def test_stage_turns_bad_input_into_rows_with_reasons():
    stage = AlignStage(_FixedDetector([]))
    none = stage.align("s0", np.zeros((50, 60, 3), np.uint8))
    assert none.status == NO_FACE and none.crop is None and "60x50" in none.error and none.extra["n_faces"] == 0
    bad = stage.align("s1", np.zeros((50, 60), np.float32))
    assert bad.status == ERROR and "RGB uint8" in bad.error
    rows = [face_row(f, detector="fixed", detector_version="0") for f in (none, bad)]
    assert [r["status"] for r in rows] == [NO_FACE, ERROR]
    to_table("faces", rows, "run-1")


def test_already_aligned_mode_keeps_the_crop_and_measures_landmarks(mtcnn_detector, real_face):
    tom = np.asarray(real_face("tom_hanks"))
    face = AlignStage(mtcnn_detector(), mode=ALREADY_ALIGNED).align("tom", tom)
    assert face.status == OK
    np.testing.assert_array_equal(face.crop, tom)
    np.testing.assert_allclose(face.extra["transform"], [[1, 0, 0], [0, 1, 0]])
    assert face.landmarks is not None
    # Measured, not the template: the turned head's nose is well off the template's.
    assert np.linalg.norm(face.landmarks[2] - ARCFACE_TEMPLATE[2]) > 3.0
    assert np.linalg.norm(face.landmarks - ARCFACE_TEMPLATE, axis=1)[:2].max() < 6.0
    row = face_row(face, detector="mtcnn", detector_version="x")
    assert row["aligned_mode"] == ALREADY_ALIGNED and row["n_faces"] == 1
    # Without any detection the crop stays usable, with no measured landmarks.
    blank = AlignStage(_FixedDetector([]), mode=ALREADY_ALIGNED).align("b", np.zeros((224, 224, 3), np.uint8))
    assert blank.status == OK and blank.crop.shape == (112, 112, 3) and blank.landmarks is None
    assert blank.extra["resized_from"] == [224, 224]


def _tiny_scrfd(path, size: int = 64) -> None:
    """A 9-output SCRFD-layout ONNX: face score = brightness, box +-1 stride, landmarks at fixed offsets."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    kps = np.array([-0.5, -0.5, 0.5, -0.5, 0.0, 0.0, -0.4, 0.5, 0.4, 0.5], np.float32)
    for stride in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"p{stride}"], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)):
            w = np.zeros((2 * k, 3, 1, 1), np.float32)
            b = np.zeros(2 * k, np.float32)
            if kind == "score":
                w[:, :, 0, 0] = 10.0 / 3  # mean brightness in [-1, 1] -> logit
                b[:] = -5.0
            elif kind == "bbox":
                b[:] = 1.0
            else:
                b[:] = np.tile(kps, 2)
            inits += [numpy_helper.from_array(w, f"w_{kind}{stride}"), numpy_helper.from_array(b, f"b_{kind}{stride}")]
            out = f"{kind}_{stride}"
            conv_in = [f"p{stride}", f"w_{kind}{stride}", f"b_{kind}{stride}"]
            nodes.append(helper.make_node("Conv", conv_in, [f"c_{out}"]))
            src = f"c_{out}"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [src], [f"s_{out}"]))
                src = f"s_{out}"
            nodes.append(helper.make_node("Transpose", [src], [f"t_{out}"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"shape_{out}"))
            nodes.append(helper.make_node("Reshape", [f"t_{out}", f"shape_{out}"], [out]))
            n = (size // stride) ** 2 * 2
            outputs.append((kind, stride, helper.make_tensor_value_info(out, TensorProto.FLOAT, [n, k])))
    order = [o for kind in ("score", "bbox", "kps") for (k2, _, o) in outputs if k2 == kind]
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
                              order, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_scrfd_backend_with_a_tiny_generated_model(tmp_path):
    pytest.importorskip("insightface", reason="the SCRFD backend needs insightface")
    from models.detectors import SCRFDDetector, make_detector

    pack = tmp_path / "tinypack"
    pack.mkdir()
    _tiny_scrfd(pack / "det_tiny.onnx")
    det = SCRFDDetector(pack, det_size=(64, 64))
    img = np.zeros((128, 128, 3), np.uint8)
    img[32:64, 64:96] = 255  # a bright 32x32 "face": image pixels 64..95 x, 32..63 y
    faces = det.detect(img)
    assert faces, "the bright block is detected"
    best = faces[int(np.argmax([f.score for f in faces]))]
    assert best.score > 0.95
    cx, cy = (best.box[0] + best.box[2]) / 2, (best.box[1] + best.box[3]) / 2
    assert 64 <= cx <= 96 and 32 <= cy <= 64
    # The nose offset is 0 -> the nose sits on the anchor centre, mid-box; eyes above it, left before right.
    lm = best.landmarks
    assert lm.shape == (5, 2)
    np.testing.assert_allclose(lm[2], [cx, cy], atol=1e-3)
    assert lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[0, 1] < lm[2, 1] < lm[3, 1]
    face = AlignStage(det).align("blk", img)
    assert face.status == OK and face.extra["n_faces"] == len(faces)
    assert isinstance(make_detector("scrfd", pack=pack, det_size=(64, 64)), SCRFDDetector)
    assert make_detector("auto", pack=tmp_path / "nowhere").name == "mtcnn" if _has_mtcnn() else True


def _has_mtcnn() -> bool:
    from models.weights import MissingWeightsError, mtcnn_paths

    try:
        mtcnn_paths()
    except MissingWeightsError:
        return False
    return True
