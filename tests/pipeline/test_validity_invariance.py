"""pipeline/validity_invariance.py: flip rates against the clean copy, unknowns apart, size buckets, headline checks."""

from __future__ import annotations

import pytest

from pipeline import validity as V
from pipeline import validity_invariance as I

CLEAN = {"occlusion": "unobstructed", "pose": "frontal", "expression": "typical expression", "blur": "clear",
         "lighting": "normal lighting"}


def _o(face: str, kind: str, level: int, found: bool = True, **changed: str | None) -> V.Outcome:
    labels = {**CLEAN, **changed}
    return V.Outcome(face, kind, level, labels, V.expectations(kind, level), face_found=found)


def _outcomes() -> list[V.Outcome]:
    faces = ("a", "b", "c", "d")
    out = [_o(f, "clean", 0) for f in faces]
    out[3] = _o("d", "clean", 0, pose=None)  # d's clean copy has no pose class: d's pose pairs are not counted
    out += [  # dark level 2: a flips pose, b loses its occlusion label (unknown), c flips lighting (expected)
        _o("a", "dark", 2, pose="slight angle", lighting="extreme lighting"),
        _o("b", "dark", 2, occlusion=None, lighting="extreme lighting"),
        _o("c", "dark", 2, lighting="extreme lighting"),
        _o("d", "dark", 2, pose="large angle", lighting="extreme lighting"),
        _o("a", "dark", 1, pose="large angle"),  # level 1 is not in the row
    ]
    out += [  # blur sigma 1.6 and 2.4: b's expression flips once, c is not found (unknown for every factor)
        _o("a", "blur", 2, blur="blurry"), _o("b", "blur", 2, blur="hazy", expression="exaggerated expression"),
        _o("c", "blur", 3, found=False), _o("a", "blur", 1, occlusion="obstructed"),
    ]
    out += [_o("a", "occluder_band", 1, occlusion="obstructed", pose="slight angle"),
            _o("b", "occluder_band", 1, occlusion="obstructed"), _o("c", "occluder_band", 1),
            _o("a", "occluder_benign", 1)]
    return out


def test_flip_rates_count_against_the_clean_copy_with_unknowns_apart():
    m = I.invariance_matrix(_outcomes())
    dark = m["dark (level >= 2)"]
    assert dark["variants"] == 4 and dark["lighting"] == I.EXPECTED
    assert dark["pose"] == {"n": 3, "flips": 1, "unknown": 0, "flip_rate": round(1 / 3, 4), "unknown_rate": 0.0}
    assert dark["occlusion"] == {"n": 4, "flips": 0, "unknown": 1, "flip_rate": 0.0, "unknown_rate": 0.25}
    blur = m["Gaussian blur sigma >= 1.5 px"]
    assert blur["blur"] == I.EXPECTED and blur["variants"] == 3
    assert blur["expression"] == {"n": 3, "flips": 1, "unknown": 1, "flip_rate": 0.5, "unknown_rate": round(1 / 3, 4)}
    assert blur["occlusion"]["flips"] == 0  # the sigma 0.8 copy of a is not in the row
    band = m["occluder band"]
    assert band["occlusion"] == I.EXPECTED and band["pose"]["flip_rate"] == round(1 / 3, 4)
    assert m["occluder benign"]["occlusion"] == {"n": 1, "flips": 0, "unknown": 0, "flip_rate": 0.0,
                                                 "unknown_rate": 0.0}
    assert "downscale 4x" not in m  # no such variant in the outcomes


def test_size_buckets_split_by_the_original_face_side():
    out = _outcomes()
    b = I.by_size(out, {"a": 60.0, "b": 99.9, "c": 100.0})
    assert {o.face for o in b[I.SMALL]} == {"a", "b"} and {o.face for o in b[I.LARGE]} == {"c"}
    assert len(b[I.ALL]) == len(out)  # d has no size: only in "all"
    small = I.invariance_matrix(b[I.SMALL])
    assert small["dark (level >= 2)"]["pose"]["flip_rate"] == 0.5


def test_headline_checks_have_value_target_and_ok():
    out = _outcomes()
    rows = {r["check"]: r for r in I.headline_checks(out, {"a": 40.0, "b": 60.0, "c": 120.0, "d": 200.0})}
    clean = rows["clean faces >= 48 px unobstructed"]
    assert (clean["n"], clean["value"], clean["target"], clean["ok"]) == (3, 1.0, 0.9, True)
    dark_pose = rows["pose flips under dark (level >= 2)"]
    assert (dark_pose["value"], dark_pose["target"], dark_pose["ok"]) == (round(1 / 3, 4), 0.1, False)
    assert rows["occlusion flips under dark (level >= 2)"]["ok"]
    assert rows["Gaussian sigma >= 1.5 px not clear"]["value"] == 1.0  # c's copy (no face) is not scored
    assert rows["occluders obstructed"]["value"] == round(2 / 3, 4) and not rows["occluders obstructed"]["ok"]
    assert "pose flips under occluder band" in rows and "pose flips under occluder benign" not in rows
    assert "dark extreme lighting" in rows and "4x downscale not clear" in rows


def test_failures_list_the_images_without_a_face():
    f = I.failures({("a", "clean"): True, ("a", "dark_2"): False, ("b", "dark_2"): False, ("b", "clean"): True})
    assert f == {"images": 4, "failed": 2, "by_variant": {"dark_2": 2}, "list": ["a/dark_2", "b/dark_2"]}


@pytest.mark.parametrize("side,bucket", [(99.0, I.SMALL), (100.0, I.LARGE)])
def test_size_bucket_threshold(side, bucket):
    assert I.size_bucket(side) == bucket
