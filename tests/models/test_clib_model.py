"""The CLIB-FIQA network: prompt space, marginals, what trains, cached text, loading, ONNX export."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from data_manifest.vocabulary import N_PROMPTS, prompts
from models.clib import ClibConfig, ClibFiqa, PretrainedWeightsError, build_clip, encode_prompts
from models.losses import emd_loss, focal_loss, soft_quality_targets

torch.set_num_threads(1)  # the CPU is shared: one thread avoids OpenMP oversubscription stalls
TINY = "TinyRN-test"


def _model(**kw) -> ClibFiqa:
    torch.manual_seed(0)
    return ClibFiqa.from_config(ClibConfig(model_name=TINY, pretrained=None, **kw))


def _images(n: int = 4, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_prompt_space_is_the_papers():
    ps = prompts()
    assert len(ps) == N_PROMPTS == 360
    assert ps[0] == ("a photo of a hazy, obstructed, and profile face with exaggerated expression "
                     "under extreme lighting, which is of bad quality")
    assert ps[-1] == ("a photo of a clear, unobstructed, and frontal face with typical expression "
                      "under normal lighting, which is of perfect quality")
    assert ps[1].endswith("of poor quality") and ps[5].startswith("a photo of a hazy, obstructed, and profile")
    assert ps[5].endswith("under normal lighting, which is of bad quality")


def test_marginals_by_summation():
    m = _model()
    torch.manual_seed(1)
    logits = torch.randn(3, N_PROMPTS) * 3
    out = m.distributions(logits, with_mlp=True)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(out.probs.sum(-1), torch.ones(3))
    for dist in (out.quality, out.joint, out.extra["merged"], *out.factors):
        assert torch.allclose(dist.sum(-1), torch.ones(3), atol=1e-6)
    assert out.joint.shape == (3, 72) and out.quality.shape == (3, 5)
    # quality level n is every 5th prompt; blur class 0 is the first 120 prompts; lighting is the 2-cycle of 5
    assert torch.allclose(out.quality[:, 2], probs[:, 2::5].sum(-1), atol=1e-6)
    assert torch.allclose(out.factors[0][:, 0], probs[:, :120].sum(-1), atol=1e-6)
    light0 = probs.view(3, 72, 5).sum(-1)[:, 0::2].sum(-1)
    assert torch.allclose(out.factors[4][:, 0], light0, atol=1e-6)
    assert torch.allclose(out.score, (out.quality * torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])).sum(-1))
    assert bool(((out.score >= 0.1 - 1e-6) & (out.score <= 0.9 + 1e-6)).all())


def test_gradients_reach_only_image_tower_temperature_and_mlp():
    m = _model(text_mode="per_step")
    m.train()
    out = m(torch.from_numpy(_images()), with_mlp=True)
    target = soft_quality_targets(torch.tensor([0.2, 0.4, 0.6, 0.8]))
    labels = torch.tensor([[0, 1, 2, 0, 1]] * 4)
    loss = focal_loss(out.factors, labels) + 10 * emd_loss(out.quality, target) + emd_loss(out.extra["merged"], target)
    loss.backward()
    assert all(p.grad is not None for p in m.visual.parameters())
    assert sum(float(p.grad.abs().sum()) for p in m.visual.parameters()) > 0
    assert m.logit_scale.grad is not None and float(m.logit_scale.grad.abs()) > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.mlp.parameters())
    text = list(m.text_tower.named_parameters())
    assert text and all(p.grad is None and not p.requires_grad for _, p in text)
    assert not m.text_features.requires_grad
    # The MLP reads a detached joint distribution: its loss alone does not move the image tower.
    m.zero_grad(set_to_none=True)
    out = m(torch.from_numpy(_images()), with_mlp=True)
    emd_loss(out.extra["merged"], target).backward()
    assert all(p.grad is None for p in m.visual.parameters())


def test_official_switch_trains_token_embedding_only_with_per_step_text():
    m = _model(text_mode="per_step", official_trainable_text=True)
    trainable = {n.split(".")[0] for n, p in m.text_tower.named_parameters() if p.requires_grad}
    assert trainable == {"token_embedding", "ln_final"}
    with pytest.raises(ValueError, match="per_step"):
        ClibConfig(model_name=TINY, pretrained=None, official_trainable_text=True)


def test_cached_text_embeddings_equal_fresh_text_forward():
    m = _model(text_mode="per_step")
    fresh = m.prompt_embeddings()
    assert fresh.shape == m.text_features.shape == (N_PROMPTS, 32)
    assert torch.allclose(fresh, m.text_features, atol=1e-6)
    # and a fully separate text tower built from the same seed gives the same cache
    torch.manual_seed(0)
    clip = build_clip(TINY, None)
    assert torch.allclose(encode_prompts(clip, TINY), m.text_features, atol=1e-6)
    # a training step leaves the frozen tower (and so the cache) unchanged
    opt = torch.optim.AdamW(m.trainable_groups()["main"], lr=1e-2)
    m(torch.from_numpy(_images())).quality.sum().backward()
    opt.step()
    assert torch.allclose(m.prompt_embeddings(), m.text_features, atol=1e-6)
    cached = _model()
    assert cached.text_tower is None and not any(k.startswith("text_tower") for k in cached.state_dict())
    assert torch.allclose(cached.text_features, m.text_features, atol=1e-6)


def test_pretrained_tag_offline_fails_fast_and_local_path_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="HF_HUB_OFFLINE is set; pass a local file"):
        build_clip("RN50-quickgelu", "openai")
    with pytest.raises(PretrainedWeightsError, match="could not be resolved"):
        build_clip(TINY, "no-such-tag")
    torch.manual_seed(3)
    clip = build_clip(TINY, None)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    m = ClibFiqa.from_config(ClibConfig(model_name=TINY, pretrained=str(path)))
    assert torch.allclose(m.text_features, encode_prompts(clip, TINY), atol=1e-6)
    assert torch.equal(m.visual.conv1.weight, clip.visual.conv1.weight)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_carrying_code_is_refused(tmp_path):
    from models.scorer import load
    from models.train import load_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"format": "clib-fiqa/1", "x": Payload()}, fh)
    with pytest.raises(ValueError, match="refusing checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a CLIB-FIQA checkpoint"):
        load(other)


@pytest.mark.slow
def test_per_step_text_checkpoint_keeps_the_trained_text_tower():
    from models.train import CHECKPOINT_FORMAT, model_from_checkpoint

    m = _model(text_mode="per_step", official_trainable_text=True)
    with torch.no_grad():
        m.text_tower.token_embedding.weight.add_(0.05)  # as if the official mode had trained it
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": m.config.to_dict(), "prompts": prompts(),
            "model": m.state_for_checkpoint()}
    r = model_from_checkpoint(ckpt)
    assert torch.allclose(r.prompt_embeddings(), m.prompt_embeddings(), atol=1e-6)
    assert torch.allclose(r.text_features, m.prompt_embeddings(), atol=1e-6)
