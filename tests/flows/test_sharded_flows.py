"""The sharded-flow template: resume after a failed shard gives the rows of an uninterrupted run, changed
parameters on resume are refused, the CLI reaches the task runner, and each flow's options match its CLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import numpy as np
import pytest

from data_manifest import ShardWriter, catalog, runs
from data_manifest.crops import write_pack
from flows import runners, runtime
from pipeline import anchors_embed, scoring
from pipeline.labellers import batch

N = 10  # samples: 9 with a crop, one without a face


def _seed(ws) -> None:
    """samples + faces (packed random crops) for N generated samples; the last one has no face."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, size=(N - 1, 112, 112, 3), dtype=np.uint8)
    rel = write_pack(ws, "align-t", 0, crops)
    ids = [f"s{i:02d}" for i in range(N)]
    ShardWriter(ws, "samples", "ingest-t").write(0, [
        {"sample_id": s, "dataset": "gen", "source_kind": "list", "source": f"/gen/{s}.png", "status": "ok",
         "identity": i % 3} for i, s in enumerate(ids)])
    faces = [{"sample_id": s, "crop_file": rel, "crop_index": i, "status": "ok"} for i, s in enumerate(ids[:-1])]
    faces.append({"sample_id": ids[-1], "status": "no_face", "error": "no face detected"})
    ShardWriter(ws, "faces", "align-t").write(0, faces)
    catalog.refresh(ws)


def _rows(ws, table: str, run_id: str, drop: tuple[str, ...] = ("run_id", "created_at")) -> list[dict]:
    rows = catalog.query(ws, f"SELECT * FROM {table}_history WHERE run_id = '{run_id}' ORDER BY sample_id")
    out = [{k: v for k, v in r.items() if k not in drop} for r in rows.to_pylist()]
    return sorted(out, key=lambda r: (r["sample_id"], r.get("factor") or ""))  # factors: one row per factor


@pytest.mark.slow
def test_score_resume_after_a_failed_shard_equals_an_uninterrupted_run(prefect_harness, workspace, tiny_checkpoint,
                                                                       monkeypatch):
    from flows import score as S

    _seed(workspace)
    kw = {"workspace": str(workspace.root), "checkpoint": tiny_checkpoint, "shard_size": 3, "device": "cpu",
          "progress": False}
    whole = S.score_flow(**kw)
    assert whole["selected"] == N and whole["shards"] == 4 and whole["ok"] == N - 1

    real = scoring.score_rows
    calls: list[str] = []

    def flaky(ws, items, *a, **k):
        calls.append(items[0]["sample_id"])
        if items[0]["sample_id"] == "s03":  # shard 00001 fails once
            raise OSError("disk went away")
        return real(ws, items, *a, **k)

    monkeypatch.setattr(scoring, "score_rows", flaky)
    with pytest.raises(runtime.ShardFailures, match="1 of 4 shards failed"):
        S.score_flow(**kw, run_id="score-resume")
    assert runs.shard_done(workspace, "score-resume", "00000") and not runs.shard_done(workspace, "score-resume",
                                                                                       "00001")
    monkeypatch.setattr(scoring, "score_rows", real)
    with pytest.raises(ValueError, match="started with shard_size=3"):  # changed parameters are refused
        S.score_flow(**{**kw, "shard_size": 4}, run_id="score-resume")
    with pytest.raises(ValueError, match="started with method='clib-fiqa'"):
        S.score_flow(**kw, method="other", run_id="score-resume")
    calls.clear()
    monkeypatch.setattr(scoring, "score_rows", lambda ws, items, *a, **k: calls.append(items[0]["sample_id"])
                        or real(ws, items, *a, **k))
    resumed = S.score_flow(**kw, run_id="score-resume")
    assert calls == ["s03"] and resumed["skipped_shards"] == 3  # only the failed shard runs again
    want = _rows(workspace, "scores", whole["run_id"])
    assert len({r["quality"] for r in want}) == N  # N - 1 distinct scores and the faceless sample's None
    assert _rows(workspace, "scores", "score-resume") == want


def test_score_resume_reads_its_frozen_selection(prefect_harness, workspace, tiny_checkpoint, monkeypatch):
    """Samples ingested between the failure and the resume do not enter the resumed run."""
    from flows import score as S

    _seed(workspace)
    real = scoring.score_rows
    monkeypatch.setattr(scoring, "score_rows", lambda ws, items, *a, **k: (_ for _ in ()).throw(OSError("down"))
                        if items[0]["sample_id"] == "s06" else real(ws, items, *a, **k))
    kw = {"workspace": str(workspace.root), "checkpoint": tiny_checkpoint, "shard_size": 3, "device": "cpu",
          "progress": False, "run_id": "score-frozen"}
    with pytest.raises(runtime.ShardFailures):
        S.score_flow(**kw)
    ShardWriter(workspace, "samples", "ingest-late").write(0, [
        {"sample_id": "s05b", "dataset": "gen", "source_kind": "list", "source": "/gen/late.png", "status": "ok"}])
    catalog.refresh(workspace)
    monkeypatch.setattr(scoring, "score_rows", real)
    out = S.score_flow(**kw)
    assert out["selected"] == N and "s05b" not in [r["sample_id"] for r in _rows(workspace, "scores", "score-frozen")]


def test_score_address_reaches_the_task_runner(prefect_harness, workspace, tiny_checkpoint, monkeypatch):
    from flows import score as S
    from flows.cli import main

    _seed(workspace)
    seen = []
    real = runners.make_task_runner
    monkeypatch.setattr(runners, "make_task_runner", lambda *a: seen.append(a) or real("threads", 1))
    assert main(["score", "--workspace", str(workspace.root), "--checkpoint", tiny_checkpoint, "--device", "cpu",
                 "--runner", "dask", "--workers", "2", "--address", "tcp://127.0.0.1:8786"]) == 0
    assert seen == [("dask", 2, "tcp://127.0.0.1:8786")]
    with pytest.raises(ValueError, match="needs --runner dask"):
        S.ScoreOptions(checkpoint=tiny_checkpoint, address="tcp://127.0.0.1:8786")


@pytest.mark.parametrize(("module", "cls"), [
    ("flows.score", "ScoreOptions"), ("flows.anchors", "AnchorsOptions"), ("flows.evaluate", "EvaluateOptions"),
    ("flows.train", "TrainOptions"), ("flows.train_attributes", "TrainAttributesOptions")])
def test_every_option_field_is_a_cli_option(module, cls):
    """The CLI sets every field of the flow's options (progress: API only; train_config: built from several)."""
    mod = importlib.import_module(module)
    p = argparse.ArgumentParser()
    mod.configure_parser(p)
    dests = {a.dest for a in p._actions}  # noqa: SLF001 - a read-only look at the parser's options
    missing = sorted(f.name for f in dataclasses.fields(getattr(mod, cls)) if f.name not in dests)
    assert set(missing) <= {"progress", "train_config"}, missing
    # and one default per option: the parser's default is the dataclass's (or None: "keep the dataclass's")
    fields = {f.name: f for f in dataclasses.fields(getattr(mod, cls))}
    for action in p._actions:  # noqa: SLF001
        f = fields.get(action.dest)
        if f is None or action.default is None or f.default is dataclasses.MISSING:
            continue
        want = f.default if not isinstance(f.default, tuple) else list(f.default)
        assert action.default in (f.default, want), (action.dest, action.default, f.default)


def test_options_validate_once_and_name_the_bad_value(tmp_path):
    from flows.anchors import AnchorsOptions
    from flows.score import ScoreOptions

    with pytest.raises(ValueError, match="unknown anchor mode 'sideways'"):
        AnchorsOptions(mode="sideways")
    with pytest.raises(ValueError, match="shard-size must be >= 1, got 0"):
        AnchorsOptions(shard_size=0)
    with pytest.raises(FileNotFoundError, match="head checkpoint .*nohead.pt does not exist"):
        AnchorsOptions(head=str(tmp_path / "nohead.pt"))
    with pytest.raises(ValueError, match="either --query or --where"):
        AnchorsOptions(where="true", query="SELECT 1")
    with pytest.raises(ValueError, match="needs --checkpoint"):
        ScoreOptions()
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        ScoreOptions(checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown task runner 'fibers'"):
        ScoreOptions(runner="fibers")


class _FakeRecognizer:
    """A deterministic 8-D 'recogniser' (channel means of image quadrants), so the anchors flow runs in seconds."""

    model_id = "fake-quadrants/1"
    embedding_dim = 8

    def embed(self, crops: np.ndarray) -> np.ndarray:
        x = crops.astype(np.float32) / 255.0
        q = [x[:, :56, :56], x[:, :56, 56:], x[:, 56:, :56], x[:, 56:, 56:]]
        v = np.concatenate([np.stack([b.mean(axis=(1, 2, 3)), b.std(axis=(1, 2, 3))], 1) for b in q], 1) - 0.3
        return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.slow
def test_anchors_resume_after_a_failed_shard_equals_an_uninterrupted_run(prefect_harness, workspace, monkeypatch):
    from flows import anchors as F

    _seed(workspace)
    monkeypatch.setattr(anchors_embed, "recognizer", lambda *a: _FakeRecognizer())
    kw = {"workspace": str(workspace.root), "fr_model": "fake", "shard_size": 4, "device": "cpu",
          "progress": False}
    whole = F.anchors_flow(**kw)
    assert whole["selected"] == N and whole["shards"] == 3 and whole["ok"] >= 6
    real = anchors_embed.embed_rows
    monkeypatch.setattr(anchors_embed, "embed_rows", lambda ws, items, *a, **k: (_ for _ in ()).throw(OSError("gone"))
                        if items[0]["sample_id"] == "s04" else real(ws, items, *a, **k))
    with pytest.raises(runtime.ShardFailures, match="1 of 3 shards failed"):
        F.anchors_flow(**kw, run_id="anchors-resume")
    monkeypatch.setattr(anchors_embed, "embed_rows", real)
    with pytest.raises(ValueError, match="started with mode='ratio'"):
        F.anchors_flow(**kw, mode="shifted", run_id="anchors-resume")
    F.anchors_flow(**kw, run_id="anchors-resume")
    want = _rows(workspace, "anchors", whole["run_id"])
    assert len({r["anchor"] for r in want if r["anchor"] is not None}) >= 6
    assert _rows(workspace, "anchors", "anchors-resume") == want
    assert _rows(workspace, "embeddings", "anchors-resume") == _rows(workspace, "embeddings", whole["run_id"])


@pytest.mark.slow
def test_train_attributes_resume_after_a_failed_shard_equals_an_uninterrupted_run(prefect_harness, tmp_path,
                                                                                   monkeypatch, s3_workspace):
    """The interrupted and resumed run goes to a workspace on object storage (its crops workspace a prefix of it),
    the uninterrupted one to a local folder: the same rows."""
    from data_manifest import Workspace
    from flows import train_attributes as T
    from pipeline.attribute_training import crops as wider_crops
    from pipeline.synthetic.wider_synthetic import SyntheticSpec, make_dataset

    root = make_dataset(tmp_path / "wider", SyntheticSpec(images=12), seed=1)
    kw = {"wider_root": str(root), "model_config": "tiny", "detector": "none", "shard_images": 4,
          "train_config": {"epochs": 1, "batch_size": 8}, "calibration_fraction": 0.0, "device": "cpu",
          "torch_threads": 1, "progress": False}
    whole = T.train_attributes_flow(workspace=str(tmp_path / "a"), **kw)
    from pipeline.readers.wider import parse, split_layout

    real = wider_crops.wider_rows
    first_val = next(iter(parse(split_layout(root, "val")[0], min_size=20))).path

    def flaky(items, *a, **k):
        if any(split == "val" and rec.path == first_val for split, rec in items):  # shard val-00000
            raise OSError("disk went away")
        return real(items, *a, **k)

    monkeypatch.setattr(wider_crops, "wider_rows", flaky)
    ws_b = s3_workspace
    with pytest.raises(runtime.ShardFailures, match="1 of 6 shards failed"):
        T.train_attributes_flow(workspace=ws_b, run_id="attr-resume", **kw)
    monkeypatch.setattr(wider_crops, "wider_rows", real)
    with pytest.raises(ValueError, match="started with margin=0.15"):
        T.train_attributes_flow(workspace=ws_b, run_id="attr-resume", **{**kw, "margin": 0.3})
    resumed = T.train_attributes_flow(workspace=ws_b, run_id="attr-resume", **kw)
    assert resumed["data"]["val"]["crops"] == whole["data"]["val"]["crops"] > 0
    assert resumed["data_workspace"] == f"{s3_workspace}/{T.DATA_WORKSPACE}"
    a, b = Workspace(whole["data_workspace"]), Workspace(resumed["data_workspace"])
    for table in ("samples", "faces", "factors"):
        got = [{k: (v.replace("attr-resume", "RUN") if isinstance(v, str) else v) for k, v in r.items()}
               for r in _rows(b, table, "attr-resume", drop=("run_id", "created_at"))]
        want = [{k: (v.replace(whole["run_id"], "RUN") if isinstance(v, str) else v) for k, v in r.items()}
                for r in _rows(a, table, whole["run_id"], drop=("run_id", "created_at"))]
        assert got == want, table


def test_one_cli_error_path_exit_1_for_failed_shards_2_for_bad_input(prefect_harness, workspace, tiny_checkpoint,
                                                                     monkeypatch, capsys):
    from flows.cli import main

    _seed(workspace)
    real = scoring.score_rows
    monkeypatch.setattr(scoring, "score_rows", lambda ws, items, *a, **k: (_ for _ in ()).throw(OSError("disk gone"))
                        if items[0]["sample_id"] == "s00" else real(ws, items, *a, **k))
    base = ["score", "--workspace", str(workspace.root), "--device", "cpu", "--shard-size", "5"]
    capsys.readouterr()
    assert main([*base, "--checkpoint", tiny_checkpoint, "--run-id", "score-cli"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fiqa score")]
    assert len(err) == 1 and err[0].startswith("fiqa score: error: 1 of 2 shards failed in run score-cli")
    assert "--run-id score-cli" in err[0]
    assert main([*base, "--checkpoint", str(workspace.root / "missing.pt")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fiqa score")]
    assert len(err) == 1 and err[0].startswith("fiqa score: error: checkpoint") and "does not exist" in err[0]


@pytest.mark.slow
def test_label_resume_after_a_failed_shard_equals_an_uninterrupted_run(prefect_harness, workspace, monkeypatch):
    """blur on the stored crops: the resumed run writes exactly the factors rows of an uninterrupted one."""
    from flows import label as L

    _seed(workspace)
    kw = {"stages": ["blur"], "workspace": str(workspace.root), "shard_size": 3, "progress": False}
    whole = L.label(**kw)
    assert whole["selected"] == N and whole["shards"] == 4
    real = batch.label_rows
    monkeypatch.setattr(batch, "label_rows", lambda ws, rid, shard, rows, *a: (_ for _ in ()).throw(OSError("gone"))
                        if shard == "00002" else real(ws, rid, shard, rows, *a))
    with pytest.raises(runtime.ShardFailures, match="1 of 4 shards failed"):
        L.label(**kw, run_id="label-resume")
    monkeypatch.setattr(batch, "label_rows", real)
    with pytest.raises(ValueError, match="started with shard_size=3"):
        L.label(**{**kw, "shard_size": 5}, run_id="label-resume")
    with pytest.raises(ValueError, match="started with options="):
        L.label(**kw, options={"blur_thresholds": "paper"}, run_id="label-resume")
    resumed = L.label(**kw, run_id="label-resume")
    assert resumed["skipped_shards"] == 3
    want = _rows(workspace, "factors", whole["run_id"])
    assert len(want) == N and len({r["value"] for r in want if r["value"] is not None}) == N - 1
    assert _rows(workspace, "factors", "label-resume") == want


@pytest.mark.slow
def test_ingest_resume_after_a_failed_shard_equals_an_uninterrupted_run(prefect_harness, tmp_path, monkeypatch,
                                                                        assert_views_match_history):
    from PIL import Image

    from data_manifest import Workspace
    from flows import ingest as I
    from pipeline.readers import FolderReader

    data = tmp_path / "data"
    for i in range(8):
        (data / f"id{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 6 + i, 3), 30 * i, np.uint8)).save(data / f"id{i % 3}" / f"{i}.png")
    (data / "id0" / "broken.png").write_bytes(b"not an image")
    ws = Workspace(tmp_path / "ws")
    kw = {"path": str(data), "dataset": "toy", "shard_size": 3, "workspace": str(ws.root), "progress": False}
    whole = I.ingest(**kw)
    real = FolderReader.read
    monkeypatch.setattr(FolderReader, "read", lambda self, s: (_ for _ in ()).throw(OSError("gone"))
                        if s.index == 1 else real(self, s))
    with pytest.raises(runtime.ShardFailures, match="shard 00001"):
        I.ingest(**kw, run_id="ingest-resume")
    assert assert_views_match_history(ws)["samples"].pending  # the failed run's shards: overlaid, not folded
    monkeypatch.setattr(FolderReader, "read", real)
    with pytest.raises(ValueError, match="started with dataset='toy'"):
        I.ingest(**{**kw, "dataset": "other"}, run_id="ingest-resume")
    resumed = I.ingest(**kw, run_id="ingest-resume")
    assert resumed["skipped_shards"] == 2 and resumed["counts"] == whole["counts"]
    want = _rows(ws, "samples", whole["run_id"])
    assert len(want) == 9 and {r["status"] for r in want} >= {"ok"} and len({r["status"] for r in want}) == 2
    assert _rows(ws, "samples", "ingest-resume") == want
    assert not assert_views_match_history(ws)["samples"].pending
