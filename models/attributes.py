"""The attribute CNN: one backbone, three binary heads (obstructed, exaggerated, extreme lighting).

Architectures are configured from JSON (`models/configs/attributes_*.json`):
`mobilefacenet` (Chen et al. 2018, inverted residuals + global depthwise
conv) or `resnet18` (basic blocks). The checkpoint is a plain dict of
tensors and primitives, loadable with `torch.load(weights_only=True)`, that
carries the config, label semantics, decision thresholds and validation
metrics, so a labeller needs nothing but the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data_manifest.vocabulary import BINARY_THRESHOLD, FACTOR_CLASSES
from models import checkpoints
from models.config import from_mapping

CONFIG_DIR = Path(__file__).with_name("configs")
CHECKPOINT_FORMAT = "fiqa-attributes/1"

# Head order of the logits tensor; each head predicts the probability of the factor's adverse class (index 0).
HEADS: tuple[str, ...] = ("occlusion", "expression", "lighting")
LABEL_SEMANTICS: dict[str, dict[str, str]] = {
    "occlusion": {"positive": FACTOR_CLASSES["occlusion"][0], "wider_rule": "occlusion in {1, 2} (partial or heavy)"},
    "expression": {"positive": FACTOR_CLASSES["expression"][0], "wider_rule": "expression == 1 (exaggerated)"},
    "lighting": {"positive": FACTOR_CLASSES["lighting"][0], "wider_rule": "illumination == 1 (extreme)"},
}
ARCHS = ("mobilefacenet", "resnet18")
MEAN = (0.5, 0.5, 0.5)  # input normalisation: (x / 255 - mean) / std, RGB
STD = (0.5, 0.5, 0.5)


@dataclass
class AttributeNetConfig:
    """Architecture of the attribute network (all sizes in channels)."""

    name: str = "attributes_mobilefacenet"
    arch: str = "mobilefacenet"  # mobilefacenet | resnet18
    input_size: int = 112  # square RGB input side
    stem_channels: int = 64  # 3x3 stride-2 stem conv
    # mobilefacenet: [expansion, channels, repeats, stride]; resnet18: [channels, blocks, stride]
    blocks: list[list[int]] = field(
        default_factory=lambda: [[2, 64, 5, 2], [4, 128, 1, 2], [2, 128, 6, 1], [4, 128, 1, 2], [2, 128, 2, 1]]
    )
    feature_channels: int = 512  # mobilefacenet: 1x1 conv before the global depthwise conv
    embedding_dim: int = 128  # shared embedding that feeds the three heads
    dropout: float = 0.2  # before the heads

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"attribute net {self.name!r}: unknown arch {self.arch!r}; known: {ARCHS}")
        width = 4 if self.arch == "mobilefacenet" else 3
        if not self.blocks or any(len(b) != width or min(b) < 1 for b in self.blocks):
            raise ValueError(
                f"attribute net {self.name!r}: each {self.arch} block needs {width} positive ints, got {self.blocks}"
            )
        if self.input_size < 16 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"attribute net {self.name!r}: bad input_size {self.input_size} or dropout {self.dropout}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributeNetConfig:
        """Build from a JSON mapping, refusing unknown keys."""
        return from_mapping(cls, data, "attribute-net config")


def available_configs() -> list[str]:
    """Names of the bundled configs (file stems of models/configs/attributes_*.json)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("attributes_*.json"))


def load_config(name_or_path: str | os.PathLike[str]) -> AttributeNetConfig:
    """A bundled config by name ('attributes_mobilefacenet' or 'mobilefacenet') or a JSON file path."""
    raw = str(name_or_path)
    path = Path(raw)
    if not path.suffix == ".json":
        stem = raw if raw.startswith("attributes_") else f"attributes_{raw}"
        path = CONFIG_DIR / f"{stem}.json"
    if not path.is_file():
        raise FileNotFoundError(f"attribute-net config {raw!r} not found (bundled: {available_configs()})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"attribute-net config {path} is not valid JSON: {e}") from e
    data.setdefault("name", path.stem)
    return AttributeNetConfig.from_dict(data)


def _conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    """MobileFaceNet bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            _conv_bn(cin, mid, 1, 1), _conv_bn(mid, mid, 3, stride, groups=mid), _conv_bn(mid, cout, 1, 1, act=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class _BasicBlock(nn.Module):
    """ResNet basic block with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 3x3 (or 1x1) conv with padding k // 2


def _mobilefacenet(cfg: AttributeNetConfig) -> nn.Sequential:
    c = cfg.stem_channels
    layers: list[nn.Module] = [_conv_bn(3, c, 3, 2), _conv_bn(c, c, 3, 1, groups=c)]
    size = _out_size(cfg.input_size, 2)
    for expansion, cout, repeats, stride in cfg.blocks:
        for i in range(repeats):
            s = stride if i == 0 else 1
            layers.append(_InvertedResidual(c, cout, s, expansion))
            size = _out_size(size, s)
            c = cout
    f = cfg.feature_channels
    layers += [
        _conv_bn(c, f, 1, 1),
        nn.Conv2d(f, f, size, 1, 0, groups=f, bias=False),  # global depthwise conv over the final map
        nn.BatchNorm2d(f),
        nn.Conv2d(f, cfg.embedding_dim, 1, bias=False),
        nn.BatchNorm2d(cfg.embedding_dim),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)


def _resnet18(cfg: AttributeNetConfig) -> nn.Sequential:
    c = cfg.stem_channels
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    for cout, blocks, stride in cfg.blocks:
        for i in range(blocks):
            layers.append(_BasicBlock(c, cout, stride if i == 0 else 1))
            c = cout
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, cfg.embedding_dim, bias=False),
        nn.BatchNorm1d(cfg.embedding_dim),
    ]
    return nn.Sequential(*layers)


class AttributeNet(nn.Module):
    """Shared backbone -> embedding -> one logit per head (order: HEADS)."""

    def __init__(self, config: AttributeNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _mobilefacenet(config) if config.arch == "mobilefacenet" else _resnet18(config)
        self.dropout = nn.Dropout(config.dropout)
        self.heads = nn.ModuleDict({h: nn.Linear(config.embedding_dim, 1) for h in HEADS})

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 3) for normalised float input (N, 3, S, S)."""
        emb = self.dropout(self.backbone(x))
        return torch.cat([self.heads[h](emb) for h in HEADS], dim=1)


def to_input(crops: np.ndarray | Tensor, device: torch.device | str = "cpu", size: int = 112) -> Tensor:
    """uint8 RGB crops (N, H, W, 3) -> normalised float (N, 3, size, size) on `device`."""
    x = torch.as_tensor(crops)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB crops of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def state_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict (sorted keys, raw bytes): identifies the weights."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_id(model: AttributeNet) -> str:
    """The labeller name written into `factors`: config name + 12 hex digits of the weights."""
    return f"{model.config.name}-{state_digest(model)[:12]}"


@dataclass
class AttributeCheckpoint:
    """A loaded checkpoint: the network (eval mode) and everything it was saved with."""

    model: AttributeNet
    model_id: str
    version: str
    thresholds: dict[str, float]
    metrics: dict[str, Any]
    meta: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike[str],
    model: AttributeNet,
    *,
    thresholds: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    version: str = "1",
) -> dict[str, Any]:
    """Write the checkpoint dict (config, weights, label semantics, thresholds, metrics) atomically."""
    thresholds = {h: float((thresholds or {}).get(h, BINARY_THRESHOLD)) for h in HEADS}
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_id": model_id(model),
        "version": version,
        "config": asdict(model.config),
        "heads": list(HEADS),
        "label_semantics": LABEL_SEMANTICS,
        "preprocess": {"input": "RGB uint8 112x112 aligned crop", "mean": list(MEAN), "std": list(STD)},
        "thresholds": thresholds,
        "metrics": json.loads(json.dumps(metrics or {}, default=float)),
        "train": json.loads(json.dumps(train or {}, default=float)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    checkpoints.save(ckpt, path)
    return ckpt


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> AttributeCheckpoint:
    """Load a checkpoint written by `save_checkpoint` (weights_only: no code runs on load)."""
    path = Path(path)
    ckpt = checkpoints.load(path, CHECKPOINT_FORMAT, "attribute checkpoint")
    if list(ckpt["heads"]) != list(HEADS):
        raise ValueError(f"{path}: heads {ckpt['heads']} do not match this code's {list(HEADS)}")
    model = AttributeNet(AttributeNetConfig.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit config {ckpt['config'].get('name')!r}: {e}") from e
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return AttributeCheckpoint(
        model=model,
        model_id=str(ckpt["model_id"]),
        version=str(ckpt.get("version", "1")),
        thresholds={h: float(ckpt["thresholds"][h]) for h in HEADS},
        metrics=dict(ckpt.get("metrics", {})),
        meta=meta,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.inference_mode()
def predict_proba(
    model: AttributeNet, crops: np.ndarray, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Adverse-class probabilities (N, 3) in HEADS order for uint8 RGB crops (N, H, W, 3), batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    out = np.empty((len(crops), len(HEADS)), dtype=np.float32)
    for start in range(0, len(crops), batch_size):
        x = to_input(crops[start : start + batch_size], device, model.config.input_size)
        out[start : start + len(x)] = torch.sigmoid(model(x).float()).cpu().numpy()
    return out
