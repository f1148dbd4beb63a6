"""CLIB-FIQA training end to end on generated data: learning, exact resume, train/score flows, ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from data_manifest.vocabulary import FACTORS
from models.clib import ClibConfig
from models.train import ArrayImages, TrainConfig, TrainingData, load_checkpoint, train

torch.set_num_threads(1)  # the CPU is shared: one thread avoids OpenMP oversubscription stalls
TINY = ClibConfig(model_name="TinyRN-test", pretrained=None)


def _tc(**kw) -> TrainConfig:
    base = {"stage1_epochs": 2, "stage2_epochs": 3, "batch_size": 32, "lr": 3e-3, "mlp_lr": 1e-2, "num_workers": 0,
            "seed": 7}
    return TrainConfig(**(base | kw))


@pytest.mark.slow
def test_learns_a_visible_quality_property_and_resume_is_exact(tmp_path, brightness_faces):
    imgs, anchors, labels = brightness_faces(128, seed=1, size=64)
    data = TrainingData([f"s{i:04d}" for i in range(len(imgs))], anchors, labels, ArrayImages(imgs))
    seen: list[np.ndarray] = []
    full = train(TINY, data, _tc(), tmp_path / "full", on_confidence=seen.append, log=None)
    assert [h["stage"] for h in full.history] == [1, 1, 2, 2, 2]
    assert len(seen) == 1 and seen[0].shape == (128,)
    assert np.all((full.rho >= 0.5) & (full.rho <= 1.0))
    assert sorted(p.name for p in (tmp_path / "full").glob("*.pt")) == [
        "epoch-001.pt", "epoch-002.pt", "epoch-003.pt", "epoch-004.pt", "epoch-005.pt", "last.pt"]

    from models.scorer import load

    test_imgs, test_anchors, _ = brightness_faces(64, seed=2, size=64)
    res = load(full.checkpoint, device="cpu").score(test_imgs)
    rho_s = spearmanr(res.score, test_anchors).statistic
    print(f"held-out Spearman(score, anchor) = {rho_s:.3f}")
    assert rho_s > 0.5
    assert res.score.min() >= 0.1 - 1e-6 and res.score.max() <= 0.9 + 1e-6

    # Resume from the end of stage 1 (before the confidence pass) in a fresh process state:
    # the confidence pass and stage 2 must reproduce the uninterrupted run bit for bit.
    stage1 = load_checkpoint(tmp_path / "full" / "epoch-002.pt")
    assert stage1["epoch"] == 2 and stage1["rho"] is None
    resumed = train(TINY, data, _tc(), tmp_path / "resumed", resume=tmp_path / "full" / "epoch-002.pt", log=None)
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["epoch"] == b["epoch"] == 5 and len(b["history"]) == 5
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["rho"], b["rho"])
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])

    # A stopped run leaves its last epoch's checkpoint; a resume with other data or config is refused.
    part = train(TINY, data, _tc(), tmp_path / "part", resume=tmp_path / "full" / "epoch-004.pt",
                 stop_after_epoch=4, log=None)
    assert part.history == a["history"][:4]
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: the training set .* needs the options"):
        other = TrainingData(data.sample_ids, anchors[::-1].copy(), labels, ArrayImages(imgs))
        train(TINY, other, _tc(), tmp_path / "x", resume=full.checkpoint, log=None)
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: the run config differs"):
        train(TINY, data, _tc(lr=1e-4), tmp_path / "x", resume=full.checkpoint, log=None)
    # --keep-epochs 1: only the newest epoch checkpoint stays next to last.pt (a resume may change it)
    kept = train(TINY, data, _tc(keep_epochs=1), tmp_path / "kept", resume=tmp_path / "full" / "epoch-003.pt",
                 log=None)
    assert sorted(p.name for p in (tmp_path / "kept").glob("*.pt")) == ["epoch-005.pt", "last.pt"]
    assert load_checkpoint(kept.checkpoint)["epoch"] == 5
    # a checkpoint written before a config key existed resumes with that key's default
    from models.train import save_checkpoint

    older = load_checkpoint(full.checkpoint)
    del older["model_config"]["trust_torchscript"], older["train_config"]["logit_scale_max"]
    save_checkpoint(tmp_path / "older.pt", older)
    assert len(train(TINY, data, _tc(), tmp_path / "y", resume=tmp_path / "older.pt", log=None).history) == 5


def test_official_options_free_temperature_frozen_positional_embedding_global_batch(brightness_faces):
    import argparse

    from flows.train import configure_parser, train_config_from_args
    from models.clib import MAX_LOGIT_SCALE, ClibFiqa
    from models.losses import soft_quality_targets
    from models.train import train_step

    p = argparse.ArgumentParser()
    configure_parser(p)
    official = TrainConfig.from_dict(train_config_from_args(p.parse_args(["--official"])))
    assert official.logit_scale_max is None and official.freeze_visual_positional_embedding
    assert official.official_losses and official.official_js and official.schedule == "official"
    assert TrainConfig().logit_scale_max == MAX_LOGIT_SCALE and not TrainConfig().freeze_visual_positional_embedding
    # batch_size is the global batch: under DDP each rank takes its share, as one GPU would see it
    assert TrainConfig(batch_size=256).rank_batch_size(4) == 64
    assert TrainConfig(batch_size=256).rank_batch_size(1) == 256
    with pytest.raises(ValueError, match="divide evenly over 3 ranks"):
        TrainConfig(batch_size=256).rank_batch_size(3)

    imgs, anchors, labels = brightness_faces(8, seed=4, size=64)
    for tc in (_tc(), _tc(logit_scale_max=None, freeze_visual_positional_embedding=True)):
        torch.manual_seed(0)
        m = ClibFiqa.from_config(TINY)
        with torch.no_grad():
            m.logit_scale.fill_(MAX_LOGIT_SCALE + 0.5)  # as if training had pushed 1/tau past 100
        if tc.freeze_visual_positional_embedding:
            assert m.freeze_visual_positional_embeddings() == ["visual.attnpool.positional_embedding"]
        pos = m.visual.attnpool.positional_embedding.detach().clone()
        groups = m.trainable_groups()
        opt = torch.optim.AdamW([{"params": groups["main"], "lr": tc.lr}, {"params": groups["mlp"], "lr": tc.mlp_lr}])
        train_step(m, m, torch.from_numpy(imgs), soft_quality_targets(torch.from_numpy(anchors)),
                   torch.from_numpy(labels), tc, opt, groups, stage1=True)
        moved = not torch.equal(pos, m.visual.attnpool.positional_embedding)
        if tc.logit_scale_max is None:  # official: the temperature is free and the positional embedding frozen
            assert float(m.logit_scale) > MAX_LOGIT_SCALE + 0.49 and not moved
        else:
            assert float(m.logit_scale) == pytest.approx(MAX_LOGIT_SCALE) and moved


@pytest.mark.slow
def test_train_score_export_flows(prefect_harness, workspace, tmp_path, capsys, write_train_catalog, brightness_faces):
    from data_manifest import catalog
    from flows.export import main as export_main
    from flows.score import score_flow
    from flows.train import train_flow
    from models.scorer import load
    from models.scorer_onnx import OnnxScorer
    from pipeline.training.confidence_scores import CONFIDENCE_METHOD

    ids = write_train_catalog(workspace)
    cfg = {"stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 16, "lr": 1e-3, "num_workers": 1}
    out = train_flow(workspace=str(workspace.root), model_config="clib-tiny", train_config=cfg,
                     where="sample_id <> 'gen-039'")
    assert out["samples"] == len(ids) - 1
    ckpt = load_checkpoint(out["checkpoint"])
    assert ckpt["data"]["n_samples"] == len(ids) - 1 and "gen-039" in ckpt["data"]["query"]
    assert ckpt["data"]["anchor_runs"] == ["anchors-1"]
    assert len(ckpt["prompts"]) == 360 and ckpt["quality_anchors"] == [0.1, 0.3, 0.5, 0.7, 0.9]

    conf = catalog.query(workspace, f"SELECT sample_id, confidence FROM scores WHERE method = '{CONFIDENCE_METHOD}' "
                                    "ORDER BY sample_id").to_pydict()
    assert conf["sample_id"] == ids[:-1]
    assert all(0.5 <= c <= 1.0 for c in conf["confidence"])

    res = score_flow(workspace=str(workspace.root), checkpoint=out["checkpoint"], shard_size=16)
    assert res["selected"] == len(ids) + 1 and res["ok"] == len(ids)
    tbl = catalog.query(workspace, "SELECT sample_id, quality, quality_probs, marginals, status, error FROM scores "
                                   "WHERE method = 'clib-fiqa' ORDER BY sample_id").to_pylist()
    assert len(tbl) == len(ids) + 1
    bad = [r for r in tbl if r["sample_id"] == "gen-noface"][0]
    assert bad["status"] == "skipped" and bad["quality"] is None and "no face" in bad["error"]
    good = [r for r in tbl if r["status"] == "ok"]
    assert all(0.1 <= r["quality"] <= 0.9 and abs(sum(r["quality_probs"]) - 1) < 1e-4 for r in good)
    assert set(json.loads(good[0]["marginals"])) == set(FACTORS)
    # The flow's scores are the Python API's scores.
    from data_manifest.crops import read_crops

    crops = read_crops(workspace, "crops/faces/align-1/part-00000.npy", list(range(len(ids))))
    api = load(out["checkpoint"], device="cpu").score(crops).score
    assert np.allclose([r["quality"] for r in good], api, atol=1e-6)

    # ONNX: fiqa export, then onnxruntime against torch on generated crops of two sizes.
    onnx_path = tmp_path / "clib.onnx"
    capsys.readouterr()
    assert export_main(["--checkpoint", out["checkpoint"], "--onnx", str(onnx_path), "--verify", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_score_diff"] < 1e-4
    scorer, onnx = load(out["checkpoint"], device="cpu"), OnnxScorer(onnx_path)
    for imgs in (crops[:6], brightness_faces(3, seed=5, size=80)[0]):
        a, b = scorer.score(imgs), onnx.score(imgs)
        assert np.abs(a.score - b.score).max() < 1e-4
        assert np.abs(a.quality - b.quality).max() < 1e-4
        assert max(np.abs(a.factors[f] - b.factors[f]).max() for f in FACTORS) < 1e-4
