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
