"""EDC / ERC results of quality methods on one benchmark's comparisons, and their markdown report (pure numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation import metrics as ev

PROTOCOLS = ("edc", "erc")


def compute_metrics(
    bench: str,
    fr_model: str,
    sims: np.ndarray,
    mated: np.ndarray,
    qualities: dict[str, tuple[np.ndarray, int]],
    *,
    fmrs: Sequence[float],
    starting_errors: Sequence[float],
    protocols: Sequence[str],
    pauc_limit: float,
    auc_limit: float,
    excluded: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Result rows, curve points and curve objects (for plots) of every method, protocol and operating point."""
    rows: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    base = {"benchmark": bench, "fr_model": fr_model, "mated_pairs": n_mated, "nonmated_pairs": n_non,
            "excluded_pairs": excluded}
    settings: list[tuple[str, float | None, float | None]] = []
    if n_non:
        settings += [("edc", f, None) for f in fmrs]
    settings += [("edc", None, s) for s in starting_errors]
    if "erc" in protocols and n_non:
        settings += [("erc", f, None) for f in fmrs]
    for protocol, fmr, se in settings:
        if protocol not in protocols:
            continue
        label = f"{protocol}_fmr{fmr:g}" if fmr is not None else f"{protocol}_se{se:g}"
        curves[label] = {}
        for method, (pq, missing) in qualities.items():
            row = {**base, "method": method, "protocol": protocol, "fmr": fmr, "starting_error_target": se,
                   "missing_quality_pairs": missing, "pauc_limit": pauc_limit, "auc_limit": auc_limit}
            if protocol == "edc":
                c = ev.edc(sims, pq, mated=mated, fmr=fmr, starting_error=se)
                row.update(threshold=c.threshold, starting_error=c.starting_error, pauc=c.pauc(pauc_limit),
                           pauc_minus_best=c.pauc(pauc_limit, minus_theoretical_best=True),
                           pauc_normalized=c.pauc(pauc_limit, minus_theoretical_best=True, normalize=True),
                           auc=c.pauc(auc_limit), curve_points=int(c.discard.size))
                xs, ys = c.discard, c.error
            else:
                c = ev.erc(sims, pq, mated, fmr=fmr)  # type: ignore[arg-type]
                row.update(threshold=float(c.thresholds[0]), starting_error=float(c.error[0]),
                           pauc=c.auc(pauc_limit), pauc_minus_best=None, pauc_normalized=None,
                           auc=c.auc(auc_limit), curve_points=int(c.discard.size))
                xs, ys = c.discard, c.error
            rows.append(row)
            curves[label][method] = c
            points += [{"benchmark": bench, "method": method, "curve": label, "discard": float(x), "error": float(y)}
                       for x, y in zip(xs, ys, strict=True)]
    return rows, points, curves


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def results_markdown(rows: list[dict[str, Any]], plots: list[str]) -> str:
    """The results as a markdown report: one table per benchmark, lower pAUC/AUC is better."""
    out = ["# Quality evaluation (EDC / ERC)", "",
           "Lower is better. `pauc`: area under the EDC (stepwise) or ERC (trapezoid) on [0, pauc_limit]; "
           "`auc`: the same on [0, auc_limit]; `pauc-best`: minus the theoretical best area; "
           "`norm`: 0 = theoretical best, 1 = no better than random discarding.", ""]
    cols = ["method", "protocol", "fmr", "starting_error_target", "threshold", "starting_error", "pauc",
            "pauc_minus_best", "pauc_normalized", "auc", "missing_quality_pairs"]
    heads = ["method", "protocol", "FMR", "start. err. target", "threshold", "FNMR@0", "pAUC",
             "pAUC-best", "norm", "AUC", "no quality"]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        sub = [r for r in rows if r["benchmark"] == bench]
        first = sub[0]
        out += [f"## {bench}", "",
                f"FR model `{first['fr_model']}`; {first['mated_pairs']} mated, {first['nonmated_pairs']} "
                f"non-mated pairs ({first['excluded_pairs']} excluded: no embedding); pAUC limit "
                f"{first['pauc_limit']:g}, AUC limit {first['auc_limit']:g}.", "",
                "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in sub]
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"- `{p}`" for p in plots] + [""]
    return "\n".join(out)


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Rows as one Parquet file, written atomically (an empty table when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_manifest.writer import atomic_write

    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def pauc_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """{benchmark/method/protocol/fmr<x> or se<x>/pauc: pAUC} of result rows (a run's recorded metrics)."""
    return {f"{r['benchmark']}/{r['method']}/{r['protocol']}/"
            f"{'fmr' if r['fmr'] is not None else 'se'}"
            f"{r['fmr'] if r['fmr'] is not None else r['starting_error_target']:g}/pauc": r["pauc"] for r in rows}
