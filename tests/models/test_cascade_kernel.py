"""The compiled cascade level (models/cascade_level.c) against the numpy reference path of models.shape_predictor."""

from __future__ import annotations

import functools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from models import cascade_kernel
from models import shape_predictor as sp
from models.weights import dlib_model


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """An empty model store and no kernel loaded yet in this process (restored afterwards)."""
    _model()
    monkeypatch.setenv("FIQA_MODELS", str(tmp_path / "store"))
    cascade_kernel._loaded.cache_clear()
    yield tmp_path / "store"
    cascade_kernel._loaded.cache_clear()


@functools.lru_cache(maxsize=1)
def _model() -> sp.ShapeModel:
    """dlib's 68-point model, parsed once (before a test points the model store elsewhere)."""
    return sp.load_shape_model(dlib_model("shape_predictor_68_face_landmarks.dat"))


def _predictor() -> sp.ShapePredictor:
    return sp.ShapePredictor(_model())


def _numpy_points(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    reference = sp.ShapePredictor(_model(), compiled=False)
    assert reference.engine == "numpy (asked)"
    return reference.predict(images, boxes)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
@pytest.mark.skipif(os.environ.get(cascade_kernel.ENV_VAR, "").lower() == "off", reason="the kernel is switched off")
def test_compiled_cascade_gives_the_numpy_paths_points(aligned_identities):
    """Where a compiler exists the kernel is built and used, and its points equal the numpy path's on real faces
    (plain, mirrored, blurred, dark), boxes reaching outside the image, and another image size."""
    predictor = _predictor()
    assert predictor.engine.startswith("compiled C"), predictor.engine
    faces = list(aligned_identities().values())
    crops = faces + [np.ascontiguousarray(c[:, ::-1]) for c in faces]
    crops += [cv2.GaussianBlur(c, (0, 0), 2.0) for c in crops] + [(c * 0.3).astype(np.uint8) for c in crops]
    stack = np.stack(crops)
    rng = np.random.default_rng(3)
    lo, hi = rng.integers(-40, 40, (len(stack), 2)), rng.integers(60, 160, (len(stack), 2))
    boxes = np.concatenate([lo, hi], axis=1).astype(np.float64)
    got = predictor.predict(stack, boxes)
    np.testing.assert_array_equal(got, _numpy_points(stack, boxes))
    assert (got < 0).any() and (got > 111).any() and len(np.unique(got[:, :, 0])) > 50
    small = np.stack([cv2.resize(c, (72, 90)) for c in faces])  # not square, not 112
    box = np.tile([5.0, 8.0, 66.0, 84.0], (len(small), 1))
    np.testing.assert_array_equal(predictor.predict(small, box), _numpy_points(small, box))
    with ThreadPoolExecutor(4) as pool:  # the compiled path keeps no shared scratch: threads may share a predictor
        parallel = list(pool.map(lambda k: predictor.predict(stack[k::4], boxes[k::4]), range(4)))
    for k in range(4):
        np.testing.assert_array_equal(parallel[k], got[k::4])


def test_kernel_modes_and_a_failing_build(fresh_kernel, monkeypatch):
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "off")
    assert _predictor().engine == f"numpy ({cascade_kernel.ENV_VAR}=off)"
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{cascade_kernel.ENV_VAR}='fastest'"):
        _predictor()
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "auto")
    predictor = _predictor()
    assert predictor._level is None and predictor.engine.startswith("numpy (the cascade kernel could not be built")
    assert not list(fresh_kernel.glob("derived/*.so")) and not list(fresh_kernel.glob("derived/*.tmp*"))
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "require")
    with pytest.raises(cascade_kernel.KernelUnavailableError, match="could not be built"):
        _predictor()


def test_a_kernel_that_differs_from_the_numpy_path_is_not_used(monkeypatch, caplog):
    """The probe batch catches a kernel that gives other points (here: one that leaves the shapes alone)."""
    def lazy(*args):
        return 0

    monkeypatch.setattr(cascade_kernel, "kernel", lambda: (lazy, "compiled C (test)"))
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "auto")
    predictor = _predictor()
    assert predictor._level is None and "differs from the numpy path" in predictor.engine
    assert "differs from the numpy path" in caplog.text
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "require")
    with pytest.raises(cascade_kernel.KernelUnavailableError, match="differs"):
        _predictor()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_baseline_build_without_cpu_specific_clones_gives_the_same_points(fresh_kernel, monkeypatch,
                                                                             aligned_identities):
    """Another kernel path: the source built with no AVX2 clone (what a CPU without AVX2 runs) equals numpy too."""
    baseline = cascade_kernel._bind(cascade_kernel._build(cascade_kernel._compiler(), ("-DFIQA_NO_CLONES",)))
    monkeypatch.setattr(cascade_kernel, "kernel", lambda: (baseline, "compiled C (baseline)"))
    predictor = _predictor()
    assert predictor.engine == "compiled C (baseline)"
    faces = list(aligned_identities().values())
    stack = np.stack(faces + [np.ascontiguousarray(c[:, ::-1]) for c in faces])
    boxes = np.tile([-6.0, 4.0, 104.0, 118.0], (len(stack), 1))
    np.testing.assert_array_equal(predictor.predict(stack, boxes), _numpy_points(stack, boxes))


def test_a_read_only_store_builds_in_a_private_folder_and_refuses_a_shared_one(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setattr(cascade_kernel.os, "access", lambda path, mode: False)  # a shared, read-only model store
    monkeypatch.setattr(cascade_kernel.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    private = tmp_path / "tmp" / f"fiqa-kernels-{os.getuid()}"
    assert cascade_kernel._build_dir() == private and private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)  # others may write there (and plant a library): not used
    with pytest.raises(OSError, match="only this user"):
        cascade_kernel._build_dir()
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setenv(cascade_kernel.ENV_VAR, "auto")
    predictor = _predictor()  # the build fails over to the numpy path, naming why
    assert predictor._level is None and "only this user" in predictor.engine
