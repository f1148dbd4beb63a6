"""The `anchors` flow end to end: crop packs + samples + faces -> embeddings -> centers -> anchors, resumable."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_manifest import ShardWriter, catalog, crops, runs
from pipeline import anchors as A
from pipeline.synthetic.degrade import degrade

pytest.importorskip("dlib")


def _seed_workspace(ws, aligned_identities) -> dict[str, int]:
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


@pytest.mark.slow
def test_anchors_flow_matches_the_pure_api_and_resumes(workspace, prefect_harness, tmp_path, aligned_identities):
    from flows import anchors as F

    idents = _seed_workspace(workspace, aligned_identities)
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


def _reingest_with_new_first_identity(ws, aligned_identities) -> dict[str, int]:
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


@pytest.mark.slow
def test_reuse_embeddings_embeds_only_new_samples_and_follows_relabelled_identities(workspace, prefect_harness,
                                                                                     monkeypatch, aligned_identities):
    from flows import anchors as F
    from flows import runners

    _seed_workspace(workspace, aligned_identities)
    kw = {"workspace": str(workspace.root), "fr_model": "dlib", "shard_size": 5, "chunk_size": 4,
          "center_block": 3, "device": "cpu", "progress": False}
    first = F.anchors_flow(**kw)
    assert first["embeddings_reused"] == 0 and first["embeddings_computed"] == 13  # zz-noface has no crop
    idents = _reingest_with_new_first_identity(workspace, aligned_identities)

    # Reuse: only the two new samples are embedded; the faceless one keeps its `skipped` row (no face change).
    out = F.anchors_flow(**kw, reuse_embeddings=True)
    rid = out["run_id"]
    assert out["selected"] == 16 and out["embeddings_reused"] == 13 and out["embeddings_computed"] == 2
    assert runs.run_info(workspace, rid)["counts"]["embeddings_reused"] == 13
    written = catalog.query(workspace, f"SELECT sample_id FROM embeddings_history WHERE run_id = '{rid}'")
    assert sorted(written.column("sample_id").to_pylist()) == ["t1_4-blur", "t1_4-clean"]
    noface = catalog.query(workspace, "SELECT run_id, status FROM embeddings_history WHERE sample_id = 'zz-noface'")
    assert noface.to_pylist() == [{"run_id": first["run_id"], "status": "skipped"}]  # exactly once
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
