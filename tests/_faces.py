"""Package-shipped real faces and MTCNN availability, shared by the alignment, pose and label tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.weights import MissingWeightsError, mtcnn_paths


def insightface_image(name: str) -> np.ndarray:
    """An RGB image from the insightface package's data/images."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    bgr = cv2.imread(str(path))
    if bgr is None:
        pytest.skip(f"insightface package image {path} is not readable")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


REAL_FACES = {
    "t1": lambda: insightface_image("t1.jpg"),
    "tom_hanks": lambda: insightface_image("Tom_Hanks_54745.png"),
    "astronaut": astronaut,
}


@lru_cache(maxsize=1)
def mtcnn_detector():
    """The MTCNN detector, or a skip naming the command that fetches its weights."""
    try:
        mtcnn_paths()
    except MissingWeightsError as e:
        pytest.skip(f"MTCNN weights missing: {e}")
    import torch

    torch.set_num_threads(2)
    from models.detectors import MTCNNDetector

    return MTCNNDetector()


@lru_cache(maxsize=8)
def real_face(name: str) -> np.ndarray:
    """A package-shipped real image by name (read once per test session)."""
    img = REAL_FACES[name]()
    img.setflags(write=False)
    return img


@lru_cache(maxsize=16)
def mtcnn_result(name: str, flipped: bool = False):
    """MTCNN's raw result on a real image (optionally flipped left-right), computed once per session."""
    img = real_face(name)
    return mtcnn_detector().model.detect(np.ascontiguousarray(img[:, ::-1]) if flipped else img)
