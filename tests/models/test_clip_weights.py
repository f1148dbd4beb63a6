"""CLIP weights as users hold them: text activation, float32 similarities, every checkpoint format, no hidden switch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_manifest.vocabulary import N_PROMPTS, QUALITY_ANCHORS
from models.clib import (
    CONFIG_DIR,
    ClibConfig,
    ClibFiqa,
    PretrainedWeightsError,
    build_clip,
    encode_prompts,
    register_open_clip_configs,
    resolve_pretrained,
    uses_quick_gelu,
)

torch.set_num_threads(1)  # the CPU is shared: one thread avoids OpenMP oversubscription stalls
ROOT = Path(__file__).resolve().parents[2]
TINY = "TinyRN-test"
TINY_QG = "TinyRN-quickgelu-test"


def _text_activation(clip: torch.nn.Module) -> str:
    return type(clip.transformer.resblocks[0].mlp.gelu).__name__


@pytest.fixture(scope="module")
def quickgelu_arch(tmp_path_factory) -> str:
    """The tiny architecture with QuickGELU, registered from a config written here (like OpenAI's towers)."""
    d = tmp_path_factory.mktemp("open_clip_cfg")
    cfg = json.loads((CONFIG_DIR / "open_clip" / f"{TINY}.json").read_text())
    (d / f"{TINY_QG}.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    register_open_clip_configs(d)
    return TINY_QG


def _images(n: int = 6, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _tiny_model(scale: float = 100.0) -> ClibFiqa:
    torch.manual_seed(0)
    m = ClibFiqa.from_config(ClibConfig(model_name=TINY, pretrained=None)).eval()
    with torch.no_grad():
        m.logit_scale.fill_(math.log(scale))  # CLIP-size logits, as with the released weights
    return m


# --- 1. the text activation the weights were trained with --------------------------------------------------------


def test_shipped_configs_build_the_activation_their_weights_were_trained_with():
    import open_clip

    shipped = sorted(CONFIG_DIR.glob("clib-*.json"))
    assert {p.stem for p in shipped} >= {"clib-rn50", "clib-tiny"}
    for path in shipped:
        cfg = ClibConfig.from_json(path)
        if cfg.pretrained is None:
            continue
        tag = open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained)
        assert tag, f"{path.name}: {cfg.pretrained!r} is not an open_clip tag of {cfg.model_name}"
        assert uses_quick_gelu(cfg.model_name) == bool(tag.get("quick_gelu", False)), path.name
    rn50 = ClibConfig.from_json("clib-rn50")
    assert rn50.pretrained == "openai"
    clip = build_clip(rn50.model_name, None)  # the architecture the config builds (random init: no download)
    assert _text_activation(clip) == "QuickGELU"


def test_a_tag_trained_with_another_activation_is_refused_before_any_download(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the refusal must not depend on being offline
    with pytest.raises(PretrainedWeightsError, match="trained with QuickGELU.*'RN50-quickgelu'"):
        resolve_pretrained("RN50", "openai")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="HF_HUB_OFFLINE.*--pretrained PATH.*--trust-torchscript"):
        build_clip("RN50-quickgelu", "openai")


# --- 2. float32 similarities under autocast -----------------------------------------------------------------------


def test_logits_and_distributions_are_float32_under_bf16_autocast():
    m = _tiny_model()
    x = torch.from_numpy(_images())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, with_mlp=True)
        feats = m.encode_image(x)  # the image tower itself may run in bf16
    for t in (out.logits, out.probs, out.quality, out.score, out.joint, out.extra["merged"], *out.factors):
        assert t.dtype == torch.float32
    assert feats.dtype == torch.float32
    ref = 100.0 * feats.double() @ m.text_features.double().t()
    assert float((out.logits.double() - ref).abs().max()) < 1e-4
    quality = torch.softmax(ref, -1).view(-1, N_PROMPTS // 5, 5).sum(1)
    score = quality @ torch.tensor(QUALITY_ANCHORS, dtype=torch.float64)
    assert float((out.score.double() - score).abs().max()) < 1e-6


def test_scorer_matches_onnx_under_bf16_autocast_on_cpu(tmp_path):
    from models.scorer import Scorer, export_onnx
    from models.scorer_onnx import OnnxScorer

    m = _tiny_model()
    onnx = OnnxScorer(export_onnx(m, tmp_path / "tiny.onnx"))
    x = _images(8)
    b = onnx.score(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not reach the float32 scorer
        a = Scorer(m, device="cpu").score(x)
    assert np.abs(a.score - b.score).max() <= 1e-4
    assert np.abs(a.quality - b.quality).max() <= 1e-4
    # bf16 image tower: the head adds no rounding of its own, so the score is exact given the bf16 features
    s16 = Scorer(m, device="cpu", bf16=True).score(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = m.encode_image(torch.from_numpy(x)).double()
    quality = torch.softmax(100.0 * feats @ m.text_features.double().t(), -1).view(len(x), -1, 5).sum(1)
    exact = (quality @ torch.tensor(QUALITY_ANCHORS, dtype=torch.float64)).numpy()
    assert np.abs(s16.score - exact).max() < 1e-6
    print(f"torch vs ONNX max |score diff|: float32 scorer under bf16 autocast {np.abs(a.score - b.score).max():.2e}, "
          f"bf16 image tower {np.abs(s16.score - b.score).max():.2e}")


# --- 3. every format the weights come in --------------------------------------------------------------------------


def _openai_style_archive(arch: str, path: Path) -> dict[str, torch.Tensor]:
    """A TorchScript archive laid out like OpenAI's RN50.pt (fp16 weights, an extra int entry); its weights."""
    import open_clip

    torch.manual_seed(5)
    clip = open_clip.create_model(arch, pretrained=None).eval()
    open_clip.convert_weights_to_lp(clip, torch.float16)
    clip.register_buffer("input_resolution", torch.tensor(64))  # OpenAI's archives carry this int entry
    torch.jit.save(torch.jit.script(clip), str(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in clip.state_dict().items()
            if k != "input_resolution"}


def test_openai_torchscript_archive_loads_only_when_trusted(tmp_path, quickgelu_arch):
    path = tmp_path / "RN50-like.pt"
    weights = _openai_style_archive(quickgelu_arch, path)
    with pytest.raises(PretrainedWeightsError, match="TorchScript archive.*--trust-torchscript"):
        build_clip(quickgelu_arch, str(path))
    clip = build_clip(quickgelu_arch, str(path), trust_torchscript=True)
    loaded = clip.state_dict()
    assert set(loaded) == set(weights)
    for k, v in weights.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k  # fp16 values, float32 parameters
    assert _text_activation(clip) == "QuickGELU"
    # the archive records QuickGELU: a GELU architecture is refused, not silently mis-activated
    with pytest.raises(PretrainedWeightsError, match="GELU, but the weights in .* were trained with QuickGELU"):
        build_clip(TINY, str(path), trust_torchscript=True)
    # and the whole model takes it through its config
    m = ClibFiqa.from_config(ClibConfig(model_name=quickgelu_arch, pretrained=str(path), trust_torchscript=True))
    assert torch.allclose(m.text_features, encode_prompts(clip, quickgelu_arch), atol=1e-6)


def test_state_dict_safetensors_and_hub_directory_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = build_clip(TINY, None)
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    plain = tmp_path / "open_clip.pt"
    torch.save(sd, plain)
    training = tmp_path / "epoch_1.pt"  # open_clip's training checkpoints: DDP prefixes under "state_dict"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, training)
    st = tmp_path / "tiny.safetensors"
    save_file(sd, str(st))
    snapshot = tmp_path / "snapshot"  # a downloaded hub repo (e.g. timm/resnet50_clip.openai)
    snapshot.mkdir()
    save_file(sd, str(snapshot / "open_clip_model.safetensors"))
    for source, kind in ((plain, "file"), (training, "file"), (st, "file"), (snapshot, "file")):
        assert resolve_pretrained(TINY, str(source)).kind == kind
        clip = build_clip(TINY, str(source))
        for k, v in sd.items():
            assert torch.equal(clip.state_dict()[k], v), (source.name, k)


def test_unusable_weights_name_everything_tried(tmp_path):
    with pytest.raises(PretrainedWeightsError, match=r"tried: an open_clip tag of .*known tags: none.*does not exist"):
        build_clip(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(PretrainedWeightsError, match="known tags: \\['openai'"):
        resolve_pretrained("RN50-quickgelu", "no-such-tag")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"these are not weights")
    with pytest.raises(PretrainedWeightsError, match=r"tried: safetensors / torch.load \(weights_only=True\)"):
        build_clip(TINY, str(junk))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(PretrainedWeightsError, match="open_clip_model.safetensors"):
        build_clip(TINY, str(empty))
    other = tmp_path / "other_arch.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, other)
    with pytest.raises(PretrainedWeightsError, match="could not load weights file"):
        build_clip(TINY, str(other))


# --- 4. no environment change at import time; offline training fails first ----------------------------------------


@pytest.mark.slow
def test_importing_flows_leaves_hf_hub_offline_alone():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import os, flows, flows.train, flows.cli; print(os.environ.get('HF_HUB_OFFLINE', '<unset>'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "<unset>"


def test_offline_train_with_a_hub_tag_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws = tmp_path / "ws"
    assert main(["train", "--workspace", str(ws), "--model-config", "clib-rn50"]) == 2
    err = capsys.readouterr().err
    assert "fiqa train: error:" in err and "HF_HUB_OFFLINE" in err and "--pretrained PATH" in err
    assert not ws.exists()  # no workspace, run record or training-set query was touched
    assert main(["train", "--workspace", str(ws), "--pretrained", str(tmp_path / "RN50.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err and not ws.exists()
