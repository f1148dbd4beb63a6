"""The `fiqa stats` reports: the bundled queries of data_manifest/sql/ run on the catalog, and their PNG plots."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from data_manifest import Workspace, catalog

QUERIES = ("status_summary", "factor_distribution", "factor_crosstab", "per_dataset", "per_run", "anchor_histogram")


def collect(ws: Workspace, names: tuple[str, ...] = QUERIES) -> dict[str, pa.Table]:
    """Run the bundled queries; name -> result table."""
    con = catalog.connect(ws)
    try:
        return {n: con.sql(catalog.bundled_sql(n)).to_arrow_table() for n in names}
    finally:
        con.close()


def plot(results: dict[str, pa.Table], out_dir: Path) -> list[Path]:
    """Bar charts of each factor's class distribution and the anchor histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    dist = results.get("factor_distribution")
    if dist is not None and dist.num_rows:
        rows = dist.to_pylist()
        factors = sorted({r["factor"] for r in rows})
        fig, axes = plt.subplots(1, len(factors), figsize=(3.2 * len(factors), 3.2), squeeze=False)
        for ax, f in zip(axes[0], factors, strict=True):
            sub = [r for r in rows if r["factor"] == f]
            ax.bar([r["class_name"].replace(" ", "\n") for r in sub], [r["n"] for r in sub], color="#4477aa")
            ax.set_title(f)
            ax.tick_params(axis="x", labelsize=7)
        axes[0][0].set_ylabel("samples")
        fig.tight_layout()
        p = out_dir / "factor_distribution.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    hist = results.get("anchor_histogram")
    if hist is not None and hist.num_rows:
        rows = hist.to_pylist()
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([r["bin_start"] + 0.05 for r in rows], [r["n"] for r in rows], width=0.09, color="#228833")
        ax.set_xlim(0, 1)
        ax.set_xlabel("quality anchor")
        ax.set_ylabel("samples")
        ax.set_title("anchor histogram")
        fig.tight_layout()
        p = out_dir / "anchor_histogram.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
