"""The demo's EDC inputs: comparisons of its embedded faces and the quality files of the methods compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_manifest import Workspace, catalog
from pipeline.synthetic.demo_data import DATASET


def comparisons(ws: Workspace, model_id: str, out: Path) -> Path:
    """All pairs of the demo's embedded faces (mated when the identities match), with cosine similarity."""
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
