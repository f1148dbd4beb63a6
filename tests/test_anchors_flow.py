"""The `anchors` flow end to end: crop packs + samples + faces -> embeddings -> centers -> anchors, resumable."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_manifest import ShardWriter, catalog, crops, runs
from pipeline import anchors as A
from pipeline.synthetic.degrade import degrade
from tests.face_fixtures import aligned_identities

pytest.importorskip("dlib")


def _seed_workspace(ws) -> dict[str, int]:
    """4 identities x 3 crops (clean, blurred, occluded), one unknown identity, one sample without a face."""
    faces = aligned_identities()
    names = sorted(faces)[:4]
    pack, samples, rows, idents = [], [], [], {}
    for k, name in enumerate(names):
        for variant, img in (("clean", faces[name]), ("blur", degrade(faces[name], "blur", 3)),
                             ("occl", degrade(faces[name], "occlusion", 2))):
            sid = f"{name}-{variant}"
            idents[sid] = 100 + 10 * k  # sparse identity numbers: the flow maps them to center rows
            samples.append({"sample_id": sid, "identity": idents[sid]})
            rows.append({"sample_id": sid, "crop_index": len(pack)})
            pack.append(img)
    samples.append({"sample_id": "zz-unknown", "identity": -1})
    rows.append({"sample_id": "zz-unknown", "crop_index": len(pack)})
    pack.append(faces[sorted(faces)[4]])
    samples.append({"sample_id": "zz-noface", "identity": 100})
    rel = crops.write_pack(ws, "align-test", 0, np.stack(pack))
    ShardWriter(ws, "samples", "ingest-test").write(0, [
        {**s, "dataset": "shipped", "source_kind": "list", "source": f"/nowhere/{s['sample_id']}.png",
         "status": "ok"} for s in samples])
    face_rows = [{**r, "crop_file": rel, "status": "ok", "aligned_mode": "detect"} for r in rows]
    face_rows.append({"sample_id": "zz-noface", "status": "no_face", "error": "no face found by the detector"})
    ShardWriter(ws, "faces", "align-test").write(0, face_rows)
    return idents


def _latest(ws, table):
    return {r["sample_id"]: r for r in catalog.query(ws, f"SELECT * FROM {table}").to_pylist()}


def test_anchors_flow_matches_the_pure_api_and_resumes(workspace, prefect_harness, tmp_path):
    from flows import anchors as F

    idents = _seed_workspace(workspace)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # bad configuration: fails before any run
        F.anchors_flow(workspace=str(workspace.root), fr_model="insightface:/nonexistent/pack")
    assert not any(workspace.runs_dir.iterdir())
    out = F.anchors_flow(workspace=str(workspace.root), fr_model="dlib", shard_size=5, chunk_size=4,
                         center_block=3, device="cpu", progress=False)
    rid = out["run_id"]
    assert out["selected"] == 14 and out["shards"] == 3
    anchors = _latest(workspace, "anchors")
    emb = _latest(workspace, "embeddings")
    assert len(anchors) == 14 and len(emb) == 14
    assert anchors["zz-noface"]["status"] == "no_embedding" and "no face" in anchors["zz-noface"]["error"]
    assert emb["zz-noface"]["embedding"] is None and emb["zz-noface"]["status"] == "skipped"
    assert anchors["zz-unknown"]["status"] == "no_identity" and anchors["zz-unknown"]["anchor"] is None

    # The sharded, streamed flow gives exactly what the in-memory API gives on the same embeddings.
    sids = sorted(idents)
    x = np.array([emb[s]["embedding"] for s in sids], dtype=np.float32)
    uniq = sorted(set(idents.values()))
    want = A.compute_anchors(x, np.array([uniq.index(idents[s]) for s in sids]))
    got_anchor = np.array([anchors[s]["anchor"] for s in sids], dtype=np.float64)
    np.testing.assert_allclose(got_anchor, want.column("anchor").to_numpy(), atol=1e-5)
    np.testing.assert_allclose([anchors[s]["ccs"] for s in sids], want.column("ccs").to_numpy(), atol=1e-5)
    assert [anchors[s]["nearest_negative"] for s in sids] == [uniq[i] for i in want.column("nearest_negative")
                                                              .to_pylist()]
    # The clean crop of each identity outranks its blurred and occluded versions.
    for name in {s.rsplit("-", 1)[0] for s in sids}:
        a = {v: anchors[f"{name}-{v}"]["anchor"] for v in ("clean", "blur", "occl")}
        assert a["clean"] > min(a["blur"], a["occl"]), a

    # min/max and model id are recorded in every row and in the run.
    lo, hi = float(want.schema.metadata[b"norm_min"]), float(want.schema.metadata[b"norm_max"])
    row = anchors[sids[0]]
    assert row["norm_min"] == pytest.approx(lo) and row["norm_max"] == pytest.approx(hi)
    assert row["model_id"] == "dlib_resnet_v1:template" and row["center_source"] == "mean"
    info = runs.run_info(workspace, rid)
    assert info["metrics"]["norm_min"] == pytest.approx(lo) and info["metrics"]["model_id"] == row["model_id"]
    run_row = catalog.query(workspace, f"SELECT metrics FROM runs WHERE run_id = '{rid}'").to_pylist()[0]
    assert json.loads(run_row["metrics"])["norm_max"] == pytest.approx(hi)

    # Resume: drop one committed anchors shard (as if the run died), re-run the same run id.
    path = ShardWriter(workspace, "anchors", rid).path("00001")
    before = pq.read_table(path).select(["sample_id", "anchor"]).to_pylist()
    path.unlink()
    (workspace.runs_dir / rid / "shards" / "anchors-00001.json").unlink()
    embed_mtime = ShardWriter(workspace, "embeddings", rid).path("00000").stat().st_mtime_ns
    again = F.anchors_flow(workspace=str(workspace.root), fr_model="dlib", shard_size=5, chunk_size=4,
                           center_block=3, device="cpu", run_id=rid, progress=False)
    assert again["run_id"] == rid
    assert pq.read_table(path).select(["sample_id", "anchor"]).to_pylist() == before
    assert ShardWriter(workspace, "embeddings", rid).path("00000").stat().st_mtime_ns == embed_mtime
    with pytest.raises(ValueError, match="mix results"):
        F.anchors_flow(workspace=str(workspace.root), fr_model="dlib", shard_size=4, device="cpu", run_id=rid,
                       progress=False)
    assert runs.run_info(workspace, rid)["status"] == "completed"  # a refused resume does not touch the run

    # CLI with classifier-head centers: row k of the head is identity k.
    head = np.zeros((200, 128), dtype=np.float32)
    for s in sids:
        head[idents[s]] += x[sids.index(s)]
    np.save(tmp_path / "head.npy", head)
    rc = F.main(["--workspace", str(workspace.root), "--fr-model", "dlib", "--head", str(tmp_path / "head.npy"),
                 "--mode", "shifted", "--device", "cpu", "--where", "sample_id NOT LIKE 'zz-%'"])
    assert rc == 0
    latest = _latest(workspace, "anchors")
    assert latest[sids[0]]["center_source"] == "head" and latest[sids[0]]["status"] == "ok"
    np.testing.assert_allclose([latest[s]["ccs"] for s in sids], want.column("ccs").to_numpy(), atol=1e-5)


def _reingest_with_new_first_identity(ws) -> dict[str, int]:
    """A later ingest run as ImageFolder gives it: a new identity folder sorts first, shifting every label by one."""
    faces = aligned_identities()
    old = _latest(ws, "samples")
    idents = {sid: (-1 if r["identity"] < 0 else r["identity"] + 10) for sid, r in old.items()}
    new = {"t1_4-clean": faces["t1_4"], "t1_4-blur": degrade(faces["t1_4"], "blur", 3)}
    idents.update(dict.fromkeys(new, 100))
    ShardWriter(ws, "samples", "ingest-test2").write(0, [
        {"sample_id": sid, "identity": ident, "dataset": "shipped", "source_kind": "list",
         "source": f"/nowhere/{sid}.png", "status": "ok"} for sid, ident in idents.items()])
    rel = crops.write_pack(ws, "align-test2", 0, np.stack(list(new.values())))
    ShardWriter(ws, "faces", "align-test2").write(0, [
        {"sample_id": sid, "crop_index": i, "crop_file": rel, "status": "ok", "aligned_mode": "detect"}
        for i, sid in enumerate(new)])
    return idents


def test_reuse_embeddings_embeds_only_new_samples_and_follows_relabelled_identities(workspace, prefect_harness,
                                                                                     monkeypatch):
    from flows import anchors as F
    from flows import runners

    _seed_workspace(workspace)
    kw = {"workspace": str(workspace.root), "fr_model": "dlib", "shard_size": 5, "chunk_size": 4,
          "center_block": 3, "device": "cpu", "progress": False}
    first = F.anchors_flow(**kw)
    assert first["embeddings_reused"] == 0 and first["embeddings_computed"] == 13  # zz-noface has no crop
    idents = _reingest_with_new_first_identity(workspace)

    # Reuse: only the two new samples (and the faceless one, which has no ok embedding) are embedded.
    out = F.anchors_flow(**kw, reuse_embeddings=True)
    rid = out["run_id"]
    assert out["selected"] == 16 and out["embeddings_reused"] == 13 and out["embeddings_computed"] == 2
    assert runs.run_info(workspace, rid)["counts"]["embeddings_reused"] == 13
    written = catalog.query(workspace, f"SELECT sample_id FROM embeddings_history WHERE run_id = '{rid}'")
    assert sorted(written.column("sample_id").to_pylist()) == ["t1_4-blur", "t1_4-clean", "zz-noface"]
    emb = _latest(workspace, "embeddings")
    assert emb["astronaut_0-clean"]["identity"] == 100  # stored with the label of its embedding time ...
    anchors = _latest(workspace, "anchors")
    assert len(anchors) == 16 and anchors["astronaut_0-clean"]["identity"] == 110  # ... anchors use today's

    # Centers follow the current labels: the flow equals the pure API on the relabelled set.
    sids = sorted(s for s, i in idents.items() if i >= 0 and s != "zz-noface")
    x = np.array([emb[s]["embedding"] for s in sids], dtype=np.float32)
    uniq = sorted({idents[s] for s in sids})
    want = A.compute_anchors(x, np.array([uniq.index(idents[s]) for s in sids]))
    np.testing.assert_allclose([anchors[s]["anchor"] for s in sids], want.column("anchor").to_numpy(), atol=1e-5)
    assert [anchors[s]["nearest_negative"] for s in sids] == [uniq[i] for i in want.column("nearest_negative")
                                                              .to_pylist()]

    # A full recompute (CLI, no reuse; --address reaches the task runner) gives the same anchors.
    seen = []
    real = runners.make_task_runner
    monkeypatch.setattr(runners, "make_task_runner", lambda *a: seen.append(a) or real("threads", 1))
    assert F.main(["--workspace", str(workspace.root), "--fr-model", "dlib", "--shard-size", "5", "--chunk-size",
                   "4", "--center-block", "3", "--device", "cpu", "--runner", "dask",
                   "--address", "tcp://127.0.0.1:8786"]) == 0
    assert seen == [("dask", 1, "tcp://127.0.0.1:8786")]
    full = _latest(workspace, "anchors")
    assert full["astronaut_0-clean"]["run_id"] != rid
    for s in idents:
        a, b = anchors[s], full[s]
        assert (a["status"], a["identity"], a["nearest_negative"]) == (b["status"], b["identity"],
                                                                      b["nearest_negative"]), s
        assert (a["anchor"] is None) == (b["anchor"] is None), s
        if a["anchor"] is not None:
            assert a["anchor"] == pytest.approx(b["anchor"], abs=1e-6), s
    with pytest.raises(ValueError, match="mix results"):
        F.anchors_flow(**kw, run_id=rid)  # a reuse run cannot be resumed without reuse


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
