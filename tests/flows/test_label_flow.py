"""The label flow on a mixed folder: one faces row and one factors row per (sample, factor), reasons, resume."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifest import ShardWriter, Workspace, catalog
from data_manifest.vocabulary import BLUR_THRESHOLDS, CALIBRATED_BLUR_THRESHOLDS, FactorClass
from flows import label as L
from pipeline.labellers import registry
from pipeline.labellers.base import OK, FaceCrop, factor_row
from pipeline.readers import FolderReader
from pipeline.samples import sample_rows


def _save(path: Path, arr: np.ndarray, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _mixed_folder(root: Path, real_face) -> dict[str, str]:
    """Faces, face-free images and broken files; file name -> expected faces status."""
    rng = np.random.default_rng(1)
    _save(root / "astro" / "astronaut.png", np.asarray(real_face("astronaut"))[::2, ::2].copy(), "PNG")
    _save(root / "tom" / "tom.png", np.asarray(real_face("tom_hanks")), "PNG")
    _save(root / "tom" / "tom_flipped.jpg", np.ascontiguousarray(np.asarray(real_face("tom_hanks"))[:, ::-1]), "JPEG")
    _save(root / "none" / "flat.png", np.full((96, 128, 3), 120, np.uint8), "PNG")
    _save(root / "none" / "noise.jpg", rng.integers(0, 256, (80, 80, 3), dtype=np.uint8), "JPEG")
    (root / "bad").mkdir()
    whole = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 30, np.uint8)).save(whole, "JPEG")
    (root / "bad" / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "bad" / "text.jpg").write_text("not an image\n")
    (root / "bad" / "empty.png").write_bytes(b"")
    return {"astronaut.png": "ok", "tom.png": "ok", "tom_flipped.jpg": "ok", "flat.png": "no_face",
            "noise.jpg": "no_face", "truncated.jpg": "truncated", "text.jpg": "not_image", "empty.png": "empty"}


def _ingest(ws: Workspace, root: Path) -> None:
    reader = FolderReader(root)
    ShardWriter(ws, "samples", "ingest-test").write("00000", sample_rows("mixed", iter(reader)))


def _table(ws: Workspace, sql: str) -> list[dict]:
    return catalog.query(ws, sql).to_pylist()


@pytest.fixture
def mixed(workspace, tmp_path, real_face, mtcnn_detector):
    mtcnn_detector()  # skips with a reason when the MTCNN weights are not fetched
    expected = _mixed_folder(tmp_path / "data", real_face)
    _ingest(workspace, tmp_path / "data")
    return workspace, expected


OPTIONS = {"detector": "mtcnn", "pose_backend": "dlib"}


@pytest.mark.slow
def test_label_mixed_folder_rows_statuses_and_reasons(prefect_harness, mixed):
    ws, expected = mixed
    result = L.label(stages=["align", "blur", "pose"], options=OPTIONS, workspace=str(ws.root), shard_size=3,
                     progress=False)
    assert result["selected"] == len(expected) and result["shards"] == 3
    faces = _table(ws, "SELECT f.*, s.source FROM faces_history f JOIN samples s USING (sample_id)")
    assert len(faces) == len(expected) == len({r["sample_id"] for r in faces})
    by_name = {Path(r["source"]).name: r for r in faces}
    for name, status in expected.items():
        row = by_name[name]
        assert row["status"] == status, (name, row["status"], row["error"])
        if status == OK:
            assert row["crop_file"] and row["crop_index"] is not None and len(row["landmarks"]) == 10
            assert row["detector"] == "mtcnn" and row["n_faces"] >= 1 and row["score"] > 0.9
        else:
            assert row["error"] and row["crop_file"] is None
    assert "no face detected" in by_name["flat.png"]["error"]
    factors = _table(ws, "SELECT x.*, s.source FROM factors_history x JOIN samples s USING (sample_id)")
    assert len(factors) == 2 * len(expected)
    assert len({(r["sample_id"], r["factor"]) for r in factors}) == len(factors)
    for r in factors:
        name = Path(r["source"]).name
        assert r["status"] == expected[name], (name, r)
        if expected[name] == OK:
            assert r["value"] is not None and r["class_name"] and json.loads(r["thresholds"])
        else:
            assert r["value"] is None and r["error"]
    yaw = {Path(r["source"]).name: r["value"] for r in factors if r["factor"] == "pose"}
    assert yaw["tom.png"] > 10 and yaw["tom_flipped.jpg"] < -10  # the flip flips the sign
    # Crops are packed and readable; the run records per-stage timings.
    crop = catalog.query(ws, "SELECT crop_file, crop_index FROM faces WHERE status = 'ok' LIMIT 1").to_pylist()[0]
    from data_manifest.crops import read_crops

    assert read_crops(ws, crop["crop_file"], crop["crop_index"]).shape == (112, 112, 3)
    run = _table(ws, f"SELECT * FROM runs WHERE run_id = '{result['run_id']}'")[0]
    metrics = json.loads(run["metrics"])
    assert run["status"] == "completed"
    assert {"decode", "align", "blur", "pose", "shard"} <= set(metrics["stage_seconds"])
    assert metrics["stage_seconds"]["shard"] >= metrics["stage_seconds"]["pose"]  # a shard's whole task time
    # A factor-only run on a WHERE-selected subset reuses the stored crops and landmarks.
    again = L.label(stages=["pose"], where="face_status = 'ok' AND source LIKE '%tom%'",
                    options={**OPTIONS, "pose_thresholds": [5, 15]}, workspace=str(ws.root), progress=False)
    assert again["selected"] == 2
    latest = {Path(r["source"]).name: r for r in _table(
        ws, "SELECT x.*, s.source FROM factors x JOIN samples s USING (sample_id) WHERE factor = 'pose'")}
    assert json.loads(latest["tom.png"]["thresholds"]) == [5.0, 15.0]
    assert latest["tom.png"]["value"] == pytest.approx(yaw["tom.png"], abs=1e-6)


@pytest.mark.slow
def test_processes_runner_labels_on_warm_pool_workers(prefect_harness, mixed, tmp_path):
    """--runner processes: shards run in compute-pool workers that loaded every stage's models when they started
    (no shard builds one), and the rows equal a threads run's."""
    import shutil

    ws, expected = mixed
    twin = Workspace(tmp_path / "twin")
    shutil.copytree(ws.root, twin.root, dirs_exist_ok=True)
    stages = ["align", "blur", "pose"]
    pooled = L.label(stages=stages, options=OPTIONS, workspace=str(ws.root), shard_size=2, progress=False,
                     runner="processes", workers=2)
    threads = L.label(stages=stages, options=OPTIONS, workspace=str(twin.root), shard_size=2, progress=False)
    assert pooled["selected"] == threads["selected"] == len(expected) and pooled["shards"] == 4
    assert pooled["counts"]["stages_built"] == 0  # every shard found its stages built: the workers were warm
    cols = "sample_id, factor, value, class_name, status, error, labeller_version"
    sql = f"SELECT {cols} FROM factors ORDER BY sample_id, factor"
    assert _table(ws, sql) == _table(twin, sql) and len(_table(ws, sql)) == 2 * len(expected)
    from flows import runners

    opts = L.LabelRunOptions(stages=stages, options=OPTIONS, runner="processes", workers=1)
    with runners.compute_pool(opts, L.warm_up(opts)) as pool:  # a worker has built the stages before any shard
        built = runners.offload(pool, _built_here, stages, opts.options)
        assert runners.offload(pool, os.getpid) != os.getpid()
    assert built == [True] * len(stages)
    absent = str(tmp_path / "absent.pt")  # a bad configuration fails in the pool's check with its own message
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        L.label(stages=["attributes"], options=registry.LabelOptions(attributes_checkpoint=absent),
                workspace=str(ws.root), progress=False, runner="processes", workers=1)


def _built_here(stages, options):
    """Run in a pool worker: which stages that process has built."""
    return [registry.is_built(name, options) for name in stages]


_FAIL = threading.Event()


class _Flaky:
    """A lighting labeller that crashes on one sample while _FAIL is set (a transient failure)."""

    name, version = "flaky", "1"

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def __call__(self, batch):
        if _FAIL.is_set() and any(f.sample_id == self.victim for f in batch):
            raise RuntimeError("injected failure")
        return [factor_row(f.sample_id, "lighting", labeller="flaky", labeller_version="1", value=0.1,
                           decision=FactorClass("lighting", 1)) for f in batch]


@pytest.mark.slow
def test_rerun_after_a_failed_shard_duplicates_nothing(prefect_harness, mixed):
    ws, expected = mixed
    ids = sorted(r["sample_id"] for r in _table(ws, "SELECT sample_id FROM samples"))
    registry.register_stage("flaky", ("lighting",), lambda o: _Flaky(ids[4]))  # sample 4 lives in shard 1 (size 3)
    try:
        _FAIL.set()
        with pytest.raises(Exception, match="1 of 3 shards failed"):
            L.label(stages=["align", "flaky"], options=OPTIONS, workspace=str(ws.root), run_id="label-resume",
                    shard_size=3, progress=False)
        run = _table(ws, "SELECT status, error FROM runs WHERE run_id = 'label-resume'")[0]
        assert run["status"] == "failed" and "injected failure" in run["error"]
        _FAIL.clear()
        result = L.label(stages=["align", "flaky"], options=OPTIONS, workspace=str(ws.root),
                         run_id="label-resume", shard_size=3, progress=False)
    finally:
        registry.STAGES.pop("flaky", None)
        _FAIL.clear()
    assert result["skipped_shards"] == 2 and result["shards"] == 3
    faces = _table(ws, "SELECT sample_id FROM faces_history WHERE run_id = 'label-resume'")
    factors = _table(ws, "SELECT sample_id, factor FROM factors_history WHERE run_id = 'label-resume'")
    assert sorted(r["sample_id"] for r in faces) == ids
    assert sorted(r["sample_id"] for r in factors) == ids and {r["factor"] for r in factors} == {"lighting"}
    assert result["counts"]["samples"] == len(expected)  # summed once per committed shard
    assert _table(ws, "SELECT status FROM runs WHERE run_id = 'label-resume'")[0]["status"] == "completed"


def test_bad_configuration_fails_before_any_work(workspace):
    with pytest.raises(ValueError, match="unknown stage"):
        registry.parse_stages("align,sharpness")
    with pytest.raises(ValueError, match="ordered"):
        registry.options_from({"pose_thresholds": [25, 10]})
    with pytest.raises(ValueError, match="unknown label option"):
        registry.options_from({"yaw_limit": 3})
    with pytest.raises(ValueError, match="'attributes' and 'lighting' both label 'lighting'"):
        registry.parse_stages("align,attributes,lighting")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        absent = str(workspace.root / "absent.pt")
        L.label(stages=["attributes"], options=registry.LabelOptions(attributes_checkpoint=absent),
                workspace=str(workspace.root), progress=False)
    with pytest.raises(ValueError, match="blur thresholds must be"):
        registry.options_from({"blur_thresholds": "sharpest"})
    assert registry.parse_stages("pose,align,blur,pose") == ["align", "pose", "blur"]
    assert registry.parse_stages("lighting,expression") == ["lighting", "expression"]
    assert not workspace.runs_dir.exists() or not list(workspace.runs_dir.iterdir())  # no run was started


def test_cli_parses_options():
    import argparse

    p = argparse.ArgumentParser()
    L.configure_parser(p)
    args = p.parse_args(["--stages", "align,pose", "--aligned", "--pose-thresholds", "12,30", "--detector", "mtcnn",
                         "--where", "dataset = 'lfw'"])
    opts = L.labeller_options(args)
    assert opts.align_mode == "already_aligned" and opts.pose_thresholds == (12.0, 30.0)
    assert opts.blur_thresholds == BLUR_THRESHOLDS == CALIBRATED_BLUR_THRESHOLDS  # calibrated by default
    assert opts.attributes_checkpoint is None  # the real-face labellers
    assert p.parse_args([]).stages == "align,blur,pose,attributes"
    assert L.labeller_options(p.parse_args(["--blur-thresholds", "paper"])).blur_thresholds == (0.35, 0.7)
    assert L.labeller_options(p.parse_args(["--blur-thresholds", "0.1,0.2"])).blur_thresholds == (0.1, 0.2)
    assert registry.options_from({"blur_thresholds": "paper"}).blur_thresholds == (0.35, 0.7)  # flow parameters too
    assert opts.pose_withhold == "obstructed"  # both pose checks by default
    assert L.labeller_options(p.parse_args(["--pose-withhold", "none"])).pose_withhold == "none"
    for bad in (["--pose-thresholds", "30,12"], ["--blur-thresholds", "0.7,0.35"], ["--blur-thresholds", "sharp"],
                ["--pose-withhold", "sometimes"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(ValueError, match="pose_withhold must be one of obstructed, ambiguous, none"):
        registry.options_from({"pose_withhold": "sometimes"})
    import inspect

    from flows.relabel import LABELLER_FIELDS
    from flows.scheduled import relabel_subset

    assert set(LABELLER_FIELDS) <= set(inspect.signature(relabel_subset.fn).parameters)  # the deployment offers all


def test_attributes_default_to_the_real_face_labellers(real_face, real_labellers):
    group = real_labellers()
    assert [s.name for s in group.stages] == ["occlusion", "expression", "lighting"]
    # Each member is the same object the single-factor stage of the same options gets (models load once).
    assert group.stages[2] is registry.get_stage("lighting", registry.LabelOptions())
    crop = np.asarray(real_face("tom_hanks"))  # aligned 112x112
    rows = group([FaceCrop("tom", crop), FaceCrop("gone", None, status="no_face", error="no face detected")])
    by = {(r["sample_id"], r["factor"]): r for r in rows}
    assert sorted(by) == sorted((s, f) for s in ("tom", "gone") for f in ("occlusion", "expression", "lighting"))
    labellers = {f: by[("tom", f)]["labeller"] for f in ("occlusion", "expression", "lighting")}
    assert labellers["expression"] == "fer-minixception" and labellers["lighting"] == "analytic-lighting"
    assert len(set(labellers.values())) == 3 and all(by[("tom", f)]["labeller_version"] for f in labellers)
    assert all(by[("tom", f)]["status"] == OK and by[("tom", f)]["class_name"] for f in labellers)
    assert all(by[("gone", f)]["status"] == "no_face" and by[("gone", f)]["class_name"] is None for f in labellers)


def test_processes_runner_gives_each_worker_one_thread(monkeypatch):
    import os
    import sys

    from flows import runners
    from pipeline.worker_threads import THREAD_ENV, one_thread_per_worker

    runner = runners.make_task_runner("processes", 2)
    assert runner._initializer is one_thread_per_worker and runner.duplicate()._initializer is one_thread_per_worker
    for key in THREAD_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # a value the user set is kept
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    try:
        one_thread_per_worker()
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENCV_FOR_THREADS_NUM"] == "1"
        assert os.environ["MKL_NUM_THREADS"] == "3"
        if torch:
            assert torch.get_num_threads() == 1
    finally:
        if torch:
            torch.set_num_threads(before)
