"""CPBD against the MATLAB reference matrices and the cpbd-py312 port; the blur label stage on real faces."""

from __future__ import annotations

import argparse
import json
import math
from functools import cache, lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from data_manifest.vocabulary import (
    BLUR_THRESHOLDS,
    CALIBRATED_BLUR_THRESHOLDS,
    PAPER_BLUR_THRESHOLDS,
    blur_class,
    parse_blur_thresholds,
)
from models.fit_data.face_sets import shipped_images
from pipeline.labellers import blur
from pipeline.labellers.base import ERROR, NO_FACE, OK, FaceCrop
from pipeline.labellers.blur import FACE_GRID, BlockGrid, BlurStage

DATA = Path(__file__).resolve().parents[1] / "data" / "cpbd-matlab"
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


@cache
def matlab(name: str) -> np.ndarray:
    """One of the MATLAB CPBD reference matrices for LIVE gblur img1 (512x768)."""
    return np.loadtxt(DATA / f"reference_img1_{name}.txt", delimiter=",")


def port():
    return pytest.importorskip("cpbd", reason="cpbd-py312 (test dependency) is not installed")


# --- MATLAB reference -------------------------------------------------------


def test_marziliano_widths_equal_matlab_reference():
    widths = blur.marziliano_widths(matlab("input"), matlab("sobel"))
    expected = matlab("marziliano")
    assert widths.shape == (512, 768)
    assert np.count_nonzero(expected) == 9585
    np.testing.assert_array_equal(widths, expected)


def test_metric_from_matlab_maps():
    value = blur.cpbd_from_maps(matlab("input"), matlab("canny"), matlab("marziliano"))
    assert value == pytest.approx(0.1349, abs=0.0005)
    details = blur.cpbd_details(matlab("input"), matlab("canny"), matlab("marziliano"))
    # 8 x 12 whole 64x64 blocks; 90 have more than 0.2 % Canny pixels; 9563 of the 9585 widths lie in them.
    assert (details.n_blocks, details.n_edge_blocks, details.n_edges) == (96, 90, 9563)


# --- cpbd-py312 port -------------------------------------------------------


def _textures() -> dict[str, np.ndarray]:
    """Generated test images: smoothed noise at several scales, steps, ramps, stripes, flat regions."""
    rng = np.random.default_rng(20110901)
    out: dict[str, np.ndarray] = {}
    for i, (size, sigma) in enumerate([(112, 0.0), (112, 1.0), (112, 2.5), (128, 1.5), (160, 0.7), (256, 1.2)]):
        img = rng.random((size, size + 16 * i)) * 255
        out[f"noise{size}_s{sigma}"] = np.rint(ndi.gaussian_filter(img, sigma)) if sigma else np.rint(img)
    yy, xx = np.mgrid[0:144, 0:144]
    out["disc144"] = np.where((yy - 70) ** 2 + (xx - 75) ** 2 < 45**2, 200.0, 40.0)
    out["disc144_blur"] = np.rint(ndi.gaussian_filter(out["disc144"], 2.0))
    out["stripes200"] = np.rint(
        127.5 + 120 * np.sin(xx[:, :128].repeat(2, 0)[:200] / 3.0 + yy[:, :128].repeat(2, 0)[:200] / 7.0)
    )
    out["checker112"] = np.where(((yy[:112, :112] // 9) + (xx[:112, :112] // 13)) % 2 == 0, 30.0, 90.0)
    out["low_contrast112"] = np.rint(100 + 20 * rng.random((112, 112)))  # block contrast <= 50: JNB width 5
    out["float_noise120"] = ndi.gaussian_filter(rng.random((120, 130)) * 255, 1.3)  # non-integer doubles
    out["flat_and_edge128"] = np.pad(np.full((64, 128), 180.0), ((0, 64), (0, 0)), constant_values=60.0)
    out["uint8_noise512"] = np.rint(ndi.gaussian_filter(rng.random((512, 512)) * 255, 1.0)).astype(np.uint8)
    return out


def _real_gray() -> dict[str, np.ndarray]:
    """Package-shipped real images as grayscale, 112 to 512 px."""
    from skimage import data

    faces = {name: blur.rgb_to_gray(img) for name, img in shipped_images().items()}
    t1 = faces.pop("t1")
    return {
        "tom_hanks112": faces["tom_hanks"],
        "astronaut512": faces["astronaut"],
        "astronaut_face200": faces["astronaut"][20:220, 120:320],
        "t1_crop256": t1[250:506, 400:656],
        "t1_face128": t1[290:418, 440:568],
        "camera160": data.camera()[100:260, 200:360].astype(np.float64),
    }


@pytest.fixture(scope="module")
def port_images() -> dict[str, np.ndarray]:
    return {**_textures(), **_real_gray()}


def test_port_comparison_set_is_wide_enough(port_images):
    sizes = [min(img.shape) for img in port_images.values()]
    assert len(port_images) >= 20
    assert min(sizes) == 112 and max(sizes) == 512


@pytest.mark.slow
def test_cpbd_equals_port(port_images):
    cpbd_port = port()
    diffs = {}
    for name, img in port_images.items():
        ours = blur.cpbd(img)
        theirs = float(cpbd_port.compute(img))
        diffs[name] = abs(ours - theirs)
        assert 0.0 <= ours <= 1.0
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-9, f"{worst}: |ours - port| = {diffs[worst]}"
    values = [blur.cpbd(img) for img in port_images.values()]
    assert len({round(v, 6) for v in values}) >= 15  # a spread of values, not a constant


def test_sub_steps_equal_port(port_images):
    port()
    from cpbd.compute import marziliano_method
    from cpbd.octave import sobel
    from skimage.feature import canny

    for name, img in port_images.items():
        img64 = img.astype(np.float64)
        np.testing.assert_array_equal(blur.canny_edges(img), canny(img64), err_msg=name)
        np.testing.assert_array_equal(blur.sobel_edges(img), sobel(img64), err_msg=name)
        if img.size <= 160 * 160:  # the port's per-pixel loop is slow; the small ones suffice
            edges = sobel(img64)
            np.testing.assert_array_equal(blur.marziliano_widths(img, edges), marziliano_method(edges, img64), name)


def test_fast_path_equals_map_path(port_images):
    for name, img in port_images.items():
        full = blur.cpbd_details(img, blur.canny_edges(img), blur.marziliano_widths(img, blur.sobel_edges(img)))
        assert blur.measure(img) == full, name
        if img.shape[0] >= 112 and img.shape[1] >= 104:
            face = blur.cpbd_details(
                img, blur.canny_edges(img), blur.marziliano_widths(img, blur.sobel_edges(img)), FACE_GRID
            )
            assert blur.measure(img, FACE_GRID) == face, name


def test_documented_deviation_all_angles_zero():
    """The port skips widths when every gradient angle is 0 (`np.any`); MATLAB (`numel`) measures them."""
    cpbd_port = port()
    # Columns constant, brightness never falling left to right: gradient angle 0 everywhere.
    offset = np.array([0.0] * 14 + [5.0, 30.0] + [40.0] * 16)  # a two-pixel rise every 32 columns
    cols = np.arange(128)
    img = np.tile(40.0 * (cols // 32) + offset[cols % 32], (128, 1))
    assert float(cpbd_port.compute(img)) == 0.0
    widths = blur.marziliano_widths(img, blur.sobel_edges(img))
    assert np.count_nonzero(widths) == 4 * 126  # one edge per rise on every interior row
    assert set(np.unique(widths[widths > 0])) == {3.0}  # the 5-step left of the edge pixel, plus 2
    assert blur.cpbd(img) == 1.0


def test_small_images_have_no_blocks():
    cpbd_port = port()
    rng = np.random.default_rng(3)
    for shape in [(2, 2), (3, 50), (63, 200), (200, 63)]:
        img = np.rint(rng.random(shape) * 255)
        assert blur.cpbd(img) == 0.0 == float(cpbd_port.compute(img))


def test_flat_image_is_zero_as_matlab():
    result = blur.measure(np.full((128, 128), 77, dtype=np.uint8))
    assert result == blur.CpbdResult(0.0, 4, 0, 0)


def test_jnb_width_follows_block_contrast():
    # One vertical step per row in a 64x64 block: width 2 + run lengths; contrast decides the JNB width.
    def block(low: float, high: float) -> np.ndarray:
        row = np.concatenate([np.full(30, low), np.linspace(low, high, 6)[1:-1], np.full(30, high)])
        return np.tile(row, (64, 1))

    widths = np.zeros((64, 64))
    widths[10:50, 32] = 5.0
    canny = np.zeros((64, 64), dtype=bool)
    canny[10:50, 32] = True
    # Width 5 with JNB 5 gives P_blur = 1 - e^-1 = 0.632 (bin 63): sharp; with JNB 3 it is blurred.
    assert blur.cpbd_from_maps(block(100, 150), canny, widths) == 1.0  # contrast 50 -> JNB 5
    assert blur.cpbd_from_maps(block(100, 151), canny, widths) == 0.0  # contrast 51 -> JNB 3


# --- face region and the label stage ---------------------------------------


def test_face_grid_covers_the_aligned_face():
    assert BlockGrid.reference((112, 112)) == BlockGrid(0, 0, 64, 64, 1, 1)  # the reference sees one block
    FACE_GRID.check((112, 112))
    top, left = FACE_GRID.top, FACE_GRID.left
    bottom = top + FACE_GRID.rows * FACE_GRID.block_height
    right = left + FACE_GRID.cols * FACE_GRID.block_width
    x, y = ARCFACE_TEMPLATE[:, 0], ARCFACE_TEMPLATE[:, 1]
    assert (x - left).min() >= 20 and (right - x).min() >= 20  # eyes and mouth corners well inside
    assert (y - top).min() >= 30 and (bottom - y).min() >= 15  # brows above the eyes, chin below the mouth
    assert FACE_GRID.n_blocks == 4


@lru_cache(maxsize=1)
def aligned_faces() -> dict[str, np.ndarray]:
    """112x112 ArcFace-aligned crops of the package-shipped faces (dlib 68 landmarks -> 5 points)."""
    dlib = pytest.importorskip("dlib")
    frm = pytest.importorskip("face_recognition_models")
    from skimage.transform import SimilarityTransform

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(frm.pose_predictor_model_location())
    shipped = shipped_images()
    faces = {"tom_hanks": shipped["tom_hanks"]}
    for name in ("astronaut", "t1"):
        img = np.ascontiguousarray(shipped[name])
        for i, rect in enumerate(detector(img, 0)):
            p = np.array([[q.x, q.y] for q in predictor(img, rect).parts()], dtype=np.float64)
            five = np.array([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
            tform = SimilarityTransform.from_estimate(five, ARCFACE_TEMPLATE)
            assert tform, f"no similarity estimate for {name} face {i}"
            faces[f"{name}_{i}"] = cv2.warpAffine(img, tform.params[:2], (112, 112), flags=cv2.INTER_LINEAR)
    return faces


def gaussian_blurred(crop: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return crop
    out = np.stack([ndi.gaussian_filter(crop[:, :, k].astype(np.float64), sigma) for k in range(3)], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_blur_class_moves_towards_hazy_on_real_faces():
    faces = aligned_faces()
    assert len(faces) >= 6
    sigmas = (0.0, 1.0, 2.0, 3.0, 4.0)
    stage = BlurStage()
    sharp_classes = []
    for name, crop in faces.items():
        rows = stage([FaceCrop(f"{name}@{s}", gaussian_blurred(crop, s)) for s in sigmas])
        values = [r["value"] for r in rows]
        classes = [r["class_index"] for r in rows]
        assert all(b <= a for a, b in zip(values, values[1:], strict=False)), (
            f"{name}: CPBD not monotone over sigma: {values}"
        )
        assert all(b <= a for a, b in zip(classes, classes[1:], strict=False)), f"{name}: class not monotone: {classes}"
        assert values[0] > values[2] + 0.1, f"{name}: sigma 2 should lower CPBD clearly: {values}"
        assert classes[-2:] == [0, 0]  # hazy from sigma 3 on
        sharp_classes.append(classes[0])
    assert sharp_classes == [2] * len(faces)  # with the calibrated defaults every unblurred face is clear


def test_calibrated_defaults_on_real_faces_sharp_clear_blurred_not():
    """A sharp aligned real face is "clear", the same face at sigma 2 px is not; the paper's values call none clear."""
    assert BLUR_THRESHOLDS == CALIBRATED_BLUR_THRESHOLDS == parse_blur_thresholds("calibrated")
    lo, hi = BLUR_THRESHOLDS
    for name, crop in aligned_faces().items():
        sharp, blurred = blur.face_cpbd(crop), blur.face_cpbd(gaussian_blurred(crop, 2.0))
        assert sharp > hi and blur_class(sharp).name == "clear", (name, sharp)
        assert blurred <= hi and blur_class(blurred).name in ("hazy", "blurry"), (name, blurred)
        assert blur_class(sharp, parse_blur_thresholds("paper")).name != "clear", (name, sharp)
    assert 0 < lo < hi < PAPER_BLUR_THRESHOLDS[0]


def test_blur_thresholds_parse():
    assert parse_blur_thresholds("paper") == PAPER_BLUR_THRESHOLDS == (0.35, 0.7)
    assert parse_blur_thresholds(" Calibrated ") == CALIBRATED_BLUR_THRESHOLDS
    assert parse_blur_thresholds("0.1,0.2") == (0.1, 0.2) and parse_blur_thresholds("0.3, 0.3") == (0.3, 0.3)
    for bad, match in [("sharp", "'calibrated' or 'paper' or 'LOW,HIGH'"), ("0.1", "LOW,HIGH"),
                       ("0.1,0.2,0.3", "LOW,HIGH"), ("0.5,0.2", "0 <= LOW <= HIGH <= 1"),
                       ("0.1,1.5", "0 <= LOW <= HIGH <= 1"), ("nan,0.5", "0 <= LOW <= HIGH <= 1")]:
        with pytest.raises(ValueError, match=match):
            parse_blur_thresholds(bad)
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--blur-thresholds", type=parse_blur_thresholds, default="calibrated")
    assert parser.parse_args([]).blur_thresholds == CALIBRATED_BLUR_THRESHOLDS
    assert parser.parse_args(["--blur-thresholds", "paper"]).blur_thresholds == (0.35, 0.7)
    with pytest.raises(argparse.ArgumentError, match="got '0.9,0.1'"):  # the parser shows the reason
        parser.parse_args(["--blur-thresholds", "0.9,0.1"])


def test_stage_rows_and_threshold_edges():
    crop = aligned_faces()["tom_hanks"]
    value = blur.face_cpbd(crop)
    assert 0.0 < value < 1.0

    def decide(thresholds: tuple[float, float]) -> str:
        row = BlurStage(thresholds)([FaceCrop("s", crop)])[0]
        assert row["value"] == value
        assert json.loads(row["thresholds"]) == {"hazy_below": thresholds[0], "clear_above": thresholds[1]}
        assert row["class_name"] == blur_class(value, thresholds).name
        return row["class_name"]

    assert decide((value, 0.99)) == "blurry"  # equal to the low threshold: not hazy
    assert decide((math.nextafter(value, 1.0), 0.99)) == "hazy"
    assert decide((0.01, value)) == "blurry"  # equal to the high threshold: not clear
    assert decide((0.01, math.nextafter(value, 0.0))) == "clear"

    row = BlurStage()([FaceCrop("s", crop)])[0]
    assert row["factor"] == "blur" and row["labeller"] == "cpbd" and row["status"] == OK and row["error"] is None
    assert row["labeller_version"].startswith(blur.VERSION)
    assert json.loads(row["thresholds"]) == {"hazy_below": BLUR_THRESHOLDS[0], "clear_above": BLUR_THRESHOLDS[1]}
    details = json.loads(row["details"])
    assert details["grid"] == FACE_GRID.to_dict()
    assert details["n_blocks"] == 4 and details["n_edge_blocks"] == 4 and details["n_edges"] > 100


def test_stage_failures_become_rows():
    flat = np.full((112, 112, 3), 128, dtype=np.uint8)
    nan_crop = np.full((112, 112, 3), np.nan)
    batch = [
        FaceCrop("noface", None, status=NO_FACE, error="no face detected"),
        FaceCrop("missing", None),
        FaceCrop("small", np.zeros((60, 60, 3), dtype=np.uint8)),
        FaceCrop("nan", nan_crop),
        FaceCrop("gray", np.zeros((112, 112), dtype=np.uint8)),
        FaceCrop("flat_list", np.zeros(12, dtype=np.uint8)),
        FaceCrop("text", np.full((112, 112, 3), "x")),
        FaceCrop("flat", flat),
    ]
    rows = {r["sample_id"]: r for r in BlurStage()(batch)}
    assert len(rows) == len(batch)
    assert rows["noface"]["status"] == NO_FACE and rows["noface"]["error"] == "no face detected"
    assert rows["noface"]["value"] is None and rows["noface"]["class_name"] is None
    assert rows["missing"]["status"] == ERROR and "missing" in rows["missing"]["error"]
    assert rows["small"]["status"] == ERROR and "outside the image" in rows["small"]["error"]
    assert rows["nan"]["status"] == ERROR and "NaN" in rows["nan"]["error"]
    assert rows["gray"]["status"] == ERROR and "(H, W, 3)" in rows["gray"]["error"]
    assert rows["flat_list"]["status"] == ERROR and "(H, W, 3)" in rows["flat_list"]["error"]
    assert rows["text"]["status"] == ERROR and "dtype <U1" in rows["text"]["error"]
    # No edge block: CPBD 0 as the MATLAB code gives, labelled hazy, flagged in the details.
    assert rows["flat"]["status"] == OK and rows["flat"]["value"] == 0.0 and rows["flat"]["class_name"] == "hazy"
    assert json.loads(rows["flat"]["details"])["no_edge_blocks"] is True


def test_stage_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="ordered"):
        BlurStage((0.7, 0.35))


# --- bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((8, 8, 3)), "2-D grayscale"),
        (np.zeros((0, 5)), "empty"),
        (np.array([[1.0, np.nan], [0.0, 2.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 2.0]]), "NaN or infinite"),
        (np.array([[0.0, 256.0], [0.0, 2.0]]), "0..255"),
        (np.array([[-1.0, 0.0], [0.0, 2.0]]), "0..255"),
        (np.zeros((4, 4), dtype=bool), "dtype bool"),
        (np.zeros((4, 4), dtype=complex), "dtype complex"),
        (np.array([["a", "b"], ["c", "d"]]), "dtype <U1"),
    ],
)
def test_bad_input_raises(image, match):
    with pytest.raises(ValueError, match=match):
        blur.cpbd(image)


def test_bad_maps_and_grids_raise():
    img = np.zeros((64, 64))
    with pytest.raises(ValueError, match="Sobel edge map shape"):
        blur.marziliano_widths(img, np.zeros((64, 63), dtype=bool))
    with pytest.raises(ValueError, match="Canny edge map shape"):
        blur.cpbd_from_maps(img, np.zeros((63, 64)), np.zeros((64, 64)))
    with pytest.raises(ValueError, match="outside the image"):
        blur.measure(img, BlockGrid(16, 8, 48, 48, 2, 2))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        blur.face_cpbd(np.zeros((112, 112)))


# --- batched CPBD -----------------------------------------------------------


def test_fixed_point_gray_equals_the_float_weights_on_every_rgb_triple():
    """rgb_to_gray on whole numbers (22-bit fixed point) equals rint(rgb @ weights) for all 2**24 triples."""
    levels = np.arange(256, dtype=np.uint8)
    g, b = np.meshgrid(levels, levels, indexing="ij")
    for r in range(256):
        rgb = np.stack([np.full_like(g, r), g, b], axis=-1)  # (256, 256, 3): every (g, b) with this r
        reference = np.clip(np.rint(rgb.astype(np.float64) @ blur._RGB2GRAY), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(blur.rgb_to_gray(rgb), reference, err_msg=f"r={r}")
    floats = np.random.default_rng(5).random((40, 30, 3)) * 255  # non-integer RGB keeps the float path
    np.testing.assert_array_equal(blur.rgb_to_gray(floats), np.rint(floats @ blur._RGB2GRAY).astype(np.uint8))


def test_sampled_canny_rows_equal_the_full_map(port_images):
    images = [*port_images.values(), *(blur.rgb_to_gray(c) for c in aligned_faces().values())]
    with_edges = 0
    for img in images:
        gray = blur.as_gray(img)
        rows = np.arange(blur._CANNY_REACH, gray.shape[0] - blur._CANNY_REACH, 5)
        strong = blur._canny_candidates(blur._canny_gradients(gray))[1]
        sampled = blur._sampled_strong(gray[None], rows)[0]
        np.testing.assert_array_equal(sampled, strong[rows])
        with_edges += bool(sampled.any())
    assert with_edges >= len(images) - 3


def _crop_batch() -> list[np.ndarray]:
    """Real aligned faces, blurred, darkened and noisy, plus flat, noise and half-flat crops."""
    rng = np.random.default_rng(11)
    crops = []
    for crop in aligned_faces().values():
        for sigma in (0.0, 1.0, 2.5, 5.0):
            out = gaussian_blurred(crop, sigma).astype(np.float64) * rng.uniform(0.3, 1.2)
            crops.append(np.clip(np.rint(out + rng.normal(0, 4, out.shape)), 0, 255).astype(np.uint8))
    half = crops[0].copy()
    half[:, 56:] = 90
    crops += [np.full((112, 112, 3), 128, np.uint8), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), half]
    return crops


def test_batched_face_cpbd_equals_crop_by_crop():
    crops = _crop_batch()
    single = [blur.face_measure(c) for c in crops]
    assert blur.face_measure_many(crops) == single
    assert blur.face_measure_many(np.stack(crops[:1])) == single[:1]  # a batch of one, as an array
    values = [r.value for r in single]
    assert len(set(values)) > len(crops) - 5 and min(values) == 0.0 and max(values) > 0.5
    assert single[-3] == blur.CpbdResult(0.0, 4, 0, 0)  # flat: no edge block
    # A chunk boundary inside the batch changes nothing.
    assert len(crops) > blur._CHUNK and blur.face_measure_many(crops[1:]) == single[1:]


def test_measure_many_equals_measure_on_every_image_kind(port_images):
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for img in port_images.values():
        by_shape.setdefault(img.shape, []).append(img)
    by_shape[(112, 112)].append(np.rint(np.random.default_rng(2).random((112, 112)) * 255).astype(np.int64))
    traced = 0
    for faint in (0.04, 0.05):  # a faint step under a strong one: weak Canny pixels that need hysteresis
        img = np.full((128, 128), 100.0)
        img[:64, 30:] += 5.0
        img[64:, 30:] += faint
        by_shape.setdefault(img.shape, []).append(img)
        keep, strong = blur._canny_candidates(blur._canny_gradients(img))
        grid = BlockGrid.reference(img.shape)
        traced += bool(((grid.counts(strong) <= 8) & (grid.counts(keep) > 8)).any())  # decided by the tracing
    assert traced
    assert max(len(v) for v in by_shape.values()) >= 5 and len(by_shape[(128, 128)]) >= 3
    for shape, images in by_shape.items():
        for grid in (None, FACE_GRID) if shape[0] >= 112 and shape[1] >= 104 else (None,):
            assert blur.measure_many(images, grid) == [blur.measure(img, grid) for img in images], shape
    floats = [img for img in port_images.values() if img.dtype == np.float64 and not np.array_equal(img, np.rint(img))]
    assert floats  # the float (non-integer) path is covered too
    assert blur.measure_many([]) == []
    with pytest.raises(ValueError, match="2-D grayscale"):
        blur.measure_many(np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"same shape, got \[\(112, 112\), \(112, 120\)\]"):
        blur.measure_many([np.zeros((112, 112)), np.zeros((112, 120))])
    with pytest.raises(ValueError, match="face crops must all have the same shape"):
        blur.face_measure_many([np.zeros((112, 112, 3), np.uint8), np.zeros((112, 113, 3), np.uint8)])


def test_stage_batch_rows_equal_rows_one_by_one():
    crops = _crop_batch()
    batch = [FaceCrop(f"s{i}", c) for i, c in enumerate(crops)]
    batch.insert(3, FaceCrop("noface", None, status=NO_FACE, error="no face detected"))
    batch.insert(7, FaceCrop("float", crops[0].astype(np.float64)))  # not uint8: measured on its own
    batch.insert(9, FaceCrop("small", np.zeros((60, 60, 3), dtype=np.uint8)))  # grid outside: an error row
    batch.append(FaceCrop("small2", np.full((60, 60, 3), 7, dtype=np.uint8)))
    stage = BlurStage()
    rows = stage(batch)
    assert rows == [stage.label(face) for face in batch]
    assert [r["sample_id"] for r in rows] == [f.sample_id for f in batch]
    assert rows[7]["value"] == rows[0]["value"]  # the float copy of crop 0 measures the same
    assert rows[9]["status"] == ERROR and "outside the image" in rows[9]["error"]
    assert stage(batch[:1]) == rows[:1]


def test_pixelated_and_upsampled_faces_are_not_clear_while_their_originals_stay_clear(aligned_identities):
    """Lost resolution reads as lost detail: nearest-neighbour blocks are measured at their own resolution
    (`pixel_block` ~ the block side), and smooth 3x upsampling leaves too little high-band energy."""
    import cv2

    from pipeline.labellers.base import FaceCrop
    from pipeline.labellers.blur import HIGH_BAND_MIN, BlurStage, high_band, pixel_block

    crops = list(aligned_identities().values())

    def down_up(c, k, up):
        small = cv2.resize(c, (round(112 / k), round(112 / k)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (112, 112), interpolation=up)

    for c in crops:
        assert pixel_block(c) < 1.2
        assert pixel_block(down_up(c, 3, cv2.INTER_NEAREST)) == pytest.approx(3.0, abs=0.5)
        assert pixel_block(down_up(c, 2, cv2.INTER_NEAREST)) == pytest.approx(2.0, abs=0.3)
    assert (high_band(np.stack(crops)) > HIGH_BAND_MIN).all()
    assert (high_band(np.stack([down_up(c, 3, cv2.INTER_LINEAR) for c in crops])) < HIGH_BAND_MIN).all()
    stage = BlurStage()
    clean = stage([FaceCrop(str(i), c) for i, c in enumerate(crops)])
    assert [r["class_name"] for r in clean] == ["clear"] * len(crops)
    for k, up in ((3, cv2.INTER_NEAREST), (3, cv2.INTER_LINEAR), (4, cv2.INTER_NEAREST), (4, cv2.INTER_LINEAR)):
        rows = stage([FaceCrop(str(i), down_up(c, k, up)) for i, c in enumerate(crops)])
        assert all(r["class_name"] != "clear" for r in rows), (k, up, [r["class_name"] for r in rows])
        one = stage.label(FaceCrop("0", down_up(crops[0], k, up)))  # the one-crop path agrees with the batch
        assert (one["class_name"], one["value"]) == (rows[0]["class_name"], rows[0]["value"])
    pix = stage([FaceCrop("p", down_up(crops[0], 3, cv2.INTER_NEAREST))])[0]
    details = pix["details"] if isinstance(pix["details"], dict) else __import__("json").loads(pix["details"])
    assert details["pixelated"]["cpbd_as_given"] > pix["value"]  # the step edges read sharper than the face is
