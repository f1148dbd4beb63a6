"""Recognition backends: one interface, real dlib faces, tiny ONNX graphs and iresnet checkpoints built here."""

from __future__ import annotations

import numpy as np
import pytest

from models import recognition as R


def _rng_crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def test_crop_checks_name_the_bad_input():
    assert R.check_crops(np.zeros((112, 112, 3), np.uint8)).shape == (1, 112, 112, 3)
    with pytest.raises(ValueError, match="float32"):
        R.check_crops(np.zeros((2, 112, 112, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 96, 96, 3\)"):
        R.check_crops(np.zeros((2, 96, 96, 3), np.uint8))


def test_spec_parsing_and_errors():
    assert R.parse_spec("onnx:/m/a.onnx?size=128&bgr=1") == ("onnx", "/m/a.onnx", {"size": "128", "bgr": "1"})
    assert R.parse_spec("dlib") == ("dlib", "", {})
    with pytest.raises(ValueError, match="unknown recogniser kind 'facenet'"):
        R.build_recognizer("facenet:/x")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        R.build_recognizer("onnx:/x.onnx?colour=rgb")
    with pytest.raises(FileNotFoundError):
        R.build_recognizer("onnx:/nonexistent/model.onnx")
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        R.build_recognizer("iresnet50")


# ------------------------------------------------------------------------------ dlib


@pytest.fixture(scope="module")
def tom():
    from models.fit_data.face_sets import shipped_images

    return shipped_images()["tom_hanks"]


def test_dlib_template_chip_matches_dlibs_own_alignment(tom):
    dlib = pytest.importorskip("dlib")
    frm = pytest.importorskip("face_recognition_models")
    import cv2

    rec = R.build_recognizer("dlib")
    assert rec.model_id == "dlib_resnet_v1:template" and rec.embedding_dim == 128
    e = rec.embed(tom)[0]
    assert e.dtype == np.float32 and abs(np.linalg.norm(e) - 1) < 1e-5
    # dlib's own path: HOG detector + 5-point landmarks + get_face_chip on a padded, upscaled image.
    big = cv2.resize(cv2.copyMakeBorder(tom, 56, 56, 56, 56, cv2.BORDER_REFLECT), (448, 448))
    det = dlib.get_frontal_face_detector()(big, 1)
    assert len(det) == 1
    shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())(big, det[0])
    net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    native = np.array(net.compute_face_descriptor(big, shape))
    chip_vec = np.array(net.compute_face_descriptor(rec.chips(tom[None])[0]))
    # Same face through both alignments: far inside dlib's same-person distance of 0.6.
    assert np.linalg.norm(native - chip_vec) < 0.3
    assert float(e @ (native / np.linalg.norm(native))) > 0.98
    lm = R.build_recognizer("dlib?align=landmarks").embed(tom)[0]
    assert float(e @ lm) > 0.98


def test_dlib_batches_equal_singles_and_separate_identities(tom):
    pytest.importorskip("dlib")
    from models.fit_data.face_sets import shipped_images

    ast = shipped_images()["astronaut"]
    import cv2

    other = cv2.resize(ast[40:300, 120:380], (112, 112), interpolation=cv2.INTER_AREA)
    crops = np.stack([tom, tom[:, ::-1].copy(), other])
    rec = R.DlibRecognizer(batch_size=2)
    batch = rec.embed(crops)
    singles = np.concatenate([rec.embed(c) for c in crops])
    np.testing.assert_allclose(batch, singles, atol=1e-6)
    assert batch[0] @ batch[1] > batch[0] @ batch[2]


# ------------------------------------------------------------------------------ ONNX


def _tiny_onnx(path, weight: np.ndarray, *, baked: bool = False, size: int = 112) -> None:
    """A recogniser-shaped graph: [optional Sub/Mul normalisation] -> per-channel mean -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(weight.astype(np.float32), "W")]
    src = "input"
    if baked:
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "m"),
                  numpy_helper.from_array(np.array(1 / 127.5, np.float32), "s")]
        nodes += [helper.make_node("Sub", ["input", "m"], ["sub"], name="Sub_0"),
                  helper.make_node("Mul", ["sub", "s"], ["mul"], name="Mul_1")]
        src = "mul"
    nodes += [helper.make_node("ReduceMean", [src], ["pooled"], axes=[2, 3], keepdims=0),
              helper.make_node("MatMul", ["pooled", "W"], ["emb"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["N", 3, size, size])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", weight.shape[1]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _expected(crops, weight, mean, std, bgr=False):
    x = crops[..., ::-1] if bgr else crops
    pooled = ((x.astype(np.float64) - mean) / std).mean(axis=(1, 2))
    e = pooled @ weight
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_onnx_backend_applies_the_declared_preprocessing(tmp_path):
    pytest.importorskip("onnxruntime")
    w = np.random.default_rng(1).normal(size=(3, 6))
    _tiny_onnx(tmp_path / "tiny.onnx", w)
    crops = _rng_crops(5)
    rgb = R.build_recognizer(f"onnx:{tmp_path / 'tiny.onnx'}", device="cpu", batch_size=2)
    assert rgb.embedding_dim == 6 and rgb.model_id.startswith("onnx:tiny:")
    np.testing.assert_allclose(rgb.embed(crops), _expected(crops, w, 127.5, 127.5), atol=1e-5)
    spec = f"onnx:{tmp_path / 'tiny.onnx'}?bgr=1&mean=123.675,116.28,103.53&std=58.395,57.12,57.375"
    bgr = R.build_recognizer(spec, device="cpu")
    want = _expected(crops, w, np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375]), bgr=True)
    np.testing.assert_allclose(bgr.embed(crops), want, atol=1e-5)
    with pytest.raises(ValueError, match="size=128"):
        R.build_recognizer(f"onnx:{tmp_path / 'tiny.onnx'}?size=128", device="cpu")


def test_insightface_pack_picks_the_recogniser_and_its_normalisation(tmp_path):
    pytest.importorskip("onnxruntime")
    pack = tmp_path / "buffalo_test"
    pack.mkdir()
    w = np.random.default_rng(2).normal(size=(3, 8))
    _tiny_onnx(pack / "det_like.onnx", np.ones((3, 2)), size=640)  # not 112x112: skipped
    _tiny_onnx(pack / "w600k_tiny.onnx", w, baked=True)
    rec = R.build_recognizer(f"insightface:{pack}", device="cpu")
    assert rec.path.name == "w600k_tiny.onnx" and rec.model_id.startswith("insightface:w600k_tiny:")
    assert float(rec.mean[0]) == 0.0 and float(rec.std[0]) == 1.0
    crops = _rng_crops(3, seed=5)
    np.testing.assert_allclose(rec.embed(crops), _expected(crops, w, 127.5, 127.5), atol=1e-5)
    _tiny_onnx(tmp_path / "plain.onnx", w)
    plain = R.insightface_recognizer(tmp_path / "plain.onnx", device="cpu")
    assert float(plain.mean[0]) == 127.5
    np.testing.assert_allclose(plain.embed(crops), rec.embed(crops), atol=1e-5)
    (tmp_path / "empty_pack").mkdir()
    with pytest.raises(FileNotFoundError, match="no recognition model"):
        R.insightface_recognizer(tmp_path / "empty_pack")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.insightface_recognizer(tmp_path / "missing_pack")


# --------------------------------------------------------------------------- iresnet


class Unsafe:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_iresnet_checkpoint_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = R.build_iresnet((1, 1, 1, 1), num_features=32)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode inference is really exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.qs.weight"] = torch.zeros(1, 32)  # CR-FIQA's quality head is ignored
    torch.save({"state_dict": state}, tmp_path / "backbone.pth")
    crops = _rng_crops(3, seed=7)
    rec = R.build_recognizer(f"iresnet:{tmp_path / 'backbone.pth'}", device="cpu", batch_size=2)
    assert rec.embedding_dim == 32 and rec.model_id.startswith("iresnet:backbone:")
    with torch.no_grad():
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        want = torch.nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(rec.embed(crops), want, atol=1e-5)
    with pytest.raises(ValueError, match="not iresnet50"):
        R.build_recognizer(f"iresnet50:{tmp_path / 'backbone.pth'}", device="cpu")
    assert R.infer_iresnet_layers(R.build_iresnet((2, 1, 3, 1), 16).state_dict()) == ((2, 1, 3, 1), 16)
    torch.save({"obj": Unsafe()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        R.build_recognizer(f"iresnet:{tmp_path / 'evil.pth'}", device="cpu")
