"""The attribute-CNN training report: markdown text and one confusion-matrix PNG per head."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.attributes import LABEL_SEMANTICS

REPORT_NAME = "attributes_report.md"


def plot_confusion(cm: Any, head: str, path: str | os.PathLike[str], *, threshold: float | None = None) -> Path:
    """Write a 2x2 confusion matrix (rows: truth, columns: prediction) with counts and row rates as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    m = np.asarray(cm, dtype=np.int64).reshape(2, 2)
    positive = LABEL_SEMANTICS[head]["positive"]
    names = [f"not {positive}", positive]
    rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{m[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.6 else "black", fontsize=10)
    ax.set_xticks([0, 1], names, fontsize=8)
    ax.set_yticks([0, 1], names, fontsize=8, rotation=90, va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = f"{head}" + ("" if threshold is None else f" (p >= {threshold:.3f})")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per head: the figures of the report's main table (also a Prefect table artifact)."""
    rows = []
    for head, m in metrics.items():
        (tn, fp), (fn, tp) = m["confusion"]
        rows.append({
            "attribute": head,
            "positive class": LABEL_SEMANTICS[head]["positive"],
            "threshold": round(m["threshold"], 4),
            "balanced accuracy": round(m["balanced_accuracy"], 4),
            "balanced accuracy @0.5": round(m["balanced_accuracy_at_0.5"], 4),
            "AUROC": None if math.isnan(m["auroc"]) else round(m["auroc"], 4),
            "TN/FP/FN/TP": f"{tn}/{fp}/{fn}/{tp}",
            "positives": m["positives"],
            "negatives": m["negatives"],
        })
    return rows


def report_markdown(
    *,
    run_id: str,
    model_id: str,
    checkpoint: str,
    metrics: Mapping[str, Mapping[str, Any]],
    train_info: Mapping[str, Any],
    data: Mapping[str, Any],
    images: Mapping[str, str],
    notes: Mapping[str, Any] | None = None,
) -> str:
    """The report: data counts, imbalance handling, per-head validation metrics and confusion matrices."""
    rows = metrics_table(metrics)
    cols = list(rows[0]) if rows else []
    lines = [
        f"# Attribute CNN training report: run `{run_id}`",
        "",
        f"- model id: `{model_id}`",
        f"- checkpoint: `{checkpoint}`",
        f"- device: {train_info.get('device')}, mixed precision: {train_info.get('amp')}, "
        f"training time: {train_info.get('seconds', 0.0):.1f} s",
        f"- class imbalance: `{train_info.get('imbalance')}`; positive weights "
        + ", ".join(f"{h} {w:.2f}" for h, w in train_info.get("pos_weight", {}).items()),
        f"- decision thresholds chosen on {train_info.get('calibration_samples', 0)} held-out training crops "
        "(maximum balanced accuracy), then applied unchanged to the validation split",
        *(f"- {k}: {v}" for k, v in (notes or {}).items()),
        "",
        "## Data",
        "",
        "| split | images | faces | kept | skipped | crops (aligned / box) |",
        "|---|---|---|---|---|---|",
    ]
    for split, d in data.items():
        skipped = ", ".join(f"{k} {v}" for k, v in d.get("skipped", {}).items()) or "none"
        lines.append(f"| {split} | {d.get('images', 0)} | {d.get('faces', 0)} | {d.get('kept', 0)} | {skipped} | "
                     f"{d.get('crops', 0)} ({d.get('aligned', 0)} / {d.get('box', 0)}) |")
    lines += ["", "## Validation metrics", ""]
    if rows:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "Label semantics (WIDER FACE -> positive class):", ""]
    lines += [f"- {h}: {s['positive']} = {s['wider_rule']}" for h, s in LABEL_SEMANTICS.items()]
    lines += ["", "## Confusion matrices (validation)", ""]
    lines += [f"![{h}]({name})" for h, name in images.items()]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, run_id: str, trained: Mapping[str, Any], data: Mapping[str, Any],
                 notes: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Report markdown, metrics JSON and one confusion-matrix PNG per head in `out_dir`."""
    pngs = {h: plot_confusion(m["confusion"], h, out_dir / f"confusion_{h}.png", threshold=m["threshold"])
            for h, m in trained["metrics"].items()}
    text = report_markdown(run_id=run_id, model_id=trained["model_id"], checkpoint=trained["checkpoint"],
                           metrics=trained["metrics"], train_info=trained["train_info"], data=data,
                           images={h: p.name for h, p in pngs.items()}, notes=notes)
    report = out_dir / REPORT_NAME
    report.write_text(text)
    metrics_json = out_dir / "attributes_metrics.json"
    metrics_json.write_text(json.dumps({"run_id": run_id, "model_id": trained["model_id"],
                                        "checkpoint": trained["checkpoint"], "metrics": trained["metrics"],
                                        "data": data}, indent=2, default=float))
    return {"report": report, "metrics": metrics_json, **{f"confusion_{h}": p for h, p in pngs.items()}}
