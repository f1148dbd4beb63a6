"""The `evaluate` flow end to end on a generated benchmark: real shipped faces, graded degradations, dlib."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.evaluation.formats import PairList, QualityScores, write_pair_list, write_quality_file

# Probe variants and the oracle quality that orders them by how much they hurt recognition.
PROBES = [("blur", 2, 0.8), ("noise", 3, 0.6), ("downscale", 2, 0.5), ("downscale", 3, 0.3), ("occlusion", 3, 0.1)]
N_IDENTITIES = 6


@pytest.fixture(scope="module")
def generated(tmp_path_factory, aligned_identities):
    """Gallery-probe pairs (clean reference vs degraded probe) as aligned PNG crops, plus three quality files."""
    from pipeline.synthetic.degrade import degrade

    root = tmp_path_factory.mktemp("bench")
    faces = dict(sorted(aligned_identities().items())[:N_IDENTITIES])
    assert len(faces) == N_IDENTITIES, sorted(faces)
    keys, ident, oracle, crops = [], [], [], []
    for name, face in faces.items():
        (root / "images" / name).mkdir(parents=True)
        for kind, level, q in [("clean", 0, 1.0), *PROBES]:
            img = face if kind == "clean" else degrade(face, kind, level)
            key = f"{name}/{kind}_{level}"
            cv2.imwrite(str(root / "images" / f"{key}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            keys.append(key)
            ident.append(name)
            oracle.append(q)
            crops.append(img)
    (root / "images" / "broken").mkdir()
    (root / "images" / "broken" / "bad.png").write_text("not an image")
    clean = [i for i, k in enumerate(keys) if k.endswith("/clean_0")]
    a, b, mated = [], [], []
    for c in clean:
        for j in range(len(keys)):
            if j != c and not (j in clean and j < c):
                a.append(keys[c])
                b.append(keys[j])
                mated.append(ident[c] == ident[j])
    a.append(keys[clean[0]])
    b.append("broken/bad")
    mated.append(True)  # an unreadable sample: the pair is excluded and counted, not lost silently
    write_pair_list(root / "pairs.txt", PairList(a=a, b=b, mated=np.array(mated)))
    q = np.array(oracle)
    sharp = np.array([cv2.Laplacian(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for c in crops])
    write_quality_file(root / "oracle.csv", QualityScores("oracle", keys, q))
    # the probes in the opposite order; references stay on top so the pair quality is the probe's
    write_quality_file(root / "reversed.parquet", QualityScores("reversed", keys, np.where(q == 1.0, 1.0, 1.0 - q)))
    (root / "sharpness.txt").write_text("".join(f"images/{k}.png {v:.6f}\n" for k, v in zip(keys, sharp, strict=True)))
    return {"root": root, "keys": keys, "crops": crops, "ident": ident, "oracle": q, "n_pairs": len(a),
            "n_mated": sum(mated)}


@pytest.mark.slow
def test_evaluate_flow_end_to_end(generated, workspace, prefect_harness):
    from flows.evaluate import evaluate

    root = generated["root"]
    result = evaluate(
        benchmarks=[f"gen={root / 'pairs.txt'}"],
        qualities=[str(root / "oracle.csv"), str(root / "reversed.parquet"), f"laplacian={root / 'sharpness.txt'}"],
        workspace=str(workspace.root), fr_model="dlib", fmrs=[1e-2], starting_errors=[0.2],
        images_root=str(root / "images"), batch_size=16,
    )
    out = Path(result["output"])
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"oracle", "reversed", "laplacian"}
    assert {(r["protocol"], r["fmr"], r["starting_error_target"]) for r in rows} == {
        ("edc", 1e-2, None), ("edc", None, 0.2), ("erc", 1e-2, None)}
    first = rows[0]
    assert first["excluded_pairs"] == 1 and first["mated_pairs"] + first["nonmated_pairs"] == generated["n_pairs"] - 1
    assert result["counts"]["failed_samples"] == 1
    by = {(r["method"], r["protocol"], r["fmr"]): r for r in rows}
    edc_oracle, edc_rev = by[("oracle", "edc", 1e-2)], by[("reversed", "edc", 1e-2)]
    print({k: (round(v["pauc"], 4), round(v["starting_error"], 4)) for k, v in by.items()})
    # The threshold comes from the impostors alone, so every method starts at the same FNMR.
    assert edc_oracle["threshold"] == edc_rev["threshold"] and edc_oracle["starting_error"] > 0
    assert edc_oracle["pauc"] < edc_rev["pauc"]
    assert edc_oracle["pauc_normalized"] < 1.0 < edc_rev["pauc_normalized"]
    assert by[("oracle", "erc", 1e-2)]["auc"] < by[("reversed", "erc", 1e-2)]["auc"]
    md = (out / "results.md").read_text()
    assert "## gen" in md and "| oracle | edc |" in md
    pngs = [Path(p) for p in result["plots"]]
    assert len(pngs) == 3 and all(p.stat().st_size > 10_000 for p in pngs)
    assert cv2.imread(str(pngs[0])).shape[2] == 3
    curves = pq.read_table(out / "curves.parquet")
    assert curves.num_rows > 3 * 3
    # Embeddings went to the manifest (failed sample included, with its reason) and are reused.
    from data_manifest import catalog

    emb = catalog.query(workspace, "SELECT status, count(*) AS n FROM embeddings GROUP BY status ORDER BY status")
    assert dict(zip(*emb.to_pydict().values(), strict=True)) == {"error": 1, "ok": len(generated["keys"])}
    again = evaluate(benchmarks=[f"gen={root / 'pairs.txt'}"], qualities=[str(root / "oracle.csv")],
                     workspace=str(workspace.root), fmrs=[1e-2], images_root=str(root / "images"),
                     protocols=["edc"])
    same = [r for r in again["rows"] if r["protocol"] == "edc"][0]
    assert same["pauc"] == pytest.approx(edc_oracle["pauc"]) and same["threshold"] == edc_oracle["threshold"]


def test_bin_benchmark_and_unsafe_pickle(generated, workspace, prefect_harness, tmp_path):
    from flows.evaluate import evaluate
    from pipeline.evaluation.verification_sets import load_benchmark

    crops, ids = generated["crops"], generated["ident"]
    per = 1 + len(PROBES)
    # 4 pairs: 2 mated (clean vs blurred probe), 2 non-mated (clean vs the next identity's clean).
    order: list[int] = []
    issame: list[bool] = []
    for n in range(2):
        order += [n * per, n * per + 1]
        issame.append(True)
    for n in range(2):
        order += [n * per, (n + 1) * per]
        issame.append(False)
    assert all((ids[order[2 * k]] == ids[order[2 * k + 1]]) == s for k, s in enumerate(issame))
    bins = [cv2.imencode(".png", cv2.cvtColor(crops[i], cv2.COLOR_RGB2BGR))[1].tobytes() for i in order]
    path = tmp_path / "gen.bin"
    with open(path, "wb") as fh:
        pickle.dump((bins, np.array(issame)), fh, protocol=4)
    bench = load_benchmark(str(path))
    assert bench.kind == "bin" and len(bench.pairs) == 4 and bench.pairs.mated.tolist() == issame
    assert bench.images[3] == bins[3]
    qfile = tmp_path / "q.csv"
    qfile.write_text("sample_key,quality\n" + "".join(f"images/{i}.jpg,{i % 3}\n" for i in range(8)))
    result = evaluate(benchmarks=[str(path)], qualities=[str(qfile)], workspace=str(workspace.root),
                      fmrs=[0.2], protocols=["edc"], batch_size=8)
    (row,) = result["rows"]
    assert row["benchmark"] == "gen" and row["mated_pairs"] == 2 and row["nonmated_pairs"] == 2
    assert row["missing_quality_pairs"] == 0 and row["excluded_pairs"] == 0

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as fh:
        pickle.dump(([b"x", b"y"], Evil()), fh)
    with pytest.raises(ValueError, match="refused"):
        load_benchmark(str(evil))


@pytest.mark.slow
def test_cli_on_edc_json(workspace, prefect_harness, capsys):
    """`fiqa evaluate` on the EDC example JSON: qualities come with the file, starting-error mode."""
    from flows.cli import main

    example = Path(__file__).resolve().parents[1] / "data" / "edc" / "example_data.json"
    rc = main(["evaluate", "--benchmark", str(example), "--starting-error", "0.05", "--protocol", "edc",
               "--pauc-limit", "0.2", "--workspace", str(workspace.root)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "results.parquet" in out
    rows = pq.read_table(next(workspace.reports.glob("evaluate/*/results.parquet"))).to_pylist()
    got = {r["method"]: r["pauc"] for r in rows}
    assert got["QA algorithm 1"] == pytest.approx(0.006959681644975037, rel=1e-9)
    assert len(got) == 5 and all(r["fr_model"] == "given" for r in rows)
    assert main(["evaluate", "--benchmark", str(example), "--workspace", str(workspace.root)]) == 2


def test_quality_ours_from_a_checkpoint_with_precomputed_embeddings(generated, workspace, prefect_harness, tmp_path):
    """`--quality ours`: a (tiny, untrained) CLIB-FIQA checkpoint scores the benchmark crops next to a file method."""
    import pyarrow as pa
    import torch

    from data_manifest.vocabulary import prompts
    from flows.evaluate import evaluate
    from models.clib import ClibConfig, ClibFiqa
    from models.scorer import load
    from models.train import CHECKPOINT_FORMAT

    torch.manual_seed(0)
    cfg = ClibConfig(model_name="TinyRN-test", pretrained=None)
    model = ClibFiqa.from_config(cfg, load_pretrained=False)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": cfg.to_dict(), "prompts": prompts(),
                "model": model.state_for_checkpoint()}, ckpt)
    # Synthetic embeddings: identity direction plus noise growing as the oracle quality falls.
    rng = np.random.default_rng(0)
    keys, ident, oracle = generated["keys"], generated["ident"], generated["oracle"]
    centre = {n: rng.normal(size=64) for n in dict.fromkeys(ident)}
    emb = np.stack([centre[n] + rng.normal(size=64) * 5.0 * (1 - q) for n, q in zip(ident, oracle, strict=True)])
    emb_file = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"sample_key": keys, "embedding": emb.astype(np.float32).tolist()}), emb_file)
    root = generated["root"]
    result = evaluate(benchmarks=[f"gen={root / 'pairs.txt'}"], qualities=["ours", str(root / "oracle.csv")],
                      checkpoint=str(ckpt), embeddings=str(emb_file), workspace=str(workspace.root),
                      fmrs=[1e-2], protocols=["edc"], images_root=str(root / "images"), device="cpu")
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"CLIB-FIQA (ours)", "oracle"}
    assert rows["oracle"]["threshold"] == rows["CLIB-FIQA (ours)"]["threshold"]
    assert rows["oracle"]["pauc"] < rows["oracle"]["starting_error"] * 0.3  # better than random
    # ours went through the scorer's public API: the same scores as calling it directly
    direct = load(ckpt, device="cpu").score(np.stack(generated["crops"])).score
    assert np.all((direct >= 0.1) & (direct <= 0.9))
    assert rows["CLIB-FIQA (ours)"]["missing_quality_pairs"] == 0
    with pytest.raises(ValueError, match="needs --checkpoint"):
        evaluate(benchmarks=[str(root / "pairs.txt")], qualities=["ours"], workspace=str(workspace.root))


def test_stored_scores_are_found_by_benchmark_keys(workspace):
    from data_manifest import ShardWriter
    from pipeline.evaluation.quality_specs import parse_qualities, stored_scores

    srcs = {"s0": "/data/lfw.bin#0", "s1": "/data/lfw.bin#1", "s2": "/data/faces/Aaron/Aaron_0001.jpg"}
    ShardWriter(workspace, "samples", "ing").write(0, [
        {"sample_id": k, "dataset": "lfw" if k != "s2" else "folder", "source_kind": "bin", "source": v,
         "status": "ok"} for k, v in srcs.items()])
    ShardWriter(workspace, "scores", "sc").write(0, [
        {"sample_id": "s0", "method": "clib-fiqa", "quality": 0.25, "status": "ok"},
        {"sample_id": "s1", "method": "clib-fiqa", "quality": 0.75, "status": "ok"},
        {"sample_id": "s2", "method": "clib-fiqa", "quality": 0.5, "status": "ok"},
        {"sample_id": "s0", "method": "other", "quality": 0.9, "status": "ok"}])
    q = stored_scores(workspace, "clib-fiqa")
    # .bin indices, pair-list keys and sample ids all resolve; unknown keys are NaN
    got = q.lookup(["1", "0", "Aaron/Aaron_0001", "s2", "nope"])
    np.testing.assert_array_equal(got[:4], [0.75, 0.25, 0.5, 0.5])
    assert np.isnan(got[4])
    only_lfw = stored_scores(workspace, "clib-fiqa", dataset="lfw", name="ours")
    assert only_lfw.method == "ours" and np.isnan(only_lfw.lookup(["Aaron/Aaron_0001"])[0])
    ours, files = parse_qualities(["mine=scores:clib-fiqa@lfw"], None, workspace)
    assert not ours and files[0].method == "mine" and files[0].lookup(["0"])[0] == 0.25
    with pytest.raises(ValueError, match="no ok scores of method 'missing'"):
        stored_scores(workspace, "missing")
