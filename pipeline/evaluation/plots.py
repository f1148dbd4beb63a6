"""EDC / ERC plots as PNG (matplotlib, Agg backend): one line per quality method, shaded pAUC region."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.metrics import EdcCurve, ErcCurve


def _pyplot():
    """Import pyplot on the file-only Agg backend (no display is ever needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _steps(curve: EdcCurve) -> tuple[np.ndarray, np.ndarray]:
    """x, y of the stepwise curve, its last step held to discard fraction 1."""
    return np.append(curve.discard, 1.0), np.append(curve.error, curve.error[-1])


def plot_edc(
    curves: Mapping[str, EdcCurve],
    path: str | os.PathLike[str],
    *,
    limit: float = 0.3,
    title: str | None = None,
    xmax: float | None = None,
) -> Path:
    """Write an EDC plot: error vs discard fraction per method, starting error and theoretical best dashed.

    The pAUC region [0, limit] of the method with the lowest pAUC is shaded
    between its curve and the theoretical best line.
    """
    if not curves:
        raise ValueError("plot_edc needs at least one curve")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=120)
    try:
        first = next(iter(curves.values()))
        e0 = first.starting_error
        right = xmax if xmax is not None else min(1.0, max(0.5, 2 * limit))
        paucs = {name: c.pauc(limit) for name, c in curves.items()}
        best = min(paucs, key=lambda k: paucs[k])
        bx, by = _steps(curves[best])
        grid = np.linspace(0.0, limit, 2001)
        idx = np.clip(np.searchsorted(bx, grid, side="right") - 1, 0, by.size - 1)
        ax.fill_between(grid, np.maximum(0.0, e0 - grid), by[idx], color="0.85", zorder=0,
                        label=f"pAUC region [0, {limit:g}] ({best})")
        ax.plot([0, right], [e0, e0], ls="--", color="0.5", lw=1, label=f"starting error {e0:.4g}")
        ax.plot([0, min(e0, right)], [e0, max(0.0, e0 - right)], ls=":", color="0.3", lw=1, label="theoretical best")
        for name, c in curves.items():
            x, y = _steps(c)
            ax.step(x, y, where="post", lw=1.6, label=f"{name} (pAUC {paucs[name]:.4f})")
        ax.axvline(limit, color="0.6", lw=0.8)
        ax.set_xlim(0.0, right)
        ymax = max(float(np.max(c.error[c.discard <= right])) for c in curves.values())
        ax.set_ylim(0.0, max(ymax, e0) * 1.1 or 1.0)
        ax.set_xlabel("Fraction of discarded comparisons")
        ax.set_ylabel("FNMR" if first.error_type == "fnmr" else "FMR")
        ax.set_title(title or f"EDC (threshold {first.threshold:.4g})", fontsize=10)
        return _save(fig, ax, path)
    finally:
        plt.close(fig)


def _save(fig: Any, ax: Any, path: str | os.PathLike[str]) -> Path:
    """Grid, legend and layout shared by every plot, then write the figure to `path`."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_erc(
    curves: Mapping[str, ErcCurve],
    path: str | os.PathLike[str],
    *,
    limit: float = 0.95,
    title: str | None = None,
) -> Path:
    """Write an ERC plot in the CR-FIQA style (linear segments between the 5 % steps)."""
    if not curves:
        raise ValueError("plot_erc needs at least one curve")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=120)
    try:
        for name, c in curves.items():
            ax.plot(c.discard, c.error, marker=".", lw=1.4, label=f"{name} (AUC {c.auc(limit):.4f})")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=0.0)
        ax.set_xlabel("Ratio of unconsidered pairs")
        ax.set_ylabel("FNMR")
        ax.set_title(title or f"ERC at FMR {next(iter(curves.values())).fmr:g}", fontsize=10)
        return _save(fig, ax, path)
    finally:
        plt.close(fig)


def plot_curves(curves: Mapping[str, Mapping[str, Any]], bench: str, model_label: str, out_dir: Path, *,
                pauc_limit: float, auc_limit: float, file_stem: str) -> list[str]:
    """One PNG per curve set of a benchmark (`edc*` sets as EDC plots, the others as ERC): the paths written."""
    plots = []
    for label, by_method in curves.items():
        png = out_dir / f"{file_stem}_{label}.png"
        title = f"{bench} - {label.replace('_', ' ')} - {model_label}"
        if label.startswith("edc"):
            plot_edc(by_method, png, limit=pauc_limit, title=title)
        else:
            plot_erc(by_method, png, limit=auc_limit, title=title)
        plots.append(str(png))
    return plots
