"""Analytic lighting measures against hand-computed values, the decision's edges, and the lighting stage's rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_manifest.vocabulary import FACTOR_CLASSES
from models.fit_data.face_sets import shipped_images
from models.geometry import ARCFACE_TEMPLATE
from pipeline.labellers.base import ERROR, NO_FACE, OK, FaceCrop
from pipeline.labellers.lighting import (
    CRITERIA,
    DEFAULT_RULE,
    MEASURES,
    LightingRule,
    LightingStage,
    criterion_scores,
    face_region,
    lighting_decision,
    lighting_measures,
    luminance,
    ramp,
)
from pipeline.synthetic import degrade

# Symmetric landmarks: the face's vertical axis is the pixel column x = 56.
SYMMETRIC = np.array([[38.0, 52.0], [74.0, 52.0], [56.0, 72.0], [42.0, 92.0], [70.0, 92.0]])


def grey(level: int) -> np.ndarray:
    return np.full((112, 112, 3), level, dtype=np.uint8)


def halves(left: int, right: int) -> np.ndarray:
    """Grey `left` on columns 0..55 and grey `right` on columns 56..111."""
    img = grey(left)
    img[:, 56:] = right
    return img


# --- luminance --------------------------------------------------------------


def test_luminance_is_rec709_of_linear_srgb():
    # sRGB 128 -> ((128/255 + 0.055) / 1.055) ** 2.4 = 0.21586 linear; 255 * 0.21586 = 55.04 -> 55.
    assert luminance(grey(128))[0, 0] == 55
    assert luminance(grey(0))[0, 0] == 0 and luminance(grey(255))[0, 0] == 255
    # sRGB 10 is on the linear segment: 10 / 255 / 12.92 = 0.003035 -> 0.774 -> 1.
    assert luminance(grey(10))[0, 0] == 1
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(luminance(primaries)[0], [54, 182, 18])  # 255 x (0.2126, 0.7152, 0.0722)


def test_luminance_lookup_equals_the_computed_luminance():
    """The label pass looks luminance up in a table of every colour; it equals the computation, pixel for pixel."""
    from pipeline.labellers.lighting import _luma, luma_reference

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (64, 4096, 3), dtype=np.uint8)
    pixels[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [128] * 3, [10] * 3]
    np.testing.assert_array_equal(_luma(pixels), luma_reference(pixels))
    for image in shipped_images().values():  # real photos
        np.testing.assert_array_equal(_luma(image), luma_reference(image))


@pytest.mark.parametrize("n", [1, 2, 4447, 4448])
def test_counted_histograms_and_medians_equal_numpy(n):
    """The batch measures count each row's values once (OpenCV's histogram) and read the medians off the counts:
    equal to np.bincount and np.median, odd and even rows, ties and constant rows included."""
    from pipeline.labellers.lighting import _histograms, count_medians, histogram_counts

    rng = np.random.default_rng(n)
    rows = np.concatenate([rng.integers(0, 256, (6, n)), rng.integers(100, 103, (3, n)), np.full((2, n), 7),
                           np.full((1, n), 255)]).astype(np.uint8)
    counts = histogram_counts(rows)
    assert [np.bincount(r, minlength=256).tolist() for r in rows] == counts.tolist()
    np.testing.assert_array_equal(_histograms(rows), counts / n)
    np.testing.assert_array_equal(count_medians(counts), np.median(rows, axis=1))


def test_luminance_rejects_non_rgb():
    with pytest.raises(ValueError, match="uint8"):
        luminance(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        luminance(np.zeros((4, 4, 3), dtype=np.float32))


# --- face region ------------------------------------------------------------


def test_face_region_is_a_symmetric_ellipse_around_the_landmarks():
    region, left = face_region(SYMMETRIC)
    for x, y in SYMMETRIC.astype(int):
        assert region[y, x]
    assert not region[0, 0] and not region[0, 111] and not region[111, 0] and not region[111, 111]
    # Semi-axes: 0.95 x IED (36 px) = 34.2 across, 1.05 x eye-mouth distance (40 px) = 42 along, centre (56, 72).
    assert region[72, 56 - 34] and not region[72, 56 - 35] and region[72, 56 + 34] and not region[72, 56 + 35]
    assert region[72 - 42, 56] and not region[72 - 43, 56]
    # Mirror symmetry about column 56; the left half is x < 56, the axis column belongs to the right.
    np.testing.assert_array_equal(region[:, 1:56], region[:, 57:][:, ::-1])
    np.testing.assert_array_equal(left, region & (np.arange(112) < 56)[None, :])


def test_face_region_follows_a_rotated_face():
    angle = math.radians(30)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([56.0, 72.0])
    turned = (SYMMETRIC - centre) @ rot.T + centre
    region, left = face_region(turned)
    upright, _ = face_region(SYMMETRIC)
    assert abs(int(region.sum()) - int(upright.sum())) < 0.02 * upright.sum()  # same ellipse, turned
    # Points 20 px to the face's left / right of the centre, along its rotated eye axis.
    across = rot @ np.array([1.0, 0.0])
    lx, ly = np.rint(centre - 20 * across).astype(int)
    rx, ry = np.rint(centre + 20 * across).astype(int)
    assert left[ly, lx] and region[ry, rx] and not left[ry, rx]


# --- measures on constructed images ----------------------------------------


def test_uniform_grey_measures():
    m = lighting_measures(grey(128), SYMMETRIC)
    assert set(m) == set(MEASURES)
    assert m["luminance_mean"] == pytest.approx(55 / 255)
    assert m["luminance_variance"] == pytest.approx(0.0, abs=1e-15)
    assert m["illumination_uniformity"] == pytest.approx(1.0)
    assert m["half_mean_ratio"] == 1.0 and m["half_median_ratio"] == 1.0
    assert m["dynamic_range_bits"] == 0.0
    assert m["luminance_p01"] == pytest.approx(55 / 255) and m["luminance_p99"] == pytest.approx(55 / 255)
    assert m["under_exposure"] == 0.0 and m["over_exposure"] == 0.0
    assert m["face_pixels"] == face_region(SYMMETRIC)[0].sum()


def test_half_dark_half_bright_measures():
    region, left = face_region(SYMMETRIC)
    n, n_left = int(region.sum()), int(left.sum())
    axis = int(region[:, 56].sum())
    assert n_left == (n - axis) // 2  # symmetric halves; the axis column counts on the right
    p, q = n_left / n, 1 - n_left / n
    m = lighting_measures(halves(10, 255), SYMMETRIC)  # luminance 1 on the left, 255 on the right
    assert m["luminance_mean"] == pytest.approx((p * 1 + q * 255) / 255)
    assert m["luminance_variance"] == pytest.approx(p * q * (254 / 255) ** 2)
    assert m["illumination_uniformity"] == 0.0  # disjoint histograms
    assert m["half_mean_ratio"] == pytest.approx(1 / 255) and m["half_median_ratio"] == pytest.approx(1 / 255)
    assert m["dynamic_range_bits"] == pytest.approx(-(p * math.log2(p) + q * math.log2(q)))
    assert m["under_exposure"] == pytest.approx(p) and m["over_exposure"] == pytest.approx(q)
    assert m["luminance_p01"] == pytest.approx(1 / 255) and m["luminance_p99"] == 1.0


def test_known_histogram_entropy_and_percentiles():
    # Four luminance levels in a 2x2 tiling: 0, 1 (sRGB 10), 55 (sRGB 128), 255; about a quarter each.
    img = np.empty((112, 112, 3), dtype=np.uint8)
    img[0::2, 0::2], img[0::2, 1::2], img[1::2, 0::2], img[1::2, 1::2] = 0, 10, 128, 255
    region, _ = face_region(SYMMETRIC)
    lum = luminance(img)[region]
    shares = np.array([np.mean(lum == v) for v in (0, 1, 55, 255)])
    assert shares.sum() == pytest.approx(1.0) and np.all(np.abs(shares - 0.25) < 0.01)
    m = lighting_measures(img, SYMMETRIC)
    assert m["dynamic_range_bits"] == pytest.approx(-(shares * np.log2(shares)).sum())
    assert m["dynamic_range_bits"] == pytest.approx(2.0, abs=1e-3)
    assert m["luminance_mean"] == pytest.approx((shares @ [0, 1, 55, 255]) / 255)
    assert m["under_exposure"] == pytest.approx(shares[0] + shares[1])
    assert m["over_exposure"] == pytest.approx(shares[3])
    assert m["luminance_p01"] == 0.0 and m["luminance_p99"] == 1.0


def test_side_light_lowers_uniformity_and_half_ratio():
    clean = lighting_measures(grey(150), SYMMETRIC)
    lit = [lighting_measures(degrade.side_light(grey(150), level), SYMMETRIC) for level in (1, 2, 3)]
    ratios = [m["half_mean_ratio"] for m in lit]
    assert clean["half_mean_ratio"] == 1.0 and ratios[0] > ratios[1] > ratios[2]
    assert all(m["illumination_uniformity"] < 0.5 for m in lit)


def test_measures_reject_bad_landmarks():
    with pytest.raises(ValueError, match="shape"):
        lighting_measures(grey(128), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        lighting_measures(grey(128), np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="degenerate"):
        lighting_measures(grey(128), np.full((5, 2), 50.0))
    with pytest.raises(ValueError, match="covers"):
        lighting_measures(grey(128), SYMMETRIC + 500.0)  # the face ellipse is outside the crop


# --- decision ---------------------------------------------------------------


def _measures(**overrides: float) -> dict[str, float]:
    base = {"luminance_mean": 0.3, "luminance_p99": 0.6, "under_exposure": 0.1, "over_exposure": 0.0,
            "half_mean_ratio": 0.9, "half_median_ratio": 0.9}
    return {**base, **overrides}


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_decision_edges(criterion):
    measure, field, bad_above = CRITERIA[criterion]
    t = getattr(DEFAULT_RULE, field)
    at = _measures(**{measure: t})
    assert criterion_scores(at)[criterion] == 0.5
    score, decision = lighting_decision(at)
    assert score == 0.5 and decision.name == "extreme lighting"  # the threshold itself is extreme
    inside = math.nextafter(t, -math.inf if bad_above else math.inf)
    score, decision = lighting_decision(_measures(**{measure: inside}))
    assert score < 0.5 and decision.name == "normal lighting"
    beyond = math.nextafter(t, math.inf if bad_above else -math.inf)
    assert lighting_decision(_measures(**{measure: beyond}))[1].name == "extreme lighting"


def test_typical_measures_are_normal_and_score_is_the_largest_criterion():
    scores = criterion_scores(_measures())
    score, decision = lighting_decision(_measures())
    assert decision.name == "normal lighting" and score == max(scores.values()) < 0.5
    score, decision = lighting_decision(_measures(luminance_p99=0.01, under_exposure=1.0))
    assert decision.name == "extreme lighting" and score > 0.99


def test_ramp_values():
    assert ramp(0.009, 0.009, True) == 0.5
    assert ramp(1.0, 0.009, True) == pytest.approx(1 / (1 + math.exp(-8)))
    assert ramp(0.0, 0.009, True) == pytest.approx(1 / (1 + math.exp(8)))
    assert ramp(0.0, 0.071, False) == pytest.approx(1 / (1 + math.exp(-8)))
    # Halfway between the threshold 0.5 and the end of the range: logistic(+-4).
    assert ramp(0.75, 0.5, True) == pytest.approx(1 / (1 + math.exp(-4)))
    assert ramp(0.75, 0.5, False) == pytest.approx(1 / (1 + math.exp(4)))


def test_decision_rejects_missing_or_nan_measures():
    with pytest.raises(ValueError, match="lack 'over_exposure'"):
        lighting_decision({"luminance_mean": 0.3, "luminance_p99": 0.6, "half_median_ratio": 0.9})
    with pytest.raises(ValueError, match="not finite"):
        lighting_decision(_measures(luminance_mean=float("nan")))


def test_rule_validation():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        LightingRule(over_max=0.0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        LightingRule(p99_low=1.5)
    assert set(DEFAULT_RULE.to_dict()) == {"p99_low", "mean_high", "over_max", "ratio_min"}


def test_darker_skin_under_good_light_stays_normal_while_a_dim_exposure_is_extreme():
    """Dark skin lowers the mean and raises the dark-pixel share like a dim exposure, but keeps the highlights."""
    face = shipped_images()["tom_hanks"]
    region = face_region(ARCFACE_TEMPLATE)[0]
    darker = degrade.darker_skin(face, region, albedo=0.25)
    m_clean, m_darker = lighting_measures(face, ARCFACE_TEMPLATE), lighting_measures(darker, ARCFACE_TEMPLATE)
    assert m_darker["luminance_mean"] < 0.5 * m_clean["luminance_mean"]
    assert m_darker["under_exposure"] > m_clean["under_exposure"]
    assert m_darker["luminance_p99"] == pytest.approx(m_clean["luminance_p99"], abs=0.02)
    assert lighting_decision(m_darker)[1].name == "normal lighting"
    dim = lighting_measures(degrade.degrade(face, "dark", 2), ARCFACE_TEMPLATE)
    assert dim["luminance_p99"] < DEFAULT_RULE.p99_low and lighting_decision(dim)[1].name == "extreme lighting"
    with pytest.raises(ValueError, match="albedo"):
        degrade.darker_skin(face, region, albedo=0.0)


# --- stage ------------------------------------------------------------------


def test_stage_rows_on_a_real_face_and_its_degradations():
    face = shipped_images()["tom_hanks"]  # already aligned to the 112x112 ArcFace template
    stage = LightingStage()
    assert stage.name == "lighting" and stage.labeller == "analytic-lighting"
    batch = [FaceCrop("clean", face, landmarks=ARCFACE_TEMPLATE.copy())]
    batch += [FaceCrop(f"{k}{lv}", degrade.degrade(face, k, lv), landmarks=ARCFACE_TEMPLATE.copy())
              for k, lv in (("dark", 3), ("dark", 2), ("overexpose", 2), ("side_light", 3))]
    rows = {r["sample_id"]: r for r in stage(batch)}
    assert rows["clean"]["class_name"] == "normal lighting"
    for sid in ("dark3", "dark2", "overexpose2", "side_light3"):
        assert rows[sid]["class_name"] == "extreme lighting", (sid, rows[sid]["details"])
    row = rows["clean"]
    assert row["factor"] == "lighting" and row["status"] == OK and row["error"] is None
    assert row["labeller"] == "analytic-lighting" and row["labeller_version"] == stage.version
    assert row["class_index"] == FACTOR_CLASSES["lighting"].index("normal lighting")
    assert json.loads(row["thresholds"]) == DEFAULT_RULE.to_dict()
    details = json.loads(row["details"])
    measures = lighting_measures(face, ARCFACE_TEMPLATE)
    assert {k: details[k] for k in MEASURES} == pytest.approx(measures)
    assert row["value"] == pytest.approx(lighting_decision(measures)[0])
    assert details["landmarks"] == "measured" and set(details["criteria"]) == set(CRITERIA)
    assert json.loads(rows["dark3"]["details"])["strongest"] in ("dark", "underexposed")
    assert json.loads(rows["overexpose2"]["details"])["strongest"] == "overexposed"


def test_stage_failures_become_rows():
    batch = [
        FaceCrop("noface", None, status=NO_FACE, error="no face detected"),
        FaceCrop("missing", None),
        FaceCrop("float", np.zeros((112, 112, 3), dtype=np.float32), landmarks=SYMMETRIC),
        FaceCrop("grey2d", np.zeros((112, 112), dtype=np.uint8), landmarks=SYMMETRIC),
        FaceCrop("outside", grey(128), landmarks=SYMMETRIC + 500.0),
        FaceCrop("template", grey(128)),  # an aligned crop without measured landmarks: the template is used
        FaceCrop("big", np.full((224, 224, 3), 128, dtype=np.uint8)),  # no landmarks and not 112x112
    ]
    rows = {r["sample_id"]: r for r in LightingStage()(batch)}
    assert len(rows) == len(batch) and all(r["factor"] == "lighting" for r in rows.values())
    assert rows["noface"]["status"] == NO_FACE and rows["noface"]["error"] == "no face detected"
    assert rows["noface"]["value"] is None and rows["noface"]["class_name"] is None
    assert rows["missing"]["status"] == ERROR and "missing" in rows["missing"]["error"]
    assert rows["float"]["status"] == ERROR and "uint8" in rows["float"]["error"]
    assert rows["grey2d"]["status"] == ERROR and "(H, W, 3)" in rows["grey2d"]["error"]
    assert rows["outside"]["status"] == ERROR and "covers" in rows["outside"]["error"]
    assert rows["big"]["status"] == ERROR and "224x224 crop is not on the 112x112" in rows["big"]["error"]
    assert rows["template"]["status"] == OK and json.loads(rows["template"]["details"])["landmarks"] == "template"
    assert all(json.loads(r["thresholds"]) == DEFAULT_RULE.to_dict() for r in rows.values())


def test_degradations_are_recorded_and_bounded():
    img = grey(128)
    for kind in ("dark", "overexpose", "side_light"):
        np.testing.assert_array_equal(degrade.degrade(img, kind, 0), img)
        with pytest.raises(ValueError, match=f"{kind} level must be 0..3"):
            degrade.degrade(img, kind, 4)
    # dark 3: 255 * 0.35 * (128 / 255) ** 3 = 11.24 -> 11;
    # overexpose 1: linear 2 * 0.21586 = 0.43172 -> 255 * (1.055 * 0.43172 ** (1 / 2.4) - 0.055) = 175.55 -> 176.
    assert degrade.dark(img, 3)[0, 0, 0] == 11
    assert degrade.overexpose(img, 1)[0, 0, 0] == 176
    assert degrade.overexpose(img, 3)[0, 0, 0] == 255  # 8 x 0.216 clips at white
    lit = degrade.side_light(img, 3)
    assert lit[50, 0, 0] == 128 and lit[50, 111, 0] < 128 * 0.3  # left untouched, right in shadow


# --- batched measures ---------------------------------------------------------


def _reference_measures(crop: np.ndarray, landmarks: np.ndarray) -> dict[str, float]:
    """The measures crop by crop, straight from the definitions (masks, not indices; no batching)."""
    lum = luminance(crop)
    region, left = face_region(landmarks, lum.shape)
    y, yl, yr = lum[region], lum[left], lum[region & ~left]
    hist = np.bincount(y, minlength=256) / y.size
    levels = np.arange(256) / 255.0
    mean = float((hist * levels).sum())
    ml, mr, dl, dr = float(yl.mean()), float(yr.mean()), float(np.median(yl)), float(np.median(yr))
    p = hist[hist > 0]
    return {
        "luminance_mean": mean,
        "luminance_variance": float((hist * (levels - mean) ** 2).sum()),
        "illumination_uniformity": float(np.minimum(np.bincount(yl, minlength=256) / yl.size,
                                                    np.bincount(yr, minlength=256) / yr.size).sum()),
        "half_mean_ratio": min(ml, mr) / max(ml, mr) if max(ml, mr) else 1.0,
        "half_median_ratio": min(dl, dr) / max(dl, dr) if max(dl, dr) else 1.0,
        "dynamic_range_bits": float(-(p * np.log2(p)).sum()),
        "luminance_p01": float(np.percentile(y, 1.0) / 255.0),
        "luminance_p99": float(np.percentile(y, 99.0) / 255.0),
        "under_exposure": float(np.count_nonzero(y <= 25) / y.size),
        "over_exposure": float(np.count_nonzero(y >= 247) / y.size),
        "face_pixels": float(y.size),
    }


def test_batched_measures_equal_the_crop_by_crop_definitions():
    from pipeline.labellers.lighting import batch_lighting_measures

    rng = np.random.default_rng(5)
    face = shipped_images()["tom_hanks"]
    crops = [face, grey(0), halves(10, 255), *(degrade.degrade(face, k, 2) for k in ("dark", "overexpose",
                                                                                      "side_light"))]
    crops += list(rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8))
    found = batch_lighting_measures(np.stack(crops), ARCFACE_TEMPLATE)
    assert list(found) == list(MEASURES) and all(v.shape == (len(crops),) for v in found.values())
    for k, crop in enumerate(crops):
        want = _reference_measures(crop, ARCFACE_TEMPLATE)
        assert {m: float(found[m][k]) for m in MEASURES} == pytest.approx(want, rel=1e-12, abs=1e-15), k
        assert lighting_measures(crop, ARCFACE_TEMPLATE) == {m: float(found[m][k]) for m in MEASURES}
    assert len({float(v) for v in found["luminance_mean"]}) == len(crops)  # distinct crops, distinct measures
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        batch_lighting_measures(np.stack(crops)[0], ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="covers"):
        batch_lighting_measures(np.stack(crops), SYMMETRIC + 500.0)


def test_stage_groups_crops_by_landmarks_and_keeps_the_order():
    """A batch mixing template crops, measured landmarks and failures gives the rows of crop-by-crop labelling."""
    rng = np.random.default_rng(8)
    face = shipped_images()["tom_hanks"]
    moved = ARCFACE_TEMPLATE + rng.normal(0, 1.5, (5, 2))
    batch = [
        FaceCrop("t0", face),
        FaceCrop("m0", degrade.degrade(face, "dark", 1), landmarks=moved),
        FaceCrop("bad", grey(128), landmarks=SYMMETRIC + 500.0),
        FaceCrop("t1", degrade.degrade(face, "side_light", 3)),
        FaceCrop("none", None, status=NO_FACE, error="no face"),
        FaceCrop("m1", face, landmarks=moved.copy()),
        FaceCrop("s0", halves(40, 200), landmarks=SYMMETRIC),
        FaceCrop("t2", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),
    ]
    stage = LightingStage()
    rows = stage(batch)
    assert [r["sample_id"] for r in rows] == [f.sample_id for f in batch]
    assert rows == [stage.label(f) for f in batch]
    assert [r["status"] for r in rows] == [OK, OK, ERROR, OK, NO_FACE, OK, OK, OK]
    for face_crop, row in zip(batch, rows, strict=True):
        if row["status"] != OK:
            continue
        lm = ARCFACE_TEMPLATE if face_crop.landmarks is None else face_crop.landmarks
        details = json.loads(row["details"])
        assert {k: details[k] for k in MEASURES} == pytest.approx(_reference_measures(face_crop.crop, lm), rel=1e-12)
        assert details["landmarks"] == ("template" if face_crop.landmarks is None else "measured")
        assert row["value"] == lighting_decision({k: details[k] for k in MEASURES})[0]
