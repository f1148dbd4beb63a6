"""benchmarks/anchors.py: its synthetic workspace through the `anchors` flow equals the float64 computation."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_manifest import catalog
from pipeline import anchors as A


def test_streamed_flow_equals_the_in_memory_computation(workspace, prefect_harness, monkeypatch):
    """Shard-by-shard selection, centers, search and range give what one in-memory pass over the set gives.

    Both are float32 computations whose dot products are summed in different orders (chunks of 50 and center
    blocks of 3 here, the defaults there; thread count and SIMD kernels vary by machine), and raw = ccs / nnccs
    multiplies their rounding by 1 / nnccs + ccs / nnccs**2 (up to 339 here, rows just above the 0.05 floor):
    a fixed tolerance between the two failed elsewhere (raw 5.2e-6 apart; 1.0e-6 here). So each is compared
    with a float64 computation from the same float32 unit vectors, within the float32 error bound of each row
    (`_float32_bounds`; measured here: at most 9% of it for ccs and nnccs, 4% for raw, with 1 and 2 threads
    and ATEN_CPU_CAPABILITY=default alike), and the discrete results (status, nearest negative) exactly.
    """
    from types import SimpleNamespace

    from benchmarks.anchors import FLOW_RUN, synthetic_embeddings, synthetic_samples
    from data_manifest.selection import freeze_selection
    from flows import anchors as F
    from pipeline import anchors_embed

    n, identities, dim, shard = 300, 7, 16, 64
    synthetic_samples(str(workspace.root), n, identities)
    path = freeze_selection(workspace, FLOW_RUN, F.selection_sql(), shard, required=F.REQUIRED)
    meta = pq.read_metadata(path)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [64, 64, 64, 64, 44]
    assert synthetic_embeddings(str(workspace.root), dim, identities, shard) == n
    monkeypatch.setattr(anchors_embed, "recognizer",
                        lambda *a, **k: SimpleNamespace(model_id="synthetic", embedding_dim=dim))
    out = F.anchors_flow(workspace=str(workspace.root), run_id=FLOW_RUN, shard_size=shard, chunk_size=50,
                         center_block=3, device="cpu", fr_model="synthetic", progress=False)
    assert out["selected"] == n and out["shards"] == 5 and out["embeddings_computed"] == n

    emb = catalog.query(workspace, "SELECT sample_id, identity, embedding FROM embeddings ORDER BY sample_id")
    x = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    labels = emb.column("identity").to_numpy()
    want = A.compute_anchors(x, labels)  # identities 0..6 are their own center rows
    got = catalog.query(workspace, "SELECT * FROM anchors ORDER BY sample_id")
    assert got.column("sample_id").to_pylist() == emb.column("sample_id").to_pylist()
    ref = _float64_anchors(x, labels)
    assert got.column("status").to_pylist() == want.column("status").to_pylist() == \
        np.where(ref["clamped"], "clamped", "ok").tolist()
    assert got.column("nearest_negative").to_pylist() == want.column("nearest_negative").to_pylist()
    assert want.column("nearest_negative").to_pylist() == ref["nearest_negative"].tolist()
    bound = _float32_bounds(ref, dim)
    for col in ("ccs", "nnccs", "raw", "anchor"):
        for table in (got, want):  # the streamed flow and the in-memory pass, each against float64
            diff = np.abs(table.column(col).to_numpy() - ref[col])
            assert (diff <= bound[col]).all(), (col, float(diff.max()), float((diff / bound[col]).max()))
    for key, value in (("norm_min", ref["lo"]), ("norm_max", ref["hi"])):
        assert got.column(key)[0].as_py() == pytest.approx(float(want.schema.metadata[key.encode()]), abs=1e-9)
        assert abs(got.column(key)[0].as_py() - value) <= bound["range"]
    assert min(got.column("anchor").to_pylist()) == 0.0 and max(got.column("anchor").to_pylist()) == 1.0


def _float64_anchors(x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray | float]:
    """ccs, nnccs, nearest negative, raw and anchor in float64 from the same float32 unit vectors the pipeline
    compares (embeddings and centers normalised by `A.l2_normalize`, as `NearestNegativeSearch` does)."""
    acc = A.CenterAccumulator(x.shape[1])
    acc.update(x, labels)
    e = A.l2_normalize(x).astype(np.float64)
    c = A.l2_normalize(acc.centers()).astype(np.float64)
    sim = e @ c.T
    rows = np.arange(len(x))
    ccs = sim[rows, labels].copy()
    sim[rows, labels] = -np.inf
    nn = sim.argmax(axis=1)
    nnccs = sim[rows, nn]
    clamped = nnccs <= A.DEFAULT_NNCCS_FLOOR
    den = np.where(clamped, A.DEFAULT_NNCCS_FLOOR, nnccs)
    raw = ccs / den
    lo, hi = float(raw[~clamped].min()), float(raw[~clamped].max())  # the range comes from the unclamped rows
    return {"ccs": ccs, "nnccs": nnccs, "nearest_negative": nn, "raw": raw, "den": den, "clamped": clamped,
            "anchor": np.clip((raw - lo) / (hi - lo), 0.0, 1.0), "lo": lo, "hi": hi}


def _float32_bounds(ref: dict[str, np.ndarray | float], dim: int) -> dict[str, np.ndarray | float]:
    """How far a float32 computation may be from the float64 one, per row.

    A cosine of two float32 unit vectors accumulated in float32 over `dim` terms is within
    gamma_dim = dim * u / (1 - dim * u) of the exact value (u = 2**-24; Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1), whatever the order of the sums (threads, SIMD width, blocking); one more u
    for a center the streamed sums may round to the neighbouring float32 component. The ratio and the min-max
    normalisation carry that through (first order, doubled for the second-order terms).
    """
    u = float(np.finfo(np.float32).eps) / 2
    cos = dim * u / (1 - dim * u) + u
    ccs, den = np.abs(ref["ccs"]), ref["den"]
    raw_b = 2 * cos * (1 / den + ccs / den**2)
    span = ref["hi"] - ref["lo"]
    range_b = float(raw_b[~ref["clamped"]].max())  # lo and hi are a min and a max over the unclamped rows
    anchor_b = 2 * (raw_b + range_b * (1 + 2 * np.abs(ref["anchor"]))) / span
    return {"ccs": np.full(len(ccs), cos), "nnccs": np.full(len(ccs), cos), "raw": raw_b, "anchor": anchor_b,
            "range": range_b}
