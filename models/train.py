"""CLIB-FIQA training: stage 1 (joint factor learning) -> confidence pass -> stage 2 (calibrated targets).

Data-source agnostic: the caller passes sample ids, anchors, factor labels and
an image source (in-memory array or packed crop files). Shuffling and flips
are seeded per epoch, so a run resumed from an epoch checkpoint continues
exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from data_manifest.vocabulary import FACTOR_CLASSES, FACTORS, QUALITY_ANCHORS, QUALITY_LEVELS, prompts
from models import checkpoints
from models.clib import MAX_LOGIT_SCALE, ClibConfig, ClibFiqa
from models.config import from_mapping
from models.crop_sources import ArrayImages, ImageSource  # noqa: F401  (re-exported: the trainer's inputs)
from models.devices import resolve_device
from models.losses import (
    BETA,
    FOCAL_GAMMA,
    IGNORE_INDEX,
    LAMBDA_EMD,
    clib_loss,
    confidence,
    emd_loss,
    js_divergence,
    official_emd_loss,
    official_js,
    soft_quality_targets,
)

CHECKPOINT_FORMAT = "clib-fiqa/1"
SCHEDULES = ("cosine", "official")


@dataclass
class TrainConfig:
    """Run configuration of a CLIB-FIQA training; stored in every checkpoint."""

    stage1_epochs: int = 5  # joint factor learning (paper Sec. 4.1)
    stage2_epochs: int = 20  # training on confidence-calibrated targets
    batch_size: int = 256  # global batch: under DDP each of the W ranks takes batch_size / W
    lr: float = 1e-5  # image tower + temperature (official code's value; the paper gives none)
    mlp_lr: float = 1e-3  # merged-factor MLP (official code: 100 x lr)
    weight_decay: float = 1e-3  # AdamW, decoupled
    grad_clip: float = 5.0  # max L2 norm, per parameter group
    beta: float = BETA  # soft mapping (Eq. 1) and confidence (Eq. 8)
    lambda_emd: float = LAMBDA_EMD  # Eq. 7
    gamma: float = FOCAL_GAMMA  # Eq. 5
    distance: str = "abs"  # soft mapping distance: "abs" (paper) or "squared" (official code)
    official_losses: bool = False  # batch-mean focal loss summed over factors + RMS CDF distance (official code)
    official_js: bool = False  # double softmax + reversed KL in the confidence (official code)
    schedule: str = "cosine"  # "cosine": one cosine over the whole run; "official": period-10-epoch cosine
    logit_scale_max: float | None = MAX_LOGIT_SCALE  # clamp of log(1/tau) after each step (CLIP); None: free (official)
    freeze_visual_positional_embedding: bool = False  # official: its name match freezes visual.*positional_embedding
    flip_p: float = 0.5  # random horizontal flip probability
    num_workers: int = 4  # DataLoader worker processes reading crops
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available
    bf16: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True
    deterministic: bool = True  # deterministic kernels on CPU
    keep_epochs: int | None = None  # per-epoch checkpoints kept (the newest); None: all; last.pt is always kept

    def __post_init__(self) -> None:
        if self.keep_epochs is not None and self.keep_epochs < 0:
            raise ValueError(f"keep_epochs must be >= 0 or None, got {self.keep_epochs}")
        if self.distance not in ("abs", "squared"):
            raise ValueError(f"distance must be 'abs' or 'squared', got {self.distance!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.stage1_epochs < 1 or self.stage2_epochs < 0:
            raise ValueError(f"need stage1_epochs >= 1 and stage2_epochs >= 0, got {self.stage1_epochs}, "
                             f"{self.stage2_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.logit_scale_max is not None and not math.isfinite(self.logit_scale_max):
            raise ValueError(f"logit_scale_max must be finite or None, got {self.logit_scale_max}")

    @property
    def total_epochs(self) -> int:
        return self.stage1_epochs + self.stage2_epochs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a JSON mapping, refusing unknown keys."""
        return from_mapping(cls, d, "train config")

    def rank_batch_size(self, world: int) -> int:
        """Per-rank batch under DDP, so the global batch (and with it the learning rate's meaning) stays batch_size."""
        if world < 1 or self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} (the global batch) must divide evenly over {world} ranks")
        return self.batch_size // world


class PackedCrops:
    """Crops in packed crop files of a workspace, addressed by (crop_file, crop_index) per sample."""

    def __init__(self, root: str | os.PathLike[str], crop_files: Sequence[str], crop_indices: Sequence[int]) -> None:
        if len(crop_files) != len(crop_indices):
            raise ValueError(f"{len(crop_files)} crop files but {len(crop_indices)} crop indices")
        self.root = str(root)
        files = np.asarray(crop_files, dtype=object)
        self.file_names, self.file_ids = np.unique(files, return_inverse=True)
        self.crop_indices = np.asarray(crop_indices, dtype=np.int64)
        self._reader: Any = None

    def __len__(self) -> int:
        return len(self.crop_indices)

    def read(self, indices: np.ndarray) -> np.ndarray:
        if self._reader is None:  # opened lazily in each DataLoader worker
            from data_manifest.crops import PackReader

            self._reader = PackReader(Path(self.root))
        indices = np.asarray(indices)
        fids = self.file_ids[indices]
        out: np.ndarray | None = None
        for fid in np.unique(fids):
            sel = np.nonzero(fids == fid)[0]
            crops = self._reader.read(str(self.file_names[fid]), self.crop_indices[indices[sel]])
            if out is None:
                out = np.empty((len(indices), *crops.shape[1:]), dtype=np.uint8)
            out[sel] = crops
        if out is None:
            raise ValueError("read: no indices given")
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}


@dataclass
class TrainingData:
    """The training set: per sample an id, an anchor in [0, 1], five factor labels and a crop."""

    sample_ids: list[str]
    anchors: np.ndarray  # (N,) float
    labels: np.ndarray  # (N, 5) int class indices in FACTORS order, IGNORE_INDEX = missing
    images: Any  # ImageSource
    meta: dict[str, Any] = field(default_factory=dict)  # where it came from (query, runs, ...)

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        self.anchors = np.asarray(self.anchors, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if n == 0:
            raise ValueError("the training set is empty")
        if self.anchors.shape != (n,) or self.labels.shape != (n, len(FACTORS)) or len(self.images) != n:
            raise ValueError(f"training set sizes disagree: {n} ids, anchors {self.anchors.shape}, labels "
                             f"{self.labels.shape}, {len(self.images)} images")
        if not np.isfinite(self.anchors).all():
            raise ValueError("training anchors contain NaN/inf; filter those samples out in the query")
        for m, f in enumerate(FACTORS):
            col = self.labels[:, m]
            bad = (col != IGNORE_INDEX) & ((col < 0) | (col >= len(FACTOR_CLASSES[f])))
            if bad.any():
                raise ValueError(f"factor {f}: class index {int(col[bad][0])} out of range")

    def fingerprint(self) -> str:
        """A hash of the sample order and anchors: a resume must see the same training set."""
        h = hashlib.sha256()
        h.update("\n".join(self.sample_ids).encode())
        h.update(self.anchors.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {"n_samples": len(self.sample_ids), "fingerprint": self.fingerprint(),
                "anchor_min": float(self.anchors.min()), "anchor_max": float(self.anchors.max()),
                "anchor_mean": float(self.anchors.mean()), **self.meta}


@dataclass
class TrainResult:
    checkpoint: Path
    rho: np.ndarray  # (N,) confidence per sample, in training-set order
    history: list[dict[str, Any]]


class _Crops(Dataset):
    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        return i, torch.from_numpy(np.ascontiguousarray(self.images.read(np.asarray([i]))[0]))

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        arr = self.images.read(np.asarray(idx))
        return torch.as_tensor(idx), torch.from_numpy(np.ascontiguousarray(arr))


def _collate(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, tuple):  # from __getitems__
        return batch
    idx, imgs = zip(*batch, strict=True)
    return torch.as_tensor(idx), torch.stack(imgs)


class _EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, optionally this rank's slice of it (DDP)."""

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.epoch, self.shuffle, self.rank, self.world = n, seed, epoch, shuffle, rank, world

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        if self.world > 1:  # pad (like DistributedSampler) so every rank takes the same number of steps
            order += order[: (-len(order)) % self.world]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self._order())

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) if self.world > 1 else self.n


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a global step."""
    total = config.total_epochs * steps_per_epoch
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    # Official: CosineAnnealingLR(T_max=5) stepped per epoch, skipping an epoch whose lr would be 0.
    epoch = step // steps_per_epoch
    e = 0
    for _ in range(epoch + 1):
        if abs(0.5 * (1 + math.cos(math.pi * e / 5))) < 1e-12:
            e += 1
        cur = e
        e += 1
    return 0.5 * (1.0 + math.cos(math.pi * cur / 5))


class _Dist:
    """torchrun/DDP context: rank, world size, device."""

    def __init__(self, config: TrainConfig) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        else:
            self.device = resolve_device(config.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def prune_epoch_checkpoints(folder: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` epoch-NNN.pt files of a run (None keeps every one); returns the deleted."""
    if keep is None:
        return []
    epochs = sorted(Path(folder).glob("epoch-[0-9][0-9][0-9].pt"))
    doomed = epochs[: max(len(epochs) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file + rename)."""
    return checkpoints.save(payload, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: a file that carries code is refused."""
    return checkpoints.load(path, CHECKPOINT_FORMAT, "CLIB-FIQA checkpoint")


def model_from_checkpoint(ckpt: dict[str, Any]) -> ClibFiqa:
    """Rebuild the architecture (no pretrained download) and load the saved weights."""
    cfg = ClibConfig.from_dict(ckpt["model_config"])
    model = ClibFiqa.from_config(cfg, load_pretrained=False)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit {cfg.model_name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if ckpt.get("prompts") is not None and list(ckpt["prompts"]) != prompts():
        raise ValueError("checkpoint prompt order differs from data_manifest.vocabulary.prompts()")
    return model


def train(
    model_config: ClibConfig,
    data: TrainingData,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: str | os.PathLike[str] | None = None,
    stop_after_epoch: int | None = None,
    on_confidence: Callable[[np.ndarray], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Run stage 1, the confidence pass and stage 2, writing a checkpoint after every epoch.

    Args:
        resume: a checkpoint of this run to continue from (same data and config).
        stop_after_epoch: stop after this many completed epochs (for interruption tests).
        on_confidence: called once with rho (N,) after the confidence pass (or on resume).
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(model_config, data, config, Path(out_dir), resume, stop_after_epoch, on_confidence, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(model_config: ClibConfig, data: TrainingData, config: TrainConfig, out: Path,
           resume: str | os.PathLike[str] | None, stop_after_epoch: int | None,
           on_confidence: Callable[[np.ndarray], None] | None, log: Callable[[str], None] | None) -> TrainResult:
    dist = _Dist(config)
    device = dist.device
    _seed_everything(config, device)
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        _check_resume(ckpt, Path(resume), model_config, config, data)
        model = model_from_checkpoint(ckpt)
    else:
        model = ClibFiqa.from_config(model_config)
    if config.freeze_visual_positional_embedding:
        model.freeze_visual_positional_embeddings()
    model.to(device)
    if config.channels_last:
        model.set_channels_last(True)

    groups = model.trainable_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups["main"], "lr": config.lr}, {"params": groups["mlp"], "lr": config.mlp_lr}],
        lr=config.lr, weight_decay=config.weight_decay,
    )
    n = len(data.sample_ids)
    steps_per_epoch = math.ceil(math.ceil(n / dist.world) / config.rank_batch_size(dist.world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(config, s, steps_per_epoch))

    start_epoch, rho, history = 0, None, []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        rho = ckpt.get("rho")
        history = list(ckpt.get("history", []))
        if rho is not None and on_confidence is not None and dist.main:
            on_confidence(rho.numpy())

    net: torch.nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)

    anchors = torch.from_numpy(data.anchors).to(device)
    labels = torch.from_numpy(data.labels).to(device)
    dataset = _Crops(data.images)
    base = {"model_config": model_config.to_dict(), "train_config": asdict(config), "data": data.summary()}
    last = out / "last.pt"

    def _payload(epoch: int) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, **base, "prompts": prompts(), "factor_classes":
                {k: list(v) for k, v in FACTOR_CLASSES.items()}, "quality_levels": list(QUALITY_LEVELS),
                "quality_anchors": list(QUALITY_ANCHORS), "epoch": epoch, "model": model.state_for_checkpoint(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rho": None if rho is None else rho.cpu(), "history": history}

    for epoch in range(start_epoch, config.total_epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        stage = 1 if epoch < config.stage1_epochs else 2
        if stage == 2 and rho is None:
            rho = _confidence_pass(model, dataset, config, dist)
            if dist.main:
                save_checkpoint(last, _payload(epoch))
                if on_confidence is not None:
                    on_confidence(rho.numpy())
        t0 = time.perf_counter()
        stats = _run_epoch(net, model, dataset, optimizer, scheduler, anchors, labels,
                           rho.to(device) if stage == 2 else None, config, dist, epoch, steps_per_epoch)
        stats.update(epoch=epoch + 1, stage=stage, seconds=round(time.perf_counter() - t0, 3),
                     lr=optimizer.param_groups[0]["lr"])
        history.append(stats)
        if log is not None and dist.main:
            log(json.dumps(stats))
        if dist.main:
            payload = _payload(epoch + 1)
            save_checkpoint(out / f"epoch-{epoch + 1:03d}.pt", payload)
            save_checkpoint(last, payload)
            prune_epoch_checkpoints(out, config.keep_epochs)
        dist.barrier()

    finished = stop_after_epoch is None or stop_after_epoch >= config.total_epochs
    if rho is None and finished:  # a stage-1-only run still calibrates its training set
        rho = _confidence_pass(model, dataset, config, dist)
        if dist.main:
            save_checkpoint(last, _payload(config.total_epochs))
            if on_confidence is not None:
                on_confidence(rho.numpy())
    rho_np = np.full(n, np.nan, dtype=np.float32) if rho is None else rho.numpy()
    return TrainResult(last, rho_np, history)


def _seed_everything(config: TrainConfig, device: torch.device) -> None:
    import random

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    if device.type == "cpu" and config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


RESUME_HINT = ("a resumed run (`--resume CKPT`, or `--run-id` of a run that has a last.pt) needs the options and "
               "training set it was started with")


def _check_resume(ckpt: dict[str, Any], path: Path, model_config: ClibConfig, config: TrainConfig,
                  data: TrainingData) -> None:
    """Refuse a resume whose model config, run config or training set differs from the checkpoint's."""
    if ClibConfig.from_dict(ckpt["model_config"]).to_dict() != model_config.to_dict():  # missing keys: defaults
        raise ValueError(f"cannot resume from {path}: the model config differs from the checkpoint's "
                         f"{ckpt['model_config']}; {RESUME_HINT}")
    mine = asdict(config)
    saved = asdict(TrainConfig()) | dict(ckpt["train_config"])  # a key added since the checkpoint: its default
    volatile = ("num_workers", "device", "keep_epochs")
    diff = {k: (saved.get(k), mine[k]) for k in mine if k not in volatile and saved.get(k) != mine[k]}
    if diff:
        raise ValueError(f"cannot resume from {path}: the run config differs from the checkpoint's (saved, given): "
                         f"{diff}; {RESUME_HINT}")
    if ckpt["data"]["fingerprint"] != data.fingerprint():
        raise ValueError(f"cannot resume from {path}: the training set (sample order, anchors or labels) differs "
                         f"from the checkpoint's; {RESUME_HINT}")


def crop_loader(images: Any, batch_size: int, *, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                epoch: int = 0, rank: int = 0, world: int = 1, pin_memory: bool = False) -> DataLoader:
    """Batches of (sample index, uint8 crops (B, H, W, 3)) in a seeded per-epoch order; workers read the crops."""
    dataset = images if isinstance(images, _Crops) else _Crops(images)
    sampler = _EpochSampler(len(dataset), seed, epoch, shuffle, rank, world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=_collate, pin_memory=pin_memory, persistent_workers=False, drop_last=False)


def _loader(dataset: Dataset, config: TrainConfig, dist: _Dist, epoch: int, shuffle: bool) -> DataLoader:
    return crop_loader(dataset, config.rank_batch_size(dist.world), num_workers=config.num_workers, shuffle=shuffle,
                       seed=config.seed, epoch=epoch, rank=dist.rank, world=dist.world,
                       pin_memory=dist.device.type == "cuda")


def _autocast(config: TrainConfig, device: torch.device) -> Any:
    enabled = config.bf16 and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _run_epoch(net: torch.nn.Module, model: ClibFiqa, dataset: Dataset, optimizer: torch.optim.Optimizer,
               scheduler: Any, anchors: Tensor, labels: Tensor, rho: Tensor | None, config: TrainConfig,
               dist: _Dist, epoch: int, steps_per_epoch: int) -> dict[str, Any]:
    model.train()
    device = dist.device
    flip_gen = torch.Generator().manual_seed(config.seed * 7_919 + epoch)
    stage1 = rho is None
    totals: dict[str, float] = {}
    count = 0
    groups = model.trainable_groups()
    for step, (idx, imgs) in enumerate(_loader(dataset, config, dist, epoch, shuffle=True)):
        if step >= steps_per_epoch:
            break
        flip = torch.rand(len(idx), generator=flip_gen) < config.flip_p
        imgs = torch.where(flip[:, None, None, None], imgs.flip(2), imgs).to(device, non_blocking=True)
        idx = idx.to(device)
        beta = config.beta if stage1 else config.beta * rho[idx]
        target = soft_quality_targets(anchors[idx], beta, distance=config.distance)
        parts = train_step(net, model, imgs, target, labels[idx], config, optimizer, groups, stage1=stage1)
        scheduler.step()
        b = len(idx)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v) * b
        count += b
    return {k: round(v / max(count, 1), 6) for k, v in totals.items()} | {"samples": count}


def train_step(net: torch.nn.Module, model: ClibFiqa, imgs: Tensor, target: Tensor, labels: Tensor,
               config: TrainConfig, optimizer: torch.optim.Optimizer, groups: dict[str, list[torch.nn.Parameter]],
               *, stage1: bool) -> dict[str, Tensor]:
    """One optimisation step on a batch: Eq. 7 (+ the MLP's fit to the targets in stage 1)."""
    with _autocast(config, imgs.device):
        out = net(imgs, with_mlp=stage1)
    loss, parts = clib_loss(out.quality, out.factors, target, labels, lambda_emd=config.lambda_emd,
                            gamma=config.gamma, official=config.official_losses)
    if stage1:
        mlp_fn = official_emd_loss if config.official_losses else emd_loss
        mlp_loss = mlp_fn(out.extra["merged"], target)
        loss = loss + mlp_loss
        parts["mlp"] = mlp_loss.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(groups["main"], config.grad_clip)
        torch.nn.utils.clip_grad_norm_(groups["mlp"], config.grad_clip)
    optimizer.step()
    model.clamp_temperature(config.logit_scale_max)
    return parts


@torch.no_grad()
def _confidence_pass(model: ClibFiqa, dataset: Dataset, config: TrainConfig, dist: _Dist) -> Tensor:
    """rho per sample (Eq. 8-9): JS between P(h^q|x) and the MLP's merged-factor distribution."""
    model.eval()
    n = len(dataset)
    rho = torch.full((n,), float("nan"))
    js_fn = official_js if config.official_js else js_divergence
    for idx, imgs in _loader(dataset, config, dist, 0, shuffle=False):
        with _autocast(config, dist.device):
            out = model(imgs.to(dist.device), with_mlp=True)
        js = js_fn(out.quality.float(), out.extra["merged"].float())
        rho[idx] = confidence(js, config.beta).cpu()
    if dist.world > 1:
        import torch.distributed as dist_mod

        parts: list[Tensor | None] = [None] * dist.world
        dist_mod.all_gather_object(parts, rho)
        stacked = torch.stack([p for p in parts if p is not None])
        rho = torch.nanmean(stacked, dim=0)
    model.train()
    return rho
