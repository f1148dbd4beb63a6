"""Package-shipped real faces and MTCNN availability, shared by the alignment, pose and label tests."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from models.fit_data.face_sets import shipped_images
from models.weights import MissingWeightsError, mtcnn_paths

REAL_FACES = {name: (lambda name=name: shipped_images()[name]) for name in ("t1", "tom_hanks", "astronaut")}


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
