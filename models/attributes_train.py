"""Training and evaluation of the attribute CNN: AdamW + warmup/cosine, AMP on GPU, imbalance handling.

Crops come from a `CropSource` (packed crops addressed by file and index, or
an in-memory array), so training never decodes the original images. Decision
thresholds are chosen on a calibration slice held out from the training split
(maximising balanced accuracy) and then frozen, so the validation figures are
not tuned on the validation split.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, WeightedRandomSampler

from data_manifest.vocabulary import BINARY_THRESHOLD
from models.attributes import HEADS, AttributeNet, AttributeNetConfig, predict_proba, to_input
from models.config import from_mapping
from models.crop_sources import ArrayImages, ImageSource  # noqa: F401  (re-exported: the trainer's inputs)

log = logging.getLogger(__name__)
IMBALANCE = ("pos_weight", "sampler", "none")


@dataclass
class TrainConfig:
    """Optimisation settings of `fit`."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 1e-3  # decoupled weight decay (the paper's AdamW setting)
    warmup_epochs: float = 1.0  # linear warmup, then cosine annealing to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    imbalance: str = "pos_weight"  # pos_weight: BCE positive weight neg/pos per head; sampler: balanced sampling
    max_pos_weight: float = 50.0  # cap of the per-head positive weight
    hflip: bool = True  # random horizontal flip (no photometric jitter: it would change the lighting label)
    amp: bool = True  # mixed precision on CUDA (bf16 when supported, else fp16 + loss scaling)
    seed: int = 0
    num_workers: int = 0  # DataLoader workers reading crop packs

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping of overrides, refusing unknown keys."""
        return from_mapping(cls, data, "training setting")

    def __post_init__(self) -> None:
        if self.imbalance not in IMBALANCE:
            raise ValueError(f"imbalance must be one of {IMBALANCE}, got {self.imbalance!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"bad training settings: epochs={self.epochs} batch_size={self.batch_size} lr={self.lr}")


class CropSource(Protocol):
    """Training crops with targets: `len`, `targets` (N, 3) float32 and `read(indices) -> uint8 (B, H, W, 3)`."""

    targets: np.ndarray

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray: ...


class LabelledCrops:
    """A CropSource: an ImageSource with one target row (HEADS order) per crop."""

    def __init__(self, images: ImageSource, targets: np.ndarray) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.float32).reshape(-1, len(HEADS))
        if len(images) != len(self.targets):
            raise ValueError(f"{len(images)} crops but {len(self.targets)} target rows")

    def __len__(self) -> int:
        return len(self.targets)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.images.read(np.asarray(indices))


class Subset:
    """Rows of another CropSource."""

    def __init__(self, source: CropSource, rows: np.ndarray) -> None:
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64)
        self.targets = source.targets[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.source.read(self.rows[np.asarray(indices)])


class _Batches(Dataset):
    def __init__(self, source: CropSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(idx, dtype=np.int64)
        return torch.from_numpy(self.source.read(rows)), torch.from_numpy(self.source.targets[rows])


# ---------------------------------------------------------------- metrics


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class only."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """2x2 confusion matrix [[TN, FP], [FN, TP]] (rows: truth negative/positive) for `p >= threshold`."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    return np.array([[np.sum(~y & ~pred), np.sum(~y & pred)], [np.sum(y & ~pred), np.sum(y & pred)]], dtype=np.int64)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean of the true-positive and true-negative rates (the available one when a class is absent)."""
    (tn, fp), (fn, tp) = cm
    rates = [r for r in (tp / (tp + fn) if tp + fn else None, tn / (tn + fp) if tn + fp else None) if r is not None]
    return float(np.mean(rates)) if rates else float("nan")


MIN_CALIBRATION_PER_CLASS = 5  # fewer positives or negatives than this: keep the default threshold


def choose_threshold(
    probs: np.ndarray,
    labels: np.ndarray,
    default: float = BINARY_THRESHOLD,
    min_per_class: int = MIN_CALIBRATION_PER_CLASS,
) -> float:
    """The threshold maximising balanced accuracy (Youden's J), midway between neighbouring scores.

    Returns `default` when either class has fewer than `min_per_class` samples.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if min(n_pos, n_neg) < max(1, min_per_class):
        return float(default)
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    last = np.r_[ps[1:] != ps[:-1], True]  # last index of each run of equal scores
    tpr, tnr = tp[last] / n_pos, 1.0 - fp[last] / n_neg
    values = ps[last]
    k = int(np.argmax(tpr + tnr))
    if tpr[k] + tnr[k] <= 1.0:  # no threshold beats "all one class"
        return float(default)
    lower = values[k + 1] if k + 1 < len(values) else max(0.0, values[k] - 1e-6)
    return float((values[k] + lower) / 2.0)


def binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Balanced accuracy, AUROC, confusion matrix and rates at `threshold`."""
    cm = confusion(probs, labels, threshold)
    (tn, fp), (fn, tp) = cm
    return {
        "threshold": float(threshold),
        "balanced_accuracy": balanced_accuracy(cm),
        "auroc": auroc(probs, labels),
        "accuracy": float((tp + tn) / max(1, cm.sum())),
        "tpr": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "tnr": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "positives": int(tp + fn),
        "negatives": int(tn + fp),
        "confusion": cm.tolist(),
    }


def evaluate(probs: np.ndarray, targets: np.ndarray, thresholds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per head: metrics at the chosen threshold, plus balanced accuracy at the default 0.5."""
    out = {}
    for h, name in enumerate(HEADS):
        m = binary_metrics(probs[:, h], targets[:, h], thresholds[name])
        m["balanced_accuracy_at_0.5"] = balanced_accuracy(confusion(probs[:, h], targets[:, h], BINARY_THRESHOLD))
        out[name] = m
    return out


# ---------------------------------------------------------------- training


def positive_weights(targets: np.ndarray, cap: float) -> np.ndarray:
    """Per-head BCE positive weight = negatives / positives, clipped to [1 / cap, cap]."""
    pos = targets.sum(axis=0)
    neg = len(targets) - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1), cap)
    return np.clip(w, 1.0 / cap, cap).astype(np.float32)


def balanced_sample_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weight: mean over heads of 1 / (2 * frequency of the sample's class in that head)."""
    pos_rate = targets.mean(axis=0).clip(1e-6, 1 - 1e-6)
    per_head = np.where(targets > 0.5, 1.0 / (2 * pos_rate), 1.0 / (2 * (1 - pos_rate)))
    return per_head.mean(axis=1)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine annealing to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def _loader(
    source: CropSource, cfg: TrainConfig, device: torch.device, shuffle: bool, gen: torch.Generator
) -> DataLoader:
    if shuffle and cfg.imbalance == "sampler":
        w = torch.as_tensor(balanced_sample_weights(source.targets), dtype=torch.double)
        base = WeightedRandomSampler(w, num_samples=len(source), replacement=True, generator=gen)
    elif shuffle:
        base = RandomSampler(range(len(source)), generator=gen)
    else:
        base = SequentialSampler(range(len(source)))
    sampler = BatchSampler(base, cfg.batch_size, drop_last=shuffle and len(source) > cfg.batch_size)
    return DataLoader(
        _Batches(source),
        sampler=sampler,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )


def _amp(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    if not (cfg.amp and device.type == "cuda"):
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class TrainResult:
    """The trained network and what training measured."""

    model: AttributeNet
    thresholds: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def predict(model: AttributeNet, source: CropSource, batch_size: int, device: torch.device | str) -> np.ndarray:
    """Probabilities (N, 3) for every crop of a source, in order."""
    out = np.empty((len(source), len(HEADS)), dtype=np.float32)
    for start in range(0, len(source), batch_size):
        rows = np.arange(start, min(len(source), start + batch_size))
        out[rows] = predict_proba(model, source.read(rows), batch_size=batch_size, device=device)
    return out


def fit(
    model_config: AttributeNetConfig,
    train: CropSource,
    config: TrainConfig,
    *,
    calibration: CropSource | None = None,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the three-head network; choose thresholds on `calibration` (0.5 without one)."""
    if len(train) == 0:
        raise ValueError("no training crops")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = AttributeNet(model_config).to(device)
    use_amp, amp_dtype = _amp(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    if config.imbalance == "pos_weight":
        pos_weight = positive_weights(train.targets, config.max_pos_weight)
    else:
        pos_weight = np.ones(len(HEADS), dtype=np.float32)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pos_weight, device=device))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN, PReLU, biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    loader = _loader(train, config, device, shuffle=True, gen=gen)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_with_warmup(total, int(config.warmup_epochs * steps_per_epoch), config.min_lr_ratio)
    )
    size = model_config.input_size
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        loss_sum, seen, te = 0.0, 0, time.perf_counter()
        for crops, targets in loader:
            x = to_input(crops, device, size)
            y = targets.to(device, non_blocking=True)
            if config.hflip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x[flip.to(device)] = x[flip.to(device)].flip(-1)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
            loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += float(loss.detach()) * len(x)
            seen += len(x)
        rec = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, seen),
            "lr": float(sched.get_last_lr()[0]),
            "seconds": time.perf_counter() - te,
        }
        history.append(rec)
        log.info("attributes epoch %d/%d loss %.4f (%.1fs)", epoch + 1, config.epochs, rec["loss"], rec["seconds"])
        if on_epoch is not None:
            on_epoch(rec)
    model.eval()
    thresholds = dict.fromkeys(HEADS, BINARY_THRESHOLD)
    calib_metrics: dict[str, Any] = {}
    if calibration is not None and len(calibration):
        probs = predict(model, calibration, config.batch_size, device)
        thresholds = {h: choose_threshold(probs[:, i], calibration.targets[:, i]) for i, h in enumerate(HEADS)}
        calib_metrics = evaluate(probs, calibration.targets, thresholds)
    info = {
        "train_config": asdict(config),
        "imbalance": config.imbalance,
        "pos_weight": dict(zip(HEADS, pos_weight.tolist(), strict=True)),
        "train_samples": len(train),
        "train_positive_rate": dict(zip(HEADS, train.targets.mean(axis=0).tolist(), strict=True)),
        "calibration_samples": 0 if calibration is None else len(calibration),
        "calibration_metrics": calib_metrics,
        "device": str(device),
        "amp": str(amp_dtype).removeprefix("torch.") if use_amp else "off",
        "seconds": time.perf_counter() - t0,
    }
    return TrainResult(model, thresholds, history, info)
