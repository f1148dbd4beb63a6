"""Scoring with an exported CLIB-FIQA ONNX graph: needs only numpy and onnxruntime (no torch, no open_clip)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest.vocabulary import FACTORS, N_PROMPTS, PROMPT_SHAPE
from models.onnx_session import open_session

ONNX_INPUT = "images"  # uint8 (B, H, W, 3) RGB
ONNX_OUTPUTS = ("score", "quality", "probs")


@dataclass
class ScoreResult:
    """Per image: quality score in [0.1, 0.9], the 5-level distribution and each factor's marginal."""

    score: np.ndarray  # (N,) float32
    quality: np.ndarray  # (N, 5)
    factors: dict[str, np.ndarray]  # factor -> (N, C)

    def __len__(self) -> int:
        return len(self.score)


def marginals(probs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Quality and per-factor marginals of (N, 360) prompt probabilities."""
    if probs.ndim != 2 or probs.shape[1] != N_PROMPTS:
        raise ValueError(f"probs must be (N, {N_PROMPTS}), got {probs.shape}")
    p = probs.reshape(-1, *PROMPT_SHAPE)
    n = len(PROMPT_SHAPE) - 1
    quality = p.sum(axis=tuple(range(1, n + 1)))
    joint = p.sum(axis=-1)
    factors = {f: joint.sum(axis=tuple(d for d in range(1, n + 1) if d != m + 1)) for m, f in enumerate(FACTORS)}
    return quality, factors


def as_batch(images: Any) -> list[np.ndarray]:
    """Normalise input to a list of uint8 (B, H, W, 3) arrays, one per distinct crop size, in order."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        _check_array(images)
        return [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError("images must be a uint8 (N, H, W, 3) array or a non-empty list of (H, W, 3) arrays")
    arrs = [np.asarray(a) for a in images]
    for a in arrs:
        _check_array(a[None] if a.ndim == 3 else a)
    if len({a.shape for a in arrs}) == 1:
        return [np.stack(arrs)]
    return [a[None] for a in arrs]


def _check_array(a: np.ndarray) -> None:
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images must be uint8 RGB (N, H, W, 3), got {a.dtype} {a.shape}")


class OnnxScorer:
    """The exported scorer graph (image tower, fixed 360 x K matrix, softmax, weighted sum) in onnxruntime."""

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int = 64,
                 providers: list[str] | None = None) -> None:
        p = Path(path)
        self.session = open_session(p, provider_list=providers or ["CPUExecutionProvider"], what="ONNX model")
        names = [o.name for o in self.session.get_outputs()]
        if names != list(ONNX_OUTPUTS):
            raise ValueError(f"{p} is not a CLIB-FIQA export: outputs {names}, expected {list(ONNX_OUTPUTS)}")
        self.batch_size = batch_size

    def score(self, images: Any) -> ScoreResult:
        scores, qualities, probs = [], [], []
        for arr in as_batch(images):
            for i in range(0, len(arr), self.batch_size):
                feed = {ONNX_INPUT: np.ascontiguousarray(arr[i:i + self.batch_size])}
                s, q, p = self.session.run(list(ONNX_OUTPUTS), feed)
                scores.append(s)
                qualities.append(q)
                probs.append(p)
        prob = np.concatenate(probs)
        _, factors = marginals(prob)
        return ScoreResult(np.concatenate(scores).astype(np.float32), np.concatenate(qualities), factors)
