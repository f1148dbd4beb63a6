"""Label stage "occlusion": P(obstructed) from the occlusion CNN trained on real faces with pasted occluders.

The model (`models.occlusion`) was trained on the face-api photos' faces and
ships with the project (`models/shipped/`, installed by `make setup`); it is
checked on the package faces it never saw (`python -m
benchmarks.occlusion`). Every row names the labeller, the model's version and
the SHA-256 of its file, so a relabel can tell models apart.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from data_manifest.vocabulary import binary_class
from models.fast_forward import AUTO, ONNX, TORCH, FastForward, batched, resolve_backend
from models.occlusion import (
    INPUT_SIZE,
    OcclusionModel,
    OcclusionNet,
    load_model,
    predict_views,
    to_input,
)
from pipeline.labellers.base import ERROR, FaceCrop, crop_problem, factor_row

LABELLER = "occlusion-cnn-pasted"
CPU_FORWARD_BATCH = 32  # crops per CPU forward (each forward holds the crops and their mirror images)
CPU_BACKEND = ONNX  # measured fastest on one core (benchmarks/attributes.py): ~2x eager torch
# Measures kept per stage by crop content (about 8 MB): the pose stage's obstruction check and this stage's rows then
# cost one forward per crop in a pass that runs both, with up to 32 shards of 1,000 crops in flight (`measures`).
MEMO_CROPS = 32_768


def adaptive_pool_matrix(size: int, out: int) -> torch.Tensor:
    """(out, size) averaging matrix of torch's adaptive average pooling along one axis (windows may overlap)."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class OcclusionProbability(nn.Module):
    """P(obstructed) (N,) of an OcclusionNet for its input, with the adaptive pooling written as two matrix
    products (ONNX has no adaptive pooling to a size that does not divide the map: 7 -> 4 here)."""

    def __init__(self, net: OcclusionNet) -> None:
        super().__init__()
        self.net = net.eval()
        with torch.no_grad():
            side = int(net.features(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).shape[-1])
        out = net.pool.output_size
        out = out if isinstance(out, int) else out[0]
        self.register_buffer("pool_matrix", adaptive_pool_matrix(side, int(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.features(x)
        pooled = torch.matmul(torch.matmul(self.pool_matrix, f), self.pool_matrix.t())
        return torch.sigmoid(self.net.head(torch.flatten(pooled, 1)).squeeze(1))


class OcclusionStage:
    """Per crop: P(obstructed), the obstructed / unobstructed class and the model that decided."""

    name = "occlusion"

    def __init__(self, device: str = "cpu", model_path: str | os.PathLike[str] | None = None,
                 threshold: float | None = None, forward_batch: int = CPU_FORWARD_BATCH, backend: str = AUTO) -> None:
        """`model_path`: a checkpoint (default: the model store's); `threshold`: override the stored one;
        `backend`: `auto` (CPU_BACKEND on CPU, eager torch elsewhere), `torch`, `onnx` or `torchscript`
        (the last two CPU only, checked against eager torch when built)."""
        if forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"occlusion threshold must be in (0, 1), got {threshold}")
        self.device = device
        self.forward_batch = forward_batch
        self.backend = resolve_backend(backend, device, CPU_BACKEND)
        self.model: OcclusionModel = load_model(model_path, device)
        self.fast = (None if self.backend == TORCH else
                     FastForward(OcclusionProbability(self.model.net), (3, INPUT_SIZE, INPUT_SIZE), self.backend))
        self.version = self.model.version
        self.threshold = float(self.model.threshold if threshold is None else threshold)
        self.labeller = LABELLER
        self._memo: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # crop digest -> (P crop, P mirror)
        self._memo_lock = threading.Lock()

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """P(obstructed) (N,) for uint8 RGB crops (N, 112, 112, 3)."""
        return self.measures(crops)["p_obstructed"]

    def views(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(obstructed) of each crop and of its mirror image, (N,) each."""
        if self.fast is None or len(crops) == 0:
            return predict_views(self.model, crops, batch_size=self.forward_batch, device=self.device)
        x = to_input(crops).numpy()
        n = len(x)
        both = np.empty((n, 2, *x.shape[1:]), np.float32)  # crop k and its mirror side by side in one forward
        both[:, 0], both[:, 1] = x, x[..., ::-1]
        p = batched(self.fast, both.reshape(2 * n, *x.shape[1:]), 2 * self.forward_batch).reshape(n, 2)
        return p[:, 0].copy(), p[:, 1].copy()

    def measures(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Every measure of a row, (N,) each: P(obstructed) and the P of the crop and of its mirror image.

        Crops measured lately (the last MEMO_CROPS, keyed by a digest of their pixels) are not measured again. On the
        default CPU engine (ONNX) the kept values are bit for bit a fresh forward's, whatever batch the crop came in;
        eager torch differs by float rounding (about 1e-7) between batch compositions."""
        crops = np.asarray(crops)
        keys = [hashlib.blake2b(np.ascontiguousarray(c).tobytes(), digest_size=16).digest() for c in crops]
        with self._memo_lock:
            known = {k: self._memo[k] for k in keys if k in self._memo}
        todo = [i for i, k in enumerate(keys) if k not in known]
        if todo:
            plain, mirror = self.views(crops[todo])
            fresh = {keys[i]: (float(a), float(b)) for i, a, b in zip(todo, plain, mirror, strict=True)}
            known.update(fresh)
            with self._memo_lock:
                self._memo.update(fresh)
                while len(self._memo) > MEMO_CROPS:
                    self._memo.popitem(last=False)
        pairs = np.array([known[k] for k in keys], dtype=np.float32).reshape(len(keys), 2)
        plain, mirror = pairs[:, 0], pairs[:, 1]
        return {"p_obstructed": (plain + mirror) / 2, "p_crop": plain, "p_mirror": mirror}

    def _row(self, sample_id: str, **kwargs: Any) -> dict[str, Any]:
        return factor_row(sample_id, "occlusion", labeller=self.labeller, labeller_version=self.version,
                          thresholds={"probability": self.threshold}, **kwargs)

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        """One occlusion row per record; unusable crops get a row with their status and reason."""
        problems = {i: crop_problem(rec) for i, rec in enumerate(batch)}
        usable = [i for i, p in problems.items() if p is None]
        found = self.measures(np.stack([batch[i].crop for i in usable])) if usable else {}
        at = {i: k for k, i in enumerate(usable)}
        rows = []
        for i, rec in enumerate(batch):
            problem = problems[i]
            if problem is not None:
                rows.append(self._row(rec.sample_id, status=problem[0], error=problem[1]))
                continue
            p = float(found["p_obstructed"][at[i]])
            if not np.isfinite(p):
                rows.append(self._row(rec.sample_id, status=ERROR, error=f"non-finite occlusion probability {p}"))
                continue
            details = {
                "p_obstructed": p,
                "p_crop": float(found["p_crop"][at[i]]),
                "p_mirror": float(found["p_mirror"][at[i]]),
                "model_sha256": self.model.sha256,
                "model_file": self.model.path.name,
            }
            rows.append(self._row(rec.sample_id, value=p, decision=binary_class("occlusion", p, self.threshold),
                                  details=details))
        return rows
