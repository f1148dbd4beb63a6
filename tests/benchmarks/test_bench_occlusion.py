"""benchmarks/occlusion.py: variants of a face a mask does not fit, and rates merged over disjoint face sets."""

from __future__ import annotations

import numpy as np
import pytest

from models.fit_data import occluders as occ
from models.fit_data.face_sets import shipped_images
from models.geometry import ARCFACE_TEMPLATE


def test_a_face_without_room_for_a_mask_has_no_mask_variants():
    """A face seen from below (nose tip close to the eye line): the mask variants are left out, the rest stay."""
    from benchmarks import occlusion as B

    face = shipped_images()["tom_hanks"]
    lm = ARCFACE_TEMPLATE.astype(np.float64).copy()
    lm[2, 1] = lm[:2, 1].mean() + 0.2 * (lm[1, 0] - lm[0, 0])
    bank = occ.TextureBank(photos=occ.HELD_OUT_TEXTURES)
    out = B.variants(face, lm, np.random.default_rng(0), bank, draws=2)
    masks = [k for k in out if k.startswith("mask:")] + ["family:mask", "dark+mask"]
    assert all(out[k] == [] for k in masks)
    assert len(out["family:band"]) == 2 and all(expect for _, expect in out["family:band"])
    assert len(out["benign"]) == 2 and not any(expect for _, expect in out["benign"])
    full = B.variants(face, None, np.random.default_rng(0), bank, draws=2)  # the template has room for a mask
    assert len(full["mask:mask_white"]) == 1 and len(full["dark+mask"]) == 1


def test_merged_rates_weigh_each_part_by_its_count():
    from benchmarks import occlusion as B

    a = {"clean": {"obstructed": 0.5, "mean_p": 0.4, "n": 2}, "mask:mask_white": {"obstructed": 1.0, "mean_p": 0.9,
                                                                                  "n": 2}}
    b = {"clean": {"obstructed": 0.0, "mean_p": 0.1, "n": 6}}
    got = B.merged([a, b])
    assert got["clean"] == {"obstructed": pytest.approx(0.125), "mean_p": pytest.approx(0.175), "n": 8}
    assert got["mask:mask_white"] == {"obstructed": 1.0, "mean_p": 0.9, "n": 2}  # only the part that has it


def test_a_tight_crop_of_a_real_photo_is_aligned_with_real_padding(real_face, mtcnn_detector):
    """The two-fold's tight faces: the astronaut found again in a crop of her detector box is aligned like the
    full photo's face (same template points) but a large share of the crop is the aligner's black padding."""
    from dataclasses import replace

    from benchmarks import occlusion as B
    from models.fit_data import face_sets
    from pipeline.validity import padding_share

    photo = real_face("astronaut")
    det = mtcnn_detector()
    full = max(face_sets.real_faces({"astronaut": photo}, det), key=lambda f: f.score)
    assert padding_share(full.crop) < 0.02  # the portrait has room around the face (a few black pixels of its own)
    away = replace(full, name="nowhere", box=np.array([0.0, 400.0, 60.0, 460.0]))  # a box on the suit, no face
    tight = B.tight_faces([full, away], photos={"astronaut": np.ascontiguousarray(photo)}, detector=det)
    assert set(tight) == {full.name}  # the face the detector cannot find again is left out
    got = tight[full.name]
    assert got.crop.shape == (112, 112, 3) and 0.15 <= padding_share(got.crop) <= 0.5
    assert np.abs(got.landmarks - full.landmarks).max() < 2.0  # the same alignment as in the full photo


def test_real_occluders_counts_the_worn_faces_the_model_calls_obstructed():
    """The fit faces with a real occluder are rated per face and counted per kind at the model's threshold:
    a clean package face under a sunglasses name is not obstructed, the same face under a grey band (over the
    mouth, as a hand would be) is."""
    from types import SimpleNamespace

    from benchmarks import occlusion as B
    from models import occlusion as mo
    from models.fit_data.face_sets import WORN_OCCLUDERS

    face = shipped_images()["tom_hanks"]
    banded = face.copy()
    banded[70:112] = 90  # the grey band of the benchmark's variants: from between nose and mouth down
    sunglasses = next(k for k, v in WORN_OCCLUDERS.items() if v == "sunglasses")
    hand = next(k for k, v in WORN_OCCLUDERS.items() if v == "hand")
    faces = [SimpleNamespace(name=sunglasses, crop=face), SimpleNamespace(name=hand, crop=banded)]
    model = mo.load_model(None)
    got = B.real_occluders(model, faces)
    p = mo.predict_proba(model, np.stack([face, banded]))
    assert got["faces"][sunglasses] == {"kind": "sunglasses", "p_obstructed": round(float(p[0]), 3)}
    assert p[0] < model.threshold <= p[1]
    assert got["by_kind"] == {"sunglasses": {"faces": 1, "obstructed": 0}, "hand": {"faces": 1, "obstructed": 1}}
    assert B.real_occluders(model, []) == {"faces": {}, "by_kind": {}}
