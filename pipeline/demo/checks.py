"""What the demo measures: each demo variant's labels and score against its recorded degradation.

The factor labels are checked against `pipeline.validity`'s rules (class rates vs
targets); CPBD, the anchor and the score by the sign of their Spearman correlation with
the degradation level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_manifest import Workspace, catalog
from pipeline.synthetic.demo_data import IN_DEMO

# What each degradation level should move, and in which direction (Spearman over levels, for the summary).
# The factor labels are checked against `pipeline.validity`'s rules instead (class rates vs targets).
EXPECTED: list[tuple[str, str, str, int]] = [
    # kind, label column of `labels`/joined view, description, expected sign of Spearman(level, value)
    ("blur", "blur_value", "CPBD", -1),
    ("downscale", "blur_value", "CPBD", -1),
    ("blur", "anchor", "anchor", -1),
    ("downscale", "anchor", "anchor", -1),
    ("noise", "anchor", "anchor", -1),
    ("mask", "anchor", "anchor", -1),
    ("jpeg", "anchor", "anchor", -1),
    ("blur", "quality", "CLIB-FIQA score", -1),
    ("downscale", "quality", "CLIB-FIQA score", -1),
    ("noise", "quality", "CLIB-FIQA score", -1),
    ("mask", "quality", "CLIB-FIQA score", -1),
]


def labellers(ws: Workspace) -> list[dict[str, Any]]:
    """Which labeller (and version) wrote the latest rows of each factor."""
    sql = (f"SELECT factor, labeller, labeller_version, count(*) AS n FROM factors WHERE {IN_DEMO} "
           "GROUP BY ALL ORDER BY factor, labeller")
    return catalog.query(ws, sql).to_pylist()


def demo_rows(ws: Workspace, data_root: Path) -> list[dict[str, Any]]:
    """Every demo variant with its recorded degradation, its labels, its alignment transform and its score."""
    manifest = (data_root / "degradations.csv").as_posix().replace("'", "''")
    root = data_root.resolve().as_posix().replace("'", "''")
    sql = (f"SELECT d.kind, d.level, d.identity, l.*, fc.transform, sc.quality FROM read_csv('{manifest}') d "
           f"JOIN labels l ON l.source = '{root}/' || d.path LEFT JOIN faces fc USING (sample_id) "
           "LEFT JOIN (SELECT sample_id, quality FROM scores WHERE method = 'clib-fiqa' AND status = 'ok') sc "
           "USING (sample_id)")
    return catalog.query(ws, sql).to_pylist()


def label_validity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The factor labels of the demo variants against `pipeline.validity`'s rules (rates, targets, accuracy).

    Variants are loose 224-px faces degraded before alignment, so blur and
    resolution rules are converted to crop pixels with each face's alignment
    scale. A variant in which no face was found has no labels: it is counted
    apart (`no_face`), not scored.
    """
    from pipeline import validity as V
    from pipeline.synthetic import demo_data

    rows = [r for r in rows if r["kind"] not in ("corrupt", "no_face")]
    scales: dict[Any, list[float]] = {}
    for r in rows:
        if r.get("transform") is not None:
            scales.setdefault(r["identity"], []).append(V.crop_scale(r["transform"]))
    typical = float(np.median([v for vs in scales.values() for v in vs])) if scales else 1.0
    outcomes = []
    for r in rows:
        # A variant without a face has no alignment: its identity's median scale places it under its rule.
        scale = (V.crop_scale(r["transform"]) if r.get("transform") is not None
                 else float(np.median(scales[r["identity"]])) if r["identity"] in scales else typical)
        expect = V.expectations(r["kind"], int(r["level"]), crop_scale=scale, image_short=demo_data.SOURCE_SIZE)
        found = r.get("face_status") == "ok"
        labels = {f: (r.get(f"{f}_class") if found and r.get(f"{f}_status") == "ok" else None) for f in V.FACTORS}
        outcomes.append(V.Outcome(r["identity"], r["kind"], int(r["level"]), labels, expect, face_found=found))
    rep = V.report(outcomes)
    return {"checks": rep["checks"], "balanced_accuracy": rep["balanced_accuracy"], "all_ok": rep["all_ok"]}


def correlations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman correlation of CPBD, the anchor and the score with the level of the degradation that should move it."""
    from scipy.stats import spearmanr

    rows = [r for r in rows if r.get("face_status") == "ok"]
    out = []
    for kind, col, desc, sign in EXPECTED:
        pts = [(r["level"], r[col]) for r in rows
               if (r["kind"] == kind or r["kind"] == "clean") and r.get(col) is not None]
        if len(pts) < 4 or len({p[1] for p in pts}) < 2:
            continue
        rho = float(spearmanr([p[0] for p in pts], [p[1] for p in pts]).statistic)
        out.append({"degradation": kind, "label": desc, "n": len(pts), "spearman": round(rho, 3),
                    "expected": "-" if sign < 0 else "+", "as_expected": bool(np.sign(rho) == sign)})
    flips = {r["identity"]: r["pose_value"] for r in rows if r["kind"] == "flip" and r["pose_value"] is not None}
    clean = {r["identity"]: r["pose_value"] for r in rows if r["kind"] == "clean" and r["pose_value"] is not None}
    both = [(clean[i], flips[i]) for i in clean if i in flips and abs(clean[i]) > 8.0]
    if both:
        agree = sum(np.sign(a) == -np.sign(b) for a, b in both)
        out.append({"degradation": "flip", "label": "yaw sign, |yaw|>8", "n": len(both),
                    "spearman": None, "expected": f"{agree}/{len(both)} flipped", "as_expected": agree == len(both)})
    return out
