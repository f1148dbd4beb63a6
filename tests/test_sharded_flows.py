"""The sharded-flow template: resume after a failed shard gives the rows of an uninterrupted run, changed
parameters on resume are refused, the CLI reaches the task runner, and each flow's options match its CLI."""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import pytest

from data_manifest import ShardWriter, catalog, runs
from data_manifest.crops import write_pack
from flows import runtime, sharded

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


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An untrained tiny CLIB-FIQA checkpoint (scores are deterministic, which is all these tests need)."""
    import torch

    from models.clib import ClibConfig, ClibFiqa
    from models.train import CHECKPOINT_FORMAT, save_checkpoint

    torch.manual_seed(0)
    cfg = ClibConfig(model_name="TinyRN-test", pretrained=None)
    model = ClibFiqa.from_config(cfg, load_pretrained=False)
    with torch.no_grad():  # away from the symmetric init, so every crop gets its own score
        for param in [*model.parameters(), model.text_features]:
            param.add_(0.3 * torch.randn_like(param))
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model_config": cfg.to_dict(),
                           "model": model.state_for_checkpoint()})
    return str(path)


def _rows(ws, table: str, run_id: str, drop: tuple[str, ...] = ("run_id", "created_at")) -> list[dict]:
    rows = catalog.query(ws, f"SELECT * FROM {table}_history WHERE run_id = '{run_id}' ORDER BY sample_id")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows.to_pylist()]


def test_score_resume_after_a_failed_shard_equals_an_uninterrupted_run(prefect_harness, workspace, tiny_checkpoint,
                                                                       monkeypatch):
    from flows import score as S

    _seed(workspace)
    kw = {"workspace": str(workspace.root), "checkpoint": tiny_checkpoint, "shard_size": 3, "device": "cpu",
          "progress": False}
    whole = S.score_flow(**kw)
    assert whole["selected"] == N and whole["shards"] == 4 and whole["ok"] == N - 1

    real = S.score_rows
    calls: list[str] = []

    def flaky(ws, items, *a, **k):
        calls.append(items[0]["sample_id"])
        if items[0]["sample_id"] == "s03":  # shard 00001 fails once
            raise OSError("disk went away")
        return real(ws, items, *a, **k)

    monkeypatch.setattr(S, "score_rows", flaky)
    with pytest.raises(runtime.ShardFailures, match="1 of 4 shards failed"):
        S.score_flow(**kw, run_id="score-resume")
    assert runs.shard_done(workspace, "score-resume", "00000") and not runs.shard_done(workspace, "score-resume",
                                                                                       "00001")
    monkeypatch.setattr(S, "score_rows", real)
    with pytest.raises(ValueError, match="started with shard_size=3"):  # changed parameters are refused
        S.score_flow(**{**kw, "shard_size": 4}, run_id="score-resume")
    with pytest.raises(ValueError, match="started with method='clib-fiqa'"):
        S.score_flow(**kw, method="other", run_id="score-resume")
    calls.clear()
    monkeypatch.setattr(S, "score_rows", lambda ws, items, *a, **k: calls.append(items[0]["sample_id"])
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
    real = S.score_rows
    monkeypatch.setattr(S, "score_rows", lambda ws, items, *a, **k: (_ for _ in ()).throw(OSError("down"))
                        if items[0]["sample_id"] == "s06" else real(ws, items, *a, **k))
    kw = {"workspace": str(workspace.root), "checkpoint": tiny_checkpoint, "shard_size": 3, "device": "cpu",
          "progress": False, "run_id": "score-frozen"}
    with pytest.raises(runtime.ShardFailures):
        S.score_flow(**kw)
    ShardWriter(workspace, "samples", "ingest-late").write(0, [
        {"sample_id": "s05b", "dataset": "gen", "source_kind": "list", "source": "/gen/late.png", "status": "ok"}])
    catalog.refresh(workspace)
    monkeypatch.setattr(S, "score_rows", real)
    out = S.score_flow(**kw)
    assert out["selected"] == N and "s05b" not in [r["sample_id"] for r in _rows(workspace, "scores", "score-frozen")]


def test_score_address_reaches_the_task_runner(prefect_harness, workspace, tiny_checkpoint, monkeypatch):
    from flows import score as S
    from flows.cli import main

    _seed(workspace)
    seen = []
    real = runtime.make_task_runner
    monkeypatch.setattr(runtime, "make_task_runner", lambda *a: seen.append(a) or real("threads", 1))
    assert main(["score", "--workspace", str(workspace.root), "--checkpoint", tiny_checkpoint, "--device", "cpu",
                 "--runner", "dask", "--workers", "2", "--address", "tcp://127.0.0.1:8786"]) == 0
    assert seen == [("dask", 2, "tcp://127.0.0.1:8786")]
    with pytest.raises(ValueError, match="needs --runner dask or ray"):
        S.ScoreOptions(checkpoint=tiny_checkpoint, address="tcp://127.0.0.1:8786")


@pytest.mark.parametrize(("module", "cls"), [("flows.score", "ScoreOptions"), ("flows.anchors", "AnchorsOptions")])
def test_every_option_field_is_a_cli_option(module, cls):
    mod = importlib.import_module(module)
    p = argparse.ArgumentParser()
    mod.configure_parser(p)
    missing = sharded.unknown_fields(getattr(mod, cls), p)
    assert missing in ([], ["progress"]), missing


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
