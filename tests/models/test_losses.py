"""CLIB-FIQA losses and confidence against hand-computed values (paper Eq. 1, 4-9)."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import (
    IGNORE_INDEX,
    clib_loss,
    confidence,
    emd_loss,
    expected_quality,
    focal_loss,
    js_divergence,
    official_emd_loss,
    official_js,
    soft_quality_targets,
)

A = [0.1, 0.3, 0.5, 0.7, 0.9]


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_soft_mapping_abs_matches_eq1_by_hand():
    q = 0.42
    expected = _softmax([-32 * abs(q - a) for a in A])
    got = soft_quality_targets(torch.tensor([q]))[0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # exp(-32*0.12), exp(-32*0.08): the two neighbours of 0.42 carry almost all the mass
    assert float(got[2] / got[1]) == pytest.approx(math.exp(32 * 0.04), rel=1e-5)


def test_soft_mapping_squared_option_and_per_sample_beta():
    q = torch.tensor([0.42, 0.9])
    got = soft_quality_targets(q, distance="squared")
    assert got[0].tolist() == pytest.approx(_softmax([-32 * (0.42 - a) ** 2 for a in A]), abs=1e-6)
    rho = torch.tensor([1.0, 0.5])
    got = soft_quality_targets(q, 32 * rho)
    assert got[1].tolist() == pytest.approx(_softmax([-16 * abs(0.9 - a) for a in A]), abs=1e-6)
    with pytest.raises(ValueError, match="distance"):
        soft_quality_targets(q, distance="cube")


def test_expected_quality_range():
    assert float(expected_quality(torch.tensor([1.0, 0, 0, 0, 0]))) == pytest.approx(0.1)
    assert float(expected_quality(torch.tensor([0, 0, 0, 0, 1.0]))) == pytest.approx(0.9)
    assert float(expected_quality(torch.full((5,), 0.2))) == pytest.approx(0.5)


def test_emd_sum_of_cdf_differences():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]])
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    # CDFs: p = .1 .3 .6 .8 1 ; t = 0 0 0 0 1 -> |.| sum = 1.8
    assert float(emd_loss(p, t)) == pytest.approx(1.8, abs=1e-6)
    # official: sqrt(mean(d^2)) = sqrt((.01 + .09 + .36 + .64 + 0) / 5)
    assert float(official_emd_loss(p, t)) == pytest.approx(math.sqrt(1.10 / 5), abs=1e-6)
    assert float(emd_loss(t, t)) == 0.0
    # one level apart costs 1, two levels apart costs 2 (the ordinal structure)
    e = torch.eye(5)
    assert float(emd_loss(e[:1], e[1:2])) == pytest.approx(1.0)
    assert float(emd_loss(e[:1], e[2:3])) == pytest.approx(2.0)


def test_focal_loss_per_sample_mean_over_factors():
    blur = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    occ = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([[2, 0], [1, 1]])

    def fl(p: float) -> float:
        return (1 - p) ** 2 * -math.log(p)

    s0 = (fl(0.5) + fl(0.9)) / 2
    s1 = (fl(0.3) + fl(0.6)) / 2
    got = focal_loss([blur, occ], labels, reduction="none")
    assert got.tolist() == pytest.approx([s0, s1], abs=1e-6)
    assert float(focal_loss([blur, occ], labels)) == pytest.approx((s0 + s1) / 2, abs=1e-6)
    # official: focal weight on the batch-mean CE, per factor, then summed (train.py adds loss2..loss6)
    ce_b = (-math.log(0.5) - math.log(0.3)) / 2
    ce_o = (-math.log(0.9) - math.log(0.6)) / 2

    def fw(ce: float) -> float:
        return (1 - math.exp(-ce)) ** 2 * ce

    assert float(focal_loss([blur, occ], labels, batch_mean_ce=True)) == pytest.approx(fw(ce_b) + fw(ce_o), abs=1e-6)


def test_focal_loss_ignores_missing_labels():
    blur = torch.tensor([[0.2, 0.3, 0.5]])
    occ = torch.tensor([[0.9, 0.1]])
    got = focal_loss([blur, occ], torch.tensor([[IGNORE_INDEX, 0]]))
    assert float(got) == pytest.approx((1 - 0.9) ** 2 * -math.log(0.9), abs=1e-6)
    assert float(focal_loss([blur, occ], torch.tensor([[IGNORE_INDEX, IGNORE_INDEX]]))) == 0.0
    with pytest.raises(ValueError, match="labels"):
        focal_loss([blur, occ], torch.tensor([0, 1]))


def test_js_divergence_by_hand():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    assert float(js_divergence(p, q)) == pytest.approx(math.log(2), abs=1e-6)
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    m = [0.7, 0.3]
    kl_pm = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    kl_qm = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    assert m[0] + m[1] == 1
    assert float(js_divergence(p, q)) == pytest.approx(0.5 * (kl_pm + kl_qm), abs=1e-6)
    assert float(js_divergence(q, p)) == pytest.approx(float(js_divergence(p, q)), abs=1e-7)
    assert float(js_divergence(q, q)) == 0.0
    # the official variant re-softmaxes probabilities: it compresses the divergence of one-hot rows
    assert float(official_js(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) < 0.25


def test_confidence_bounds():
    assert float(confidence(torch.tensor(0.0))) == 1.0
    assert float(confidence(torch.tensor(0.01))) == pytest.approx(1 / (1 + math.exp(0.32)) + 0.5, abs=1e-7)
    values = confidence(torch.tensor([0.0, 0.01, 0.05, 0.2, math.log(2)])).tolist()
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(0.5, abs=1e-9)
    assert all(0.5 <= v <= 1.0 for v in values)


def test_total_loss_eq7():
    quality = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    blur = torch.tensor([[0.2, 0.3, 0.5]])
    total, parts = clib_loss(quality, [blur], target, torch.tensor([[2]]))
    mfl = 0.25 * -math.log(0.5)
    assert float(parts["mfl"]) == pytest.approx(mfl, abs=1e-6)
    assert float(total) == pytest.approx(mfl + 10 * 1.8, abs=1e-5)
    # official: the factors' focal losses (on batch-mean CE) are summed, and the quality term is the RMS distance
    occ = torch.tensor([[0.9, 0.1]])
    total, parts = clib_loss(quality, [blur, occ], target, torch.tensor([[2, 0]]), official=True)

    def fw(ce: float) -> float:
        return (1 - math.exp(-ce)) ** 2 * ce

    mfl = fw(-math.log(0.5)) + fw(-math.log(0.9))
    assert float(parts["mfl"]) == pytest.approx(mfl, abs=1e-6)
    assert float(total) == pytest.approx(mfl + 10 * math.sqrt(1.10 / 5), abs=1e-5)
