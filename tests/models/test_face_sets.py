"""Real face sets: package photos are found and aligned like the label flow aligns them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from models import geometry
from models.fit_data import face_sets


@pytest.fixture(scope="module")
def package_faces() -> list[face_sets.RealFace]:
    return face_sets.face_set(face_sets.HELD_OUT_SOURCE)


@pytest.mark.slow
def test_package_faces_found_and_aligned(package_faces: list[face_sets.RealFace]) -> None:
    names = [f.name for f in package_faces]
    # t1.jpg holds six faces of >= 40 px; the other three photos one each.
    assert names == ["tom_hanks", *[f"t1_face{k}" for k in range(6)], "astronaut", "grace_hopper"]
    for f in package_faces:
        assert f.crop.shape == (112, 112, 3) and f.crop.dtype == np.uint8
        # A least-squares similarity maps the landmark centroid exactly onto the template's centroid,
        # and leaves every point within ~10 px of its template position (turned heads, smiles).
        assert np.allclose(f.landmarks.mean(0), geometry.ARCFACE_TEMPLATE.mean(0), atol=1e-3)
        assert np.linalg.norm(f.landmarks - geometry.ARCFACE_TEMPLATE, axis=1).max() < 12.0
        assert f.score >= 0.95


def test_extra_photos_errors(tmp_path) -> None:
    with pytest.raises(face_sets.FaceSetError, match="does not exist"):
        face_sets.extra_photos(tmp_path / "nope")
    with pytest.raises(face_sets.FaceSetError, match="holds no images"):
        face_sets.extra_photos(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(face_sets.FaceSetError, match="cannot decode"):
        face_sets.extra_photos(tmp_path)


def test_face_api_photos_checked_against_pins(tmp_path) -> None:
    with pytest.raises(face_sets.FaceSetError, match="is missing"):
        face_sets.face_api_photos(tmp_path)
    for name in face_sets.FACE_API_PHOTOS:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(face_sets.FaceSetError, match="SHA-256"):
        face_sets.face_api_photos(tmp_path)
    assert hashlib.sha256(b"x").hexdigest() not in face_sets.FACE_API_PHOTOS.values()
