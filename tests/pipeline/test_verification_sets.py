"""Benchmark reading, similarities, pair qualities, EDC/ERC rows and the markdown report, without Prefect."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.evaluation import verification_sets as B
from pipeline.evaluation.formats import QualityScores, read_edc_json
from pipeline.evaluation.report import compute_metrics, results_markdown

EDC_EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "edc" / "example_data.json"


def test_edc_example_reference_value_through_compute_metrics():
    """The EDC example's published setting (starting error 0.05, pAUC limit 0.2) gives the reference pAUC."""
    bench = B.load_benchmark(str(EDC_EXAMPLE))
    assert bench.kind == "edc-json" and bench.similarity is not None
    keys = bench.pairs.keys()
    qualities = {name: B.pair_qualities(q, keys, bench.pairs, "min") for name, q in bench.qualities.items()}
    rows, points, curves = compute_metrics(bench.name, "given", bench.similarity, bench.pairs.mated, qualities,
                                           fmrs=[1e-3], starting_errors=[0.05], protocols=["edc"],
                                           pauc_limit=0.2, auc_limit=0.95, excluded=0)
    got = {r["method"]: r["pauc"] for r in rows}
    assert got["QA algorithm 1"] == pytest.approx(0.006959681644975037, rel=1e-9)
    assert len(rows) == len(read_edc_json(EDC_EXAMPLE).qualities) and set(curves) == {"edc_se0.05"}
    assert all(0 <= p["discard"] <= 1 for p in points)
    md = results_markdown(rows, ["x.png"])
    assert f"## {bench.name}" in md and "| QA algorithm 1 | edc |" in md and "- `x.png`" in md


def test_comparison_table_pairs_images_and_crops(tmp_path):
    img = np.zeros((120, 100, 3), np.uint8)
    img[:, :50] = 200
    (tmp_path / "crops" / "A").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "crops" / "A" / "a1.png"), img)
    table = tmp_path / "cmp.csv"
    table.write_text("left,right,is_same,similarity\nA/a1,A/a2,1,0.8\nA/a1,B/b1,0,0.1\n")
    bench = B.load_benchmark(f"mine={table}", images_root=str(tmp_path / "crops"))
    assert (bench.name, bench.kind) == ("mine", "table")
    assert bench.pairs.a == ["A/a1", "A/a1"] and bench.pairs.mated.tolist() == [True, False]
    np.testing.assert_allclose(bench.similarity, [0.8, 0.1])
    crop, err = B.load_crop(bench, "A/a1")  # found with its extension, resized to 112 x 112
    assert err is None and crop.shape == (112, 112, 3) and crop[:, :40].mean() > 150 > crop[:, 70:].mean()
    crop, err = B.load_crop(bench, "B/b1")
    assert crop is None and err.startswith("missing: no image for key 'B/b1'")
    (bad := tmp_path / "bad.csv").write_text("left,right,flag\nx,y,1\n")
    with pytest.raises(ValueError, match="no mated flag column"):
        B.load_benchmark(str(bad))


def test_similarity_and_pair_quality_with_failures():
    pairs = B.PairList(a=["a", "a", "c"], b=["b", "c", "d"], mated=[True, False, True])
    vec = np.array([[1, 0], [1, 0], [0, 1], [np.nan, np.nan]], dtype=np.float32)
    emb = B.Embedded(keys=["a", "b", "c", "d"], vectors=vec, failures={"d": "unreadable"})
    sims = B.cosine_similarity(emb, pairs)
    assert sims[:2].tolist() == [1.0, 0.0] and np.isnan(sims[2])
    q = QualityScores("m", ["a", "b", "c"], [0.9, 0.2, 0.5])
    pq, missing = B.pair_qualities(q, ["a", "b", "c", "d"], pairs, "min")
    assert pq[:2].tolist() == [0.2, 0.5] and pq[2] == -np.inf and missing == 1


def test_compute_metrics_orders_an_oracle_before_its_reverse():
    rng = np.random.default_rng(1)
    n = 400
    mated = np.arange(n) % 2 == 0
    quality = rng.uniform(size=n)
    sims = np.where(mated, 0.6 * quality, rng.normal(0.0, 0.1, n))  # low quality = low mated score
    rows, _, _ = compute_metrics("syn", "fr", sims, mated, {"oracle": (quality, 0), "reverse": (-quality, 0)},
                                 fmrs=[0.01], starting_errors=[], protocols=["edc", "erc"], pauc_limit=0.3,
                                 auc_limit=0.95, excluded=0)
    by = {(r["method"], r["protocol"]): r for r in rows}
    assert len(rows) == 4 and by[("oracle", "edc")]["threshold"] == by[("reverse", "edc")]["threshold"]
    assert 0 < by[("oracle", "edc")]["pauc"] < by[("reverse", "edc")]["pauc"]
    assert by[("oracle", "erc")]["auc"] < by[("reverse", "erc")]["auc"]
