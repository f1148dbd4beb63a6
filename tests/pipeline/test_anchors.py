"""Quality anchors: hand-computed geometry, streaming centers, head centers, bounded memory, real faces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import anchors as A

ROOT = Path(__file__).resolve().parents[2]


def _col(tbl, name):
    return np.array([np.nan if v is None else v for v in tbl.column(name).to_pylist()], dtype=np.float64)


def test_known_geometry_matches_hand_values():
    # Centers are the three axes; every embedding is a unit vector whose cosines we know exactly.
    centers = np.eye(3, dtype=np.float32)
    s30, c30 = 0.5, np.sqrt(3) / 2
    emb = np.array([
        [c30, s30, 0.0],      # label 0: ccs cos30, nn = C1 at sin30
        [0.6, 0.8, 0.0],      # label 1: ccs 0.8, nn = C0 at 0.6
        [0.48, 0.6, 0.64],    # label 2: ccs 0.64, nn = C1 at 0.6
        [0.28, 0.0, 0.96],    # label 0: ccs 0.28, nn = C2 at 0.96
        [0.0, 0.0, -1.0],     # label 1: nnccs = 0 <= floor -> clamped
        [1.0, 0.0, 0.0],      # unknown identity
    ], dtype=np.float32)
    labels = np.array([0, 1, 2, 0, 1, -1])
    t = A.compute_anchors(emb, labels, centers, chunk_size=2, center_block=2)

    raw = np.array([c30 / s30, 0.8 / 0.6, 0.64 / 0.6, 0.28 / 0.96, 0.0 / A.DEFAULT_NNCCS_FLOOR])
    lo, hi = raw[3], raw[0]
    np.testing.assert_allclose(_col(t, "ccs")[:5], [c30, 0.8, 0.64, 0.28, 0.0], atol=1e-6)
    np.testing.assert_allclose(_col(t, "nnccs")[:5], [s30, 0.6, 0.6, 0.96, 0.0], atol=1e-6)
    assert t.column("nearest_negative").to_pylist() == [1, 0, 1, 2, 0, None]
    np.testing.assert_allclose(_col(t, "raw")[:5], raw, rtol=1e-5, atol=1e-6)
    expected = np.clip((raw - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(_col(t, "anchor")[:5], expected, atol=1e-5)
    np.testing.assert_allclose(_col(t, "anchor")[:4], [1.0, 0.72318, 0.53808, 0.0], atol=1e-4)
    assert t.column("status").to_pylist() == ["ok"] * 4 + ["clamped", "no_identity"]
    assert t.column("anchor").to_pylist()[5] is None
    meta = t.schema.metadata
    assert float(meta[b"norm_min"]) == pytest.approx(lo, rel=1e-6)
    assert float(meta[b"norm_max"]) == pytest.approx(hi, rel=1e-6)
    assert meta[b"center_source"] == b"head"

    shifted = A.compute_anchors(emb, labels, centers, mode="shifted")
    np.testing.assert_allclose(_col(shifted, "raw")[:5], [c30 / 1.5, 0.8 / 1.6, 0.64 / 1.6, 0.28 / 1.96, 0.0],
                               rtol=1e-5, atol=1e-7)
    assert shifted.column("status").to_pylist()[4] == "ok"

    # A recorded range is reused as given (relabelling a subset on the same scale).
    again = A.compute_anchors(emb[:3], labels[:3], centers, norm_range=(lo, hi))
    np.testing.assert_allclose(_col(again, "anchor"), expected[:3], atol=1e-5)


def _reference(emb, labels):
    """Naive per-sample loop over mean centers, written independently of the library."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ids = sorted(set(labels.tolist()))
    cen = {k: e[labels == k].mean(0) / np.linalg.norm(e[labels == k].mean(0)) for k in ids}
    out = []
    for x, y in zip(e, labels, strict=True):
        sims = {k: float(x @ c) for k, c in cen.items()}
        neg = max((k for k in ids if k != y), key=lambda k: sims[k])
        out.append((sims[y], sims[neg], neg))
    return out


def test_mean_centers_match_naive_loop_and_singletons_are_flagged():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 16))
    labels = np.repeat(np.arange(6), [5, 4, 6, 3, 5, 1])
    emb = (base[labels] + 0.7 * rng.normal(size=(len(labels), 16))).astype(np.float32)
    t = A.compute_anchors(emb, labels, chunk_size=5, center_block=4)
    ref = _reference(emb, labels)
    np.testing.assert_allclose(_col(t, "ccs"), [r[0] for r in ref], atol=1e-5)
    np.testing.assert_allclose(_col(t, "nnccs"), [r[1] for r in ref], atol=1e-5)
    assert t.column("nearest_negative").to_pylist() == [r[2] for r in ref]
    status = t.column("status").to_pylist()
    assert status[-1] == "single_sample" and _col(t, "ccs")[-1] == pytest.approx(1.0, abs=1e-6)
    assert t.column("anchor").to_pylist()[-1] is None
    sparse = A.compute_anchors(emb, labels * 1000 + 7)  # label values need not be dense
    np.testing.assert_allclose(_col(sparse, "anchor"), _col(t, "anchor"), atol=1e-6, equal_nan=True)
    assert sparse.column("nearest_negative").to_pylist() == [r[2] * 1000 + 7 for r in ref]
    ok = np.array(status) == "ok"
    raw = _col(t, "raw")
    lo, hi = raw[ok].min(), raw[ok].max()
    np.testing.assert_allclose(_col(t, "anchor")[ok], (raw[ok] - lo) / (hi - lo), atol=1e-6)


def test_tiling_does_not_change_results_and_bad_rows_keep_a_status():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(257, 24)).astype(np.float32)
    labels = rng.integers(0, 40, size=257)
    emb[3] = np.nan
    emb[4] = 0.0
    big = A.compute_anchors(emb, labels)
    small = A.compute_anchors(emb, labels, chunk_size=7, center_block=3)
    for c in ("ccs", "nnccs", "raw", "anchor"):
        np.testing.assert_allclose(_col(big, c), _col(small, c), atol=1e-5, equal_nan=True)
    assert big.column("nearest_negative").to_pylist() == small.column("nearest_negative").to_pylist()
    assert big.column("status").to_pylist()[3:5] == ["invalid_embedding"] * 2
    assert big.num_rows == 257

    one_class = A.compute_anchors(emb[:5], np.zeros(5, dtype=int))
    assert set(one_class.column("status").to_pylist()) <= {"no_negative", "invalid_embedding"}


def test_center_accumulator_streams_merges_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(300, 8))
    labels = rng.integers(0, 20, size=300)
    labels[:10] = -1
    full = A.CenterAccumulator(8)
    full.update(emb, labels)
    a, b = A.CenterAccumulator(8), A.CenterAccumulator(8, 3)
    for s in range(0, 150, 37):
        a.update(emb[s:min(s + 37, 150)], labels[s:min(s + 37, 150)])
    b.update(emb[150:], labels[150:])
    a.merge(b)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    want = np.stack([e[labels == k].mean(0) for k in range(20)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(a.centers()[:20], want, atol=1e-6)
    np.testing.assert_allclose(full.centers(), a.centers()[: full.num_classes], atol=1e-6)
    assert a.counts[:20].tolist() == np.bincount(labels[labels >= 0], minlength=20).tolist()
    a.save(tmp_path / "acc.npz")
    back = A.CenterAccumulator.load(tmp_path / "acc.npz")
    np.testing.assert_array_equal(back.sums, a.sums)
    with pytest.raises(ValueError, match="dim 8"):
        a.update(np.zeros((2, 5)), [0, 1])


def test_centers_from_head_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    w = rng.normal(size=(7, 16)).astype(np.float32)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    torch.save({"kernel": torch.from_numpy(w.T.copy())}, tmp_path / "crfiqa_header.pth")  # CR-FIQA: (D, C)
    torch.save({"module.weight": torch.from_numpy(w)}, tmp_path / "arcface_fc.pt")  # arcface_torch: (C, D)
    np.save(tmp_path / "w.npy", w)
    for name in ("crfiqa_header.pth", "arcface_fc.pt", "w.npy"):
        np.testing.assert_allclose(A.centers_from_head(tmp_path / name, dim=16), unit, atol=1e-6)
    with pytest.raises(ValueError, match="neither axis"):
        A.centers_from_head(tmp_path / "w.npy", dim=5)
    with pytest.raises(FileNotFoundError):
        A.centers_from_head(tmp_path / "missing.pth", dim=16)


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from pipeline.anchors import NearestNegativeSearch
    n, dim, n_centers, chunk = int(sys.argv[1]), 128, 2000, 1024
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(n_centers, dim)).astype(np.float32)
    search = NearestNegativeSearch(centers, chunk_size=chunk, center_block=1024)
    def shard(i):
        g = np.random.default_rng(i)
        return g.normal(size=(chunk, dim)).astype(np.float32), g.integers(0, n_centers, chunk)
    search.search(*shard(10**6))  # warm-up: allocator and BLAS buffers
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nn = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        e, y = shard(s)
        nn[s:s + chunk] = search.search(e, y)[2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "base_kib": base, "peak_kib": peak, "growth_kib": peak - base}))
""")


def _peak_rss(n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_nearest_negative_peak_rss_is_flat_when_samples_grow_5x():
    small, large = _peak_rss(10 * 1024), _peak_rss(50 * 1024)
    print("peak RSS (KiB):", small, large)
    # The only per-sample state is the 8-byte result per row (0.3 MiB more for 40k rows); the tiles are reused.
    assert large["peak_kib"] - small["peak_kib"] < 16 * 1024, (small, large)
    assert large["growth_kib"] < small["growth_kib"] + 16 * 1024, (small, large)


# ----------------------------------------------------------------- real faces + dlib


@pytest.mark.slow
def test_dlib_anchor_falls_as_degradation_grows(aligned_identities):
    from scipy.stats import spearmanr

    from models.recognition import DlibRecognizer
    from pipeline.synthetic.degrade import degrade

    faces = aligned_identities()
    assert len(faces) >= 7, sorted(faces)
    crops, labels, severity = [], [], []
    for k, (_, face) in enumerate(sorted(faces.items())):
        # Two clean images per identity (the face and its mirror), then 3 levels of each degradation.
        for img in (face, face[:, ::-1]):
            crops.append(np.ascontiguousarray(img))
            labels.append(k)
            severity.append(0)
        for kind in ("blur", "downscale", "noise", "occlusion"):
            for level in (1, 2, 3):
                crops.append(degrade(face, kind, level))
                labels.append(k)
                severity.append(level)
    emb = DlibRecognizer().embed(np.stack(crops))
    labels, severity = np.array(labels), np.array(severity)
    t = A.compute_anchors(emb, labels)
    anchor = _col(t, "anchor")
    assert set(t.column("status").to_pylist()) == {"ok"}
    rho = spearmanr(severity, anchor).statistic
    within = np.mean([spearmanr(severity[labels == k], anchor[labels == k]).statistic for k in range(len(faces))])
    shifted = _col(A.compute_anchors(emb, labels, mode="shifted"), "anchor")
    rho_shifted = spearmanr(severity, shifted).statistic
    means = [round(float(anchor[severity == s].mean()), 3) for s in range(4)]
    print(f"dlib anchors, {len(anchor)} samples of {len(faces)} identities: Spearman(severity, anchor) = "
          f"{rho:.3f} (ratio), {rho_shifted:.3f} (shifted); mean within identity {within:.3f}; "
          f"mean anchor by level 0..3: {means}")
    assert rho < -0.5
    assert rho_shifted < -0.5
    assert within < -0.5
    assert means[0] > means[1] > means[2] > means[3]


def _clustered(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """24 embeddings of 4 sparse identities (plus one unknown) around random centers in 8-D."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.array([5, 9, 40, 41]), 6)
    ids[0] = -1
    base = rng.normal(size=(4, 8))
    emb = base[np.searchsorted([5, 9, 40, 41], np.where(ids < 0, 5, ids))] + 0.6 * rng.normal(size=(24, 8))
    return emb.astype(np.float32), ids


def test_streaming_anchors_over_shards_equal_compute_anchors_on_the_whole_set():
    emb, ids = _clustered()
    want = A.compute_anchors(emb, ids)
    steps = A.StreamingAnchors(8, identities=ids)
    cuts = [slice(0, 7), slice(7, 15), slice(15, 24)]
    for s in cuts:
        steps.add(emb[s], ids[s])
    stats = [steps.search(emb[s], ids[s]) for s in cuts]
    for st in stats:
        steps.observe(st.raw, st.status)
    lo, hi = steps.norm_range()
    assert (lo, hi) == (float(want.schema.metadata[b"norm_min"]), float(want.schema.metadata[b"norm_max"]))
    got = np.concatenate([A.anchor_values(st.raw, st.status, lo, hi) for st in stats])
    np.testing.assert_allclose(got, want.column("anchor").to_numpy(zero_copy_only=False), atol=1e-12)
    assert np.concatenate([st.status for st in stats]).tolist() == want.column("status").to_pylist()
    nn = np.concatenate([st.nearest_negative for st in stats])
    assert [None if v < 0 else int(v) for v in nn] == want.column("nearest_negative").to_pylist()
    assert set(nn[nn >= 0].tolist()) <= {5, 9, 40, 41} and steps.num_centers == 4
    with pytest.raises(RuntimeError, match="final"):
        steps.add(emb[:2], ids[:2])


def test_streaming_anchors_keep_rows_without_embedding_out_of_centers_and_range():
    emb, ids = _clustered(5)
    ok = np.ones(len(ids), dtype=bool)
    ok[3] = False  # e.g. no aligned crop: a NaN row in the embeddings shard
    emb_nan = emb.copy()
    emb_nan[3] = np.nan
    steps = A.StreamingAnchors(8, identities=ids)
    steps.add(emb_nan, ids, ok)
    stats = steps.search(emb_nan, ids, ok)
    steps.observe(stats.raw, stats.status)
    keep = np.flatnonzero(ok)
    want = A.compute_anchors(emb[keep], ids[keep])
    assert stats.status[3] == A.NO_EMBEDDING and np.isnan(stats.raw[3])
    np.testing.assert_allclose(stats.raw[keep], want.column("raw").to_numpy(zero_copy_only=False), atol=1e-6)
    table = A.stats_table(pa.array([f"s{i}" for i in range(len(ids))]), ids, stats,
                          ["no crop" if i == 3 else None for i in range(len(ids))])
    rows = A.anchor_rows(table, *steps.norm_range(), "m", steps.source)
    assert rows[3]["status"] == "no_embedding" and rows[3]["error"] == "no crop" and rows[3]["anchor"] is None
    assert rows[0]["identity"] is None and rows[1]["identity"] == 5 and rows[1]["center_source"] == A.CENTER_MEAN
    anchors = [r["anchor"] for r in rows if r["status"] == A.OK]
    assert min(anchors) == 0.0 and max(anchors) == 1.0


def test_streaming_anchors_with_head_centers_flag_identities_beyond_the_head():
    emb, _ = _clustered(7)
    head = A.l2_normalize(np.eye(3, 8, dtype=np.float32))
    labels = np.array([0, 1, 2, 3] * 6)
    steps = A.StreamingAnchors(8, head=head)
    stats = steps.search(emb, labels)
    assert (stats.status[labels == 3] == A.NO_CENTER).all() and steps.source == A.CENTER_HEAD
    want = A.compute_anchors(emb[labels < 3], labels[labels < 3], head)
    np.testing.assert_allclose(stats.raw[labels < 3], want.column("raw").to_numpy(zero_copy_only=False), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        A.StreamingAnchors(8)
