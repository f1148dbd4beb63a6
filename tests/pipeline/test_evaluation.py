"""EDC / ERC metrics against hand-built cases and an independent reference, plus the benchmark input formats."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation import metrics as ev
from pipeline.evaluation.formats import (
    PairList,
    QualityScores,
    bin_pairs,
    match_keys,
    normalise_key,
    read_edc_json,
    read_pair_list,
    read_quality_file,
    write_pair_list,
    write_quality_file,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "edc" / "example_data.json"


# --------------------------------------------------------------------------- independent reference


def _ref_quantile(values: np.ndarray, p: float) -> float:
    """Linear-interpolation quantile written out (the 'linear' definition)."""
    x = sorted(float(v) for v in values)
    h = (len(x) - 1) * p
    lo = math.floor(h)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


def _ref_edc_multi(sims: np.ndarray, quality: np.ndarray, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """EDC by brute force: for each distinct quality level v, keep pairs with quality >= v (one row per threshold)."""
    n = sims.size
    discard, error = [], []
    for v in np.unique(quality):
        kept = quality >= v
        left = sims[kept]
        discard.append((n - kept.sum()) / n)
        error.append([np.count_nonzero(left < t) / left.size for t in thresholds])
    return np.array(discard), np.array(error).T


def _ref_edc(sims: np.ndarray, quality: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    d, e = _ref_edc_multi(sims, quality, [threshold])
    return d, e[0]


def _ref_pauc(discard: np.ndarray, error: np.ndarray, n: int, limit: float) -> float:
    """Stepwise area on a per-comparison grid of width 1/n (independent of the per-level sum)."""
    counts = np.rint(discard * n).astype(int)
    per_slot = error[np.searchsorted(counts, np.arange(n), side="right") - 1]  # error while k are discarded
    full = int(math.floor(limit * n + 1e-9))
    area = per_slot[:full].sum() / n
    if full < n:
        area += per_slot[full] * (limit - full / n)
    return float(area)


def _ref_best(e0: float, limit: float, steps: int = 200_000) -> float:
    """Area under max(0, e0 - x) on [0, limit] by the midpoint rule."""
    x = (np.arange(steps) + 0.5) * (limit / steps)
    return float(np.maximum(0.0, e0 - x).sum() * limit / steps)


@pytest.fixture(scope="module")
def example():
    data = read_edc_json(EXAMPLE)
    return data


def _pair_q(data, method: str) -> np.ndarray:
    q = data.qualities[method]
    return ev.pair_quality(q.lookup(data.pairs.a), q.lookup(data.pairs.b))


# --------------------------------------------------------------------------- must show: example data

# Figures printed by `python -m benchmarks.evaluation --example` (checked below against the reference).
EXPECTED = {
    # (method, starting_error): (threshold, pAUC@0.2, pAUC@0.3)
    ("QA algorithm 1", 0.05): (0.026744164070579553, 0.006959681644975037, 0.009533376622886365),
    ("QA algorithm 5", 0.1): (0.08064390506295281, 0.015304784558766016, 0.02110178763846486),
}


def test_example_data_against_reference(example):
    assert len(example.pairs) == 10_000 and example.pairs.mated.all()
    assert sorted(example.qualities) == [f"QA algorithm {i}" for i in range(1, 6)]
    sims = example.similarity
    grid = np.round(np.arange(0, 1.0, 0.05), 2)
    starting = (0.05, 0.1)
    t_refs = [_ref_quantile(sims, se) for se in starting]
    for method in example.qualities:
        pq = _pair_q(example, method)
        assert not np.isnan(pq).any()
        d_ref, e_refs = _ref_edc_multi(sims, pq, t_refs)
        for se, t_ref, e_ref in zip(starting, t_refs, e_refs, strict=True):
            curve = ev.edc(sims, pq, starting_error=se)
            assert curve.threshold == pytest.approx(t_ref, abs=1e-15)
            assert curve.starting_error == pytest.approx(se)
            np.testing.assert_allclose(curve.discard, d_ref, atol=1e-15)
            np.testing.assert_allclose(curve.error, e_ref, atol=1e-15)
            for limit in (0.2, 0.3):
                ref = _ref_pauc(d_ref, e_ref, sims.size, limit)
                assert curve.pauc(limit) == pytest.approx(ref, abs=1e-12)
                best = _ref_best(e_ref[0], limit)
                assert curve.pauc(limit, minus_theoretical_best=True) == pytest.approx(ref - best, abs=1e-9)
            # FNMR at each 5 % step: the error after discarding at most that fraction.
            for x, got in zip(grid, curve.error_at(grid), strict=True):
                kept_idx = np.flatnonzero(d_ref <= x + 1e-12)[-1]
                assert got == e_ref[kept_idx]
            if (method, se) in EXPECTED:
                t, p2, p3 = EXPECTED[(method, se)]
                assert curve.threshold == pytest.approx(t, rel=1e-12)
                assert curve.pauc(0.2) == pytest.approx(p2, rel=1e-9)
                assert curve.pauc(0.3) == pytest.approx(p3, rel=1e-9)


def test_example_ranking_is_stable(example):
    """Algorithm 1 beats algorithm 2 and 4 at both starting errors (lower pAUC is better)."""
    sims = example.similarity
    for se in (0.05, 0.1):
        p = {m: ev.edc(sims, _pair_q(example, m), starting_error=se).pauc(0.3) for m in example.qualities}
        assert p["QA algorithm 1"] < p["QA algorithm 3"] < p["QA algorithm 2"]
        assert p["QA algorithm 1"] < p["QA algorithm 4"]


# --------------------------------------------------------------------------- hand-built cases


def test_perfect_ranking():
    # 10 mated pairs, the 2 errors (score < 0.5) have the lowest quality.
    sims = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.9, 0.6, 0.95, 0.85, 0.75])
    q = np.arange(10, dtype=float)
    c = ev.edc(sims, q, threshold=0.5)
    np.testing.assert_allclose(c.discard, np.arange(10) / 10)
    np.testing.assert_allclose(c.error[:3], [0.2, 1 / 9, 0.0])
    assert (c.error[2:] == 0).all()
    assert c.pauc(0.3) == pytest.approx(0.2 * 0.1 + 0.1 / 9)
    assert c.pauc(0.3, minus_theoretical_best=True) == pytest.approx(0.2 * 0.1 + 0.1 / 9 - 0.02)
    # normalised: 0 = theoretical best, 1 = flat starting-error line
    assert c.pauc(0.3, normalize=True) == pytest.approx((0.02 + 0.1 / 9) / 0.06)
    assert c.pauc(0.3, minus_theoretical_best=True, normalize=True) == pytest.approx((0.1 / 9 - 0.0) / (0.06 - 0.02))


def test_reversed_ranking():
    sims = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.9, 0.6, 0.95, 0.85, 0.75])
    q = -np.arange(10, dtype=float)  # the errors now have the highest quality
    c = ev.edc(sims, q, threshold=0.5)
    expected = [min(2, 10 - k) / (10 - k) for k in range(10)]
    np.testing.assert_allclose(c.error, expected)
    assert c.error[-1] == 1.0
    assert c.pauc(1.0) == pytest.approx(sum(expected) / 10)
    assert c.pauc(0.3) > 0.2 * 0.3  # worse than random discarding


def test_all_equal_quality_is_one_step():
    sims = np.array([0.1, 0.9, 0.8, 0.2, 0.7])
    c = ev.edc(sims, np.full(5, 3.0), threshold=0.5)
    np.testing.assert_array_equal(c.discard, [0.0])
    np.testing.assert_allclose(c.error, [0.4])
    assert c.pauc(0.3) == pytest.approx(0.12)
    np.testing.assert_allclose(c.error_at([0.0, 0.5, 1.0]), [0.4, 0.4, 0.4])


def test_ties_are_discarded_together():
    sims = np.array([0.1, 0.9, 0.9, 0.2])
    q = np.array([1.0, 1.0, 2.0, 2.0])
    c = ev.edc(sims, q, threshold=0.5)
    np.testing.assert_allclose(c.discard, [0.0, 0.5])
    np.testing.assert_allclose(c.error, [0.5, 0.5])
    np.testing.assert_array_equal(c.discard_count, [0, 2])
    np.testing.assert_array_equal(c.error_count, [2, 1])


def test_one_pair():
    c = ev.edc([0.1], [0.7], threshold=0.5)
    np.testing.assert_array_equal(c.discard, [0.0])
    np.testing.assert_array_equal(c.error, [1.0])
    assert c.pauc(0.3) == pytest.approx(0.3)
    assert c.pauc(0.3, minus_theoretical_best=True) == pytest.approx(0.3 - (0.5 - 0.7**2 / 2))
    ok = ev.edc([0.9], [0.7], threshold=0.5)
    assert ok.pauc(0.3) == 0.0 and math.isnan(ok.pauc(0.3, normalize=True))


def test_pair_quality_rules():
    a, b = np.array([0.2, 0.9]), np.array([0.5, 0.1])
    np.testing.assert_allclose(ev.pair_quality(a, b), [0.2, 0.1])
    np.testing.assert_allclose(ev.pair_quality(a, b, how="max"), [0.5, 0.9])
    np.testing.assert_allclose(ev.pair_quality(a, b, how="mean"), [0.35, 0.5])
    np.testing.assert_allclose(ev.pair_quality(a, b, how="product"), [0.1, 0.09])
    with pytest.raises(ValueError, match="how='median'"):
        ev.pair_quality(a, b, how="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in length"):
        ev.pair_quality(a, b[:1])


def test_fmr_threshold_and_fnmr():
    imp = np.linspace(0.0, 0.999, 1000)  # 1000 impostors
    gen = np.array([0.99, 0.995, 0.9985, 0.5, 1.0])
    sims = np.concatenate([gen, imp])
    mated = np.r_[np.ones(5, bool), np.zeros(1000, bool)]
    t = ev.threshold_at_fmr(imp, 1e-3)  # one false match allowed: the top impostor 0.999
    assert imp[-2] < t <= imp[-2] + 1e-15
    op = ev.fnmr_at_fmr(sims, mated, 1e-3)
    assert op.fmr == pytest.approx(1e-3) and op.fnmr == pytest.approx(3 / 5)  # 0.99, 0.995, 0.5
    assert ev.threshold_at_fmr(imp, 1.0) == -math.inf
    zero = ev.fnmr_at_fmr(sims, mated, 0.0)
    assert zero.fmr == 0.0 and zero.fnmr == pytest.approx(4 / 5)
    closest = ev.fnmr_at_fmr(sims, mated, 1e-3, rule="closest")
    # The lowest observed score with one impostor at or above it is the mated 0.9985; the
    # scripts accept only score > threshold, so that mated comparison fails too.
    assert closest.threshold == 0.9985 and closest.fmr == pytest.approx(1e-3)
    assert closest.fnmr == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="non-mated"):
        ev.fnmr_at_fmr(gen, np.ones(5, bool), 1e-3)


def test_edc_fmr_mode_uses_impostors_once():
    rng = np.random.default_rng(0)
    imp = rng.normal(0.0, 0.1, 5000)
    gen = rng.normal(0.6, 0.2, 2000)
    sims = np.concatenate([gen, imp])
    mated = np.r_[np.ones(2000, bool), np.zeros(5000, bool)]
    q = np.concatenate([gen + rng.normal(0, 0.1, 2000), rng.uniform(size=5000)])
    c = ev.edc(sims, q, mated=mated, fmr=1e-3)
    assert c.threshold == ev.threshold_at_fmr(imp, 1e-3)
    assert c.comparisons == 2000
    assert c.starting_error == pytest.approx(np.mean(gen < c.threshold))
    d_ref, e_ref = _ref_edc(gen, q[:2000], c.threshold)
    np.testing.assert_allclose(c.error, e_ref)
    # the FM-EDC twin: errors are impostors at or above the threshold
    f = ev.edc(sims, q, mated=mated, starting_error=0.01, error_type="fmr")
    assert f.comparisons == 5000 and f.starting_error == pytest.approx(0.01, abs=2e-4)


def test_edc_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        ev.edc([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="exactly one"):
        ev.edc([0.1, 0.2], [1, 2], threshold=0.1, fmr=0.1)
    with pytest.raises(ValueError, match="NaN"):
        ev.edc([0.1, 0.2], [1, np.nan], threshold=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        ev.edc([0.1, np.nan], [1, 2], threshold=0.1)
    with pytest.raises(ValueError, match="differ in length"):
        ev.edc([0.1, 0.2], [1], threshold=0.1)
    with pytest.raises(ValueError, match="limit"):
        ev.edc([0.1], [1], threshold=0.5).pauc(1.5)
    # failures mapped to -inf are discarded first
    c = ev.edc([0.1, 0.9, 0.9], [-np.inf, 1, 2], threshold=0.5)
    np.testing.assert_allclose(c.error, [1 / 3, 0, 0])


def test_erc_compatibility_mode():
    rng = np.random.default_rng(1)
    n_gen, n_imp = 200, 1500
    gen = rng.normal(0.5, 0.2, n_gen)
    imp = rng.normal(0.0, 0.1, n_imp)
    sims = np.concatenate([gen, imp])
    mated = np.r_[np.ones(n_gen, bool), np.zeros(n_imp, bool)]
    q = np.concatenate([gen, rng.uniform(-1, 1, n_imp)]) + rng.normal(0, 0.05, n_gen + n_imp)
    curve = ev.erc(sims, q, mated, fmr=1e-2)
    assert curve.discard.size == 20 and curve.discard[-1] == pytest.approx(0.95)
    order = np.argsort(q, kind="stable")
    n = sims.size
    for k, u in enumerate(curve.discard):
        kept = order[int(u * n) :]
        s, m = sims[kept], mated[kept]
        cands = np.unique(s)
        fmrs = np.array([np.mean(s[~m] >= c) for c in cands])
        t = cands[np.argmin(np.abs(fmrs - 1e-2))]
        assert curve.thresholds[k] == t
        assert curve.error[k] == pytest.approx(np.mean(s[m] <= t))
    x, y = curve.discard, curve.error
    assert curve.auc(0.95) == pytest.approx(float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)))
    assert curve.auc(0.3) == pytest.approx(float(np.sum(np.diff(x[:7]) * (y[1:7] + y[:6]) / 2)))
    assert curve.error[0] > curve.error[10]  # quality correlates with the mated scores


# --------------------------------------------------------------------------- inputs


def test_lfw_pair_list(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("1\t2\nAbel_Pacheco\t1\t4\nAbel_Pacheco\t2\t3\nAbdel_Madi\t1\tAbbas_Kiarostami\t10\nA\t3\tB\t1\n")
    pairs = read_pair_list(p, ext=".jpg")
    assert pairs.a[0] == "Abel_Pacheco/Abel_Pacheco_0001.jpg" and pairs.b[0] == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    assert pairs.b[2] == "Abbas_Kiarostami/Abbas_Kiarostami_0010.jpg"
    np.testing.assert_array_equal(pairs.mated, [True, True, False, False])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 0, 0])
    bad = tmp_path / "bad.txt"
    bad.write_text("Abel_Pacheco 1\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_pair_list(bad)


def test_simple_pair_list_round_trip(tmp_path):
    pairs = PairList(a=["x/1.jpg", "y/2.jpg"], b=["x/3.jpg", "z/4.jpg"], mated=np.array([True, False]))
    back = read_pair_list(write_pair_list(tmp_path / "pl.txt", pairs))
    assert back.a == pairs.a and back.b == pairs.b
    np.testing.assert_array_equal(back.mated, pairs.mated)
    bp = bin_pairs([True, False, True])
    assert bp.a == ["0", "2", "4"] and bp.b == ["1", "3", "5"] and bp.mated.tolist() == [True, False, True]


def test_quality_files_and_key_matching(tmp_path):
    keys = ["lfw/A/A_0001.jpg", "lfw/B/B_0002.png", "C/C_0003"]
    scores = QualityScores(method="m", keys=keys, values=[0.5, np.nan, 2.0])
    for name in ("q.csv", "q.parquet"):
        back = read_quality_file(write_quality_file(tmp_path / name, scores))
        assert back.method == "q" and back.keys == scores.keys
        np.testing.assert_array_equal(back.values, scores.values)
    txt = tmp_path / "crfiqa.txt"
    txt.write_text("/data/lfw/images/0.jpg 0.31\n/data/lfw/images/1.jpg 0.62\n")
    t = read_quality_file(txt, method="CR-FIQA")
    np.testing.assert_allclose(t.lookup(["1", "0", "2"]), [0.62, 0.31, np.nan])
    assert normalise_key(".\\A\\A_0001.JPG") == "A/A_0001"
    got = match_keys(["A/A_0001", "B/B_0002.jpg", "/other/root/C/C_0003.png", "D"], scores.keys)
    np.testing.assert_array_equal(got, [0, 1, 2, -1])
    # an ambiguous suffix matches nothing rather than the wrong sample
    np.testing.assert_array_equal(match_keys(["1"], ["a/1.jpg", "b/1.jpg"]), [-1])
    custom = tmp_path / "c.csv"
    custom.write_text("img,qs\nA_1,0.5\n")
    with pytest.raises(ValueError, match="cannot tell the key column"):
        read_quality_file(custom)
    assert read_quality_file(custom, key_column="img", quality_column="qs").values.tolist() == [0.5]
    nonnum = tmp_path / "n.csv"
    nonnum.write_text("a.jpg,0.3\nb.jpg,high\n")
    with pytest.raises(ValueError, match="n.csv:2"):
        read_quality_file(nonnum)


def test_erc_steps_without_mated_pairs_are_nan():
    sims = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.05])
    mated = np.array([True, True, False, False, False, False])
    q = np.array([0.0, 0.1, 0.5, 0.6, 0.7, 0.8])  # the mated pairs go first
    c = ev.erc(sims, q, mated, fmr=0.25, fractions=[0.0, 0.2, 0.4])
    assert np.isfinite(c.error[:2]).all() and np.isnan(c.error[2])
    assert c.auc(0.4) == pytest.approx(0.2 * (c.error[0] + c.error[1]) / 2)


def test_edc_plot_png(example, tmp_path):
    import matplotlib.image as mpimg

    from pipeline.evaluation.plots import plot_edc, plot_erc

    curves = {m: ev.edc(example.similarity, _pair_q(example, m), starting_error=0.1)
              for m in ("QA algorithm 1", "QA algorithm 2")}
    png = plot_edc(curves, tmp_path / "edc.png", limit=0.3, title="example data, starting error 0.1")
    img = mpimg.imread(png)
    assert img.shape[0] > 400 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # not a blank canvas
    rng = np.random.default_rng(0)
    sims = np.r_[rng.normal(0.6, 0.2, 200), rng.normal(0, 0.1, 2000)]
    mated = np.r_[np.ones(200, bool), np.zeros(2000, bool)]
    erc_png = plot_erc({"random": ev.erc(sims, rng.random(2200), mated, fmr=1e-2)}, tmp_path / "erc.png")
    assert erc_png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one"):
        plot_edc({}, tmp_path / "x.png")
