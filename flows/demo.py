"""`fiqa demo` (what `make demo` runs): the whole pipeline on a dataset built from package-shipped faces.

Builds the embedded demo dataset (pipeline/synthetic/demo_data.py: each real face an
identity, variants with recorded degradations, a few broken files), then runs
ingest -> label (align, blur, pose, and the real-face attribute labellers:
occlusion CNN, FER expression, analytic lighting; `--attributes-checkpoint`
labels the attributes with a WIDER-trained CNN instead) -> anchors (dlib) ->
train (tiny config, CPU) with the confidence pass -> score -> evaluate, and
prints a summary: counts per table, factor distributions from SQL, each label
against its known degradation (the rules and targets of `pipeline.validity`),
how anchors and scores move with the degradation level, the EDC table, and
where the report and plots are. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest import Workspace, catalog
from flows import runtime

DATASET = "demo"
MIN_FACE_SCORE = 0.95  # as models.fit_data.face_sets.real_faces: MTCNN also finds a "face" on a hand in t1.jpg
IN_DEMO = f"sample_id IN (SELECT sample_id FROM samples WHERE dataset = '{DATASET}')"

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


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log and time one demo step into `timings`."""
    t0 = time.perf_counter()
    _log(f"{name} ...")
    yield
    timings[name] = round(time.perf_counter() - t0, 1)
    _log(f"{name} done in {timings[name]} s")


def build_dataset(root: Path, quick: bool) -> list:
    """The demo ImageFolder tree (identities from shipped faces, recorded degradations, broken files)."""
    from models.detectors import MTCNNDetector
    from pipeline.synthetic import demo_data

    if (root / demo_data.MANIFEST).exists():
        return demo_data.read_manifest(root)
    det = MTCNNDetector()
    faces = demo_data.identity_faces(lambda im: [(d.box, d.score) for d in det.detect(im)
                                                 if d.score >= MIN_FACE_SCORE],
                                     max_identities=6 if quick else None)
    return demo_data.build(root, faces, levels=demo_data.QUICK_LEVELS if quick else demo_data.FULL_LEVELS)


def labellers(ws: Workspace) -> list[dict[str, Any]]:
    """Which labeller (and version) wrote the latest rows of each factor."""
    sql = (f"SELECT factor, labeller, labeller_version, count(*) AS n FROM factors WHERE {IN_DEMO} "
           "GROUP BY ALL ORDER BY factor, labeller")
    return catalog.query(ws, sql).to_pylist()


def comparisons(ws: Workspace, model_id: str, out: Path) -> Path:
    """All mated and a balanced set of non-mated pairs of the demo's embedded faces, with cosine similarity."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tbl = catalog.query(ws, "SELECT e.sample_id, s.identity, e.embedding FROM embeddings e "
                            "JOIN samples s USING (sample_id) "
                            f"WHERE e.status = 'ok' AND e.model_id = '{model_id}' AND s.dataset = '{DATASET}' "
                            "AND s.identity >= 0 ORDER BY e.sample_id")
    ids = tbl.column("sample_id").to_pylist()
    ident = np.asarray(tbl.column("identity").to_pylist())
    emb = np.asarray(tbl.column("embedding").to_pylist(), dtype=np.float32)
    sim = emb @ emb.T
    iu = np.triu_indices(len(ids), k=1)
    mated = ident[iu[0]] == ident[iu[1]]
    a = [ids[i] for i in iu[0]]
    b = [ids[j] for j in iu[1]]
    pq.write_table(pa.table({"key_a": a, "key_b": b, "mated": mated, "similarity": sim[iu].astype(np.float64)}), out)
    return out


def quality_files(ws: Workspace, out_dir: Path) -> list[str]:
    """Quality specs of the methods compared in the demo's EDC: our stored scores, CPBD and the anchor."""
    import pyarrow.csv as pcsv

    specs = [f"clib-fiqa=scores:clib-fiqa@{DATASET}"]
    queries = {  # other methods as quality files, the way any external FIQA method comes in
        "cpbd": "SELECT sample_id AS key, blur_value AS quality FROM labels WHERE blur_value IS NOT NULL",
        "anchor-oracle": "SELECT sample_id AS key, anchor AS quality FROM labels WHERE anchor IS NOT NULL",
    }
    for name, q in queries.items():
        tbl = catalog.query(ws, q)
        if tbl.num_rows:
            p = out_dir / f"quality_{name}.csv"
            pcsv.write_csv(tbl, p)
            specs.append(f"{name}={p}")
    return specs


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


def run_demo(workspace: str | None = None, quick: bool = False, train_steps_epochs: int | None = None,
             attributes_checkpoint: str | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline on the demo dataset; returns the summary.

    `attributes_checkpoint`: label occlusion/expression/lighting with this WIDER-trained attribute CNN
    instead of the real-face labellers.
    """
    from flows.anchors import anchors_flow
    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from flows.label import label
    from flows.score import score_flow
    from flows.train import train_flow

    ws = Workspace(workspace)
    timings: dict[str, float] = {}
    data_root = ws.root / "demo_data"
    t0 = time.perf_counter()
    with _step("build demo dataset", timings):
        variants = build_dataset(data_root, quick)
    with _step("ingest", timings):
        ingest(path=str(data_root), dataset=DATASET, workspace=str(ws.root), shard_size=32, progress=False)
    options = {"detector": "mtcnn", "pose_backend": "dlib", "attributes_checkpoint": attributes_checkpoint}
    with _step("label align,blur,pose,attributes", timings):
        label(stages=["align", "blur", "pose", "attributes"], where=IN_DEMO, options=options,
              workspace=str(ws.root), shard_size=32, progress=False)
    with _step("anchors (dlib ResNet)", timings):
        anchors = anchors_flow(workspace=str(ws.root), fr_model="dlib", where=IN_DEMO, shard_size=64, progress=False)
    epochs = train_steps_epochs or (2 if quick else 8)
    with _step("train CLIB-FIQA (tiny, CPU)", timings):
        trained = train_flow(workspace=str(ws.root), model_config="clib-tiny", where=IN_DEMO,
                             train_config={"stage1_epochs": epochs, "stage2_epochs": epochs, "batch_size": 32,
                                           "lr": 1e-3, "num_workers": 0, "device": "cpu"})
    with _step("score", timings):
        score_flow(workspace=str(ws.root), checkpoint=str(trained["checkpoint"]), where=IN_DEMO, device="cpu")
    reports = ws.reports / "demo"
    reports.mkdir(parents=True, exist_ok=True)
    with _step("evaluate (EDC)", timings):
        model_id = catalog.query(ws, "SELECT model_id FROM embeddings WHERE status = 'ok' LIMIT 1").column(0)[0].as_py()
        pairs = comparisons(ws, model_id, reports / "demo_pairs.parquet")
        ev = evaluate(benchmarks=[f"demo={pairs}"], qualities=quality_files(ws, reports), workspace=str(ws.root),
                      fmrs=[1e-2], starting_errors=[0.1], protocols=["edc"], output=str(reports / "evaluation"))
    timings["total"] = round(time.perf_counter() - t0, 1)
    rows = demo_rows(ws, data_root)
    summary = {
        "workspace": str(ws.root),
        "variants": len(variants),
        "timings_s": timings,
        "anchor_run": anchors.get("run_id"),
        "checkpoint": str(trained["checkpoint"]),
        "evaluation": {"output": ev["output"], "plots": ev["plots"], "rows": ev["rows"]},
        "labellers": labellers(ws),
        "label_validity": label_validity(rows),
        "correlations": correlations(rows),
    }
    from data_manifest.gallery import write_gallery
    from flows.gallery import publish_gallery

    summary["gallery"] = str(write_gallery(ws))  # after "total": the page shows the finished run
    publish_gallery(Path(summary["gallery"]))
    (reports / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def print_summary(ws: Workspace, summary: dict[str, Any]) -> None:
    from flows.sql import format_table
    from flows.stats import collect

    print("\n=== CLIB-FIQA demo summary ===")
    print(f"workspace: {summary['workspace']}  ({summary['variants']} images, "
          f"{summary['timings_s']['total']} s in all)")
    counts = catalog.query(ws, " UNION ALL ".join(
        f"SELECT '{t}' AS tbl, count(*) AS rows FROM {t}"
        for t in ("samples", "faces", "factors", "embeddings", "anchors", "scores", "runs")))
    print("\n-- rows per table (latest) --")
    print(format_table(counts))
    res = collect(ws, ("status_summary", "factor_distribution"))
    print("\n-- statuses --")
    print(format_table(res["status_summary"]))
    print("\n-- factor distributions (SQL: data_manifest/sql/factor_distribution.sql) --")
    print(format_table(res["factor_distribution"]))
    print("\n-- labellers --")
    for r in summary["labellers"]:
        print(f"  {r['factor']:<11} {r['labeller']} {r['labeller_version']}  ({r['n']} rows)")
    val = summary["label_validity"]
    print("\n-- labels vs known degradations (rules and targets: pipeline/validity.py) --")
    for c in val["checks"]:
        mark = "ok" if c["ok"] else "unexpected"
        levels = ",".join(str(v) for v in c["levels"])
        missing = f", {c['no_face']} without a face" if c["no_face"] else ""
        print(f"  {c['kind']:<11} {levels:<5} {c['factor']:<10} {c['expected']:<17} {c['hits']:>3}/{c['n']:<3} "
              f"{c['rate']:.2f} {c['comparison']} {c['target']:.2f}  ({c['rule']}{missing})  [{mark}]")
    ba = ", ".join(f"{f} {v['balanced_accuracy']:.2f}" for f, v in val["balanced_accuracy"].items()
                   if v["balanced_accuracy"] is not None)
    print(f"  balanced accuracy: {ba}")
    print("\n-- CPBD, anchors and scores vs degradation level (Spearman over level 0..3) --")
    for c in summary["correlations"]:
        rho = "" if c["spearman"] is None else f"{c['spearman']:+.3f}"
        mark = "ok" if c["as_expected"] else "unexpected"
        print(f"  {c['degradation']:<10} {c['label']:<22} n={c['n']:<4} {rho:>7}  expected {c['expected']}  [{mark}]")
    print("\n-- EDC (FNMR at FMR 1e-2 threshold and at starting error 0.1; pAUC to 0.3 discarded) --")
    for r in summary["evaluation"]["rows"]:
        keys = ("method", "fmr", "starting_error_target", "threshold", "starting_error", "pauc", "pauc_normalized",
                "auc")
        print("  " + "  ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                               for k in keys if r.get(k) is not None))
    print(f"\nreport: {summary['evaluation']['output']}")
    for p in summary["evaluation"]["plots"]:
        print(f"plot:   {p}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"summary: {Path(summary['workspace']) / 'reports' / 'demo' / 'summary.json'}")
    if summary.get("gallery"):
        print(f"gallery: {summary['gallery']}")
    print(f"inspect: fiqa sql --workspace {summary['workspace']} \"SELECT * FROM labels LIMIT 5\"")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--quick", action="store_true", help="fewer identities, levels and epochs")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training stage (default 8, quick 2)")
    p.add_argument("--attributes-checkpoint", default=None,
                   help="label occlusion/expression/lighting with this WIDER-trained attribute CNN "
                        "(default: the real-face labellers)")


def run_cli(args: argparse.Namespace) -> int:
    from prefect import flow

    demo = flow(name="demo", log_prints=False)(run_demo)
    summary = demo(workspace=args.workspace, quick=args.quick, train_steps_epochs=args.epochs,
                   attributes_checkpoint=args.attributes_checkpoint)
    print_summary(Workspace(args.workspace), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(runtime.main_for("flows.demo")())
