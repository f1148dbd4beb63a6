"""Scoring with a CLIB-FIQA checkpoint, and its export as one ONNX graph.

`load(checkpoint).score(crops)` gives the quality score of Eq. 2 (in [0.1, 0.9])
plus the quality and factor marginals. At inference the text side is a
constant, so the exported graph is: image tower -> L2 norm -> fixed (K x 360)
matrix (prompt embeddings x 1/tau) -> softmax -> marginal sums -> weighted sum.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_manifest.vocabulary import FACTORS, N_PROMPTS, PROMPT_SHAPE, QUALITY_ANCHORS
from models.clib import ClibFiqa
from models.devices import resolve_device
from models.scorer_onnx import ONNX_INPUT, ONNX_OUTPUTS, ScoreResult, as_batch
from models.train import load_checkpoint, model_from_checkpoint

ONNX_OPSET = 17


class Scorer:
    """Batched scoring of uint8 RGB crops with a trained model.

    Float32 by default, whatever autocast the caller has on, so scores match the exported ONNX graph.
    `bf16=True` runs the image tower under bf16 autocast (faster on GPU); similarities, softmax and the
    score stay float32, and scores then differ from float32 ones by the tower's bf16 rounding.
    """

    def __init__(self, model: ClibFiqa, *, device: str = "auto", batch_size: int = 64, bf16: bool = False,
                 info: dict[str, Any] | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.bf16 = bool(bf16)
        self.info = info or {}

    @torch.no_grad()
    def score(self, images: Any) -> ScoreResult:
        """Score (N, H, W, 3) uint8 RGB crops (or a list of (H, W, 3) arrays, any size)."""
        scores, qualities, factors = [], [], {f: [] for f in FACTORS}
        for arr in as_batch(images):
            for i in range(0, len(arr), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(arr[i:i + self.batch_size])).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.model(x)
                scores.append(out.score.float().cpu().numpy())
                qualities.append(out.quality.float().cpu().numpy())
                for f, m in zip(FACTORS, out.factors, strict=True):
                    factors[f].append(m.float().cpu().numpy())
        return ScoreResult(np.concatenate(scores).astype(np.float32), np.concatenate(qualities),
                           {f: np.concatenate(v) for f, v in factors.items()})


def load(checkpoint: str | os.PathLike[str], *, device: str = "auto", batch_size: int = 64,
         bf16: bool = False) -> Scorer:
    """A Scorer from a checkpoint, loaded with torch.load(weights_only=True)."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    info = {"checkpoint": str(Path(checkpoint).resolve()), "epoch": ckpt.get("epoch"),
            "model_config": ckpt.get("model_config"), "data": ckpt.get("data")}
    return Scorer(model, device=device, batch_size=batch_size, bf16=bf16, info=info)


class ExportGraph(nn.Module):
    """The whole scorer as one graph: uint8 (B, H, W, 3) -> score (B,), quality (B, 5), probs (B, 360)."""

    def __init__(self, model: ClibFiqa) -> None:
        super().__init__()
        self.preprocess = model.preprocess
        self.visual = model.visual
        scale = model.logit_scale.detach().float().exp()
        self.register_buffer("prompt_matrix", (scale * model.prompt_embeddings().detach().float()).t().contiguous())
        qmat = torch.zeros(N_PROMPTS, PROMPT_SHAPE[-1])
        qmat[torch.arange(N_PROMPTS), torch.arange(N_PROMPTS) % PROMPT_SHAPE[-1]] = 1.0
        self.register_buffer("quality_matrix", qmat)
        self.register_buffer("anchors", torch.tensor(QUALITY_ANCHORS, dtype=torch.float32))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.preprocess(images, force_resize=True)
        feats = F.normalize(self.visual(x).float(), dim=-1)
        probs = torch.softmax(feats @ self.prompt_matrix, dim=-1)
        quality = probs @ self.quality_matrix
        score = quality @ self.anchors
        return score, quality, probs


def export_onnx(source: str | os.PathLike[str] | ClibFiqa | Scorer, path: str | os.PathLike[str], *,
                opset: int = ONNX_OPSET, example_size: int = 112) -> Path:
    """Write the scorer as one ONNX graph with dynamic batch and crop size; returns the path."""
    if isinstance(source, Scorer):
        model = source.model
    elif isinstance(source, ClibFiqa):
        model = source
    else:
        model = model_from_checkpoint(load_checkpoint(source))
    model = model.to("cpu").eval()
    model.set_channels_last(False)
    graph = ExportGraph(model).eval()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, example_size, example_size, 3, dtype=torch.uint8)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                graph, (example,), str(tmp), input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                dynamic_axes={ONNX_INPUT: {0: "batch", 1: "height", 2: "width"}, "score": {0: "batch"},
                              "quality": {0: "batch"}, "probs": {0: "batch"}},
                opset_version=opset, dynamo=False,
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
