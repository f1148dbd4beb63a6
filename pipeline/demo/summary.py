"""The demo's printed summary: rows per table, statuses and factor distributions from SQL, label checks, EDC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_manifest import Workspace, catalog
from pipeline.reports.query_results import format_table
from pipeline.reports.stats import collect


def print_summary(ws: Workspace, summary: dict[str, Any]) -> None:
    """Print the summary of a demo run (the dict `fiqa demo` returns) with the workspace's tables."""
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
