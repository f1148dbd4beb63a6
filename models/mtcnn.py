"""MTCNN face detector (Zhang et al. 2016): P/R/O-Net cascade with 5 landmarks.

Own implementation of the cascade; the network layouts match the PNet/RNet/ONet
state dicts shipped in the facenet-pytorch 2.6.0 wheel (MIT), which
`python -m models.fetch_weights` puts in the model store. Input is RGB uint8.
Internally boxes follow the reference's 1-based MATLAB arithmetic (so the
results match facenet-pytorch); `detect` returns boxes as given by that
arithmetic and landmarks in 0-based pixel-index coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from models.weights import mtcnn_paths

_NORM_MEAN = 127.5
_NORM_SCALE = 0.0078125  # 1 / 128, as the networks were trained


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    # The converted weights expect the (W, H, C) flatten order of the original Caffe model.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_transposed(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, 5 landmarks, face probability."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_transposed(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


@dataclass(frozen=True)
class MTCNNConfig:
    """Cascade settings; defaults are the published MTCNN values."""

    min_face_size: float = 20.0  # smallest face side searched, pixels
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # P/R/O-Net face probability cut-offs
    factor: float = 0.709  # pyramid scale step
    nms_pnet_scale: float = 0.5  # IoU NMS within one pyramid level
    nms_pnet: float = 0.7  # IoU NMS across levels
    nms_rnet: float = 0.7
    nms_onet: float = 0.7  # "Min" overlap (intersection / smaller area), as the reference


@dataclass
class MTCNNResult:
    """Detections of one image, sorted by score (descending)."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 (reference convention, about 1 px larger than 0-based)
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray  # (N, 5, 2) float32: left eye, right eye, nose, left mouth, right mouth (image left/right)


def _load_state(module: nn.Module, path: Path) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as e:
        raise RuntimeError(f"cannot load MTCNN weights from {path}: {e}") from e
    return module.eval()


def _square(boxes: torch.Tensor) -> torch.Tensor:
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    # Stage 1 measures the box size as x2 - x1, later stages as x2 - x1 + 1 (1-based inclusive), as the reference.
    wh = (boxes[:, 2:4] - boxes[:, 0:2] + (1.0 if inclusive else 0.0)).repeat(1, 2)
    return boxes + reg * wh


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS with overlap = intersection / min(area), highest score first."""
    order = torch.argsort(scores, descending=True)
    area = (boxes[:, 2] - boxes[:, 0] + 1).clamp(min=0) * (boxes[:, 3] - boxes[:, 1] + 1).clamp(min=0)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt + 1).clamp(min=0).prod(dim=1)
        overlap = inter / torch.minimum(area[i], area).clamp(min=1e-9)
        suppressed |= overlap > threshold
    return torch.tensor(keep, dtype=torch.long)


def _bins(lo: torch.Tensor, hi: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start/end indices of adaptive-average-pool bins over [lo, hi) for each box (torch's floor/ceil rule)."""
    n = (hi - lo)[:, None]
    i = torch.arange(size, device=lo.device)[None]
    return lo[:, None] + (i * n) // size, lo[:, None] + ((i + 1) * n + size - 1) // size


def _area_resize(sat: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor,
                 size: int) -> torch.Tensor:
    """Resize every integer box [x1, x2) x [y1, y2) to size x size exactly as F.interpolate(mode='area').

    Uses a summed-area table `sat` (C, H+1, W+1, float64), so all boxes go in one vectorised gather;
    pixels outside the image are zeros.
    """
    ys0, ys1 = _bins(y1, y2, size)
    xs0, xs1 = _bins(x1, x2, size)
    h, w = sat.shape[1] - 1, sat.shape[2] - 1

    def at(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        # Clamping the corners sums only in-image pixels: outside pixels count as zeros.
        ys, xs = ys.clamp(0, h), xs.clamp(0, w)
        return sat[:, ys[:, :, None], xs[:, None, :]]  # (C, N, size, size)

    total = at(ys1, xs1) - at(ys0, xs1) - at(ys1, xs0) + at(ys0, xs0)
    count = ((ys1 - ys0)[:, :, None] * (xs1 - xs0)[:, None, :]).to(total.dtype)
    return (total / count).permute(1, 0, 2, 3).to(torch.float32)


class MTCNN:
    """The three-stage cascade; `detect(rgb_uint8)` returns boxes, scores and 5 landmarks."""

    def __init__(
        self,
        config: MTCNNConfig | None = None,
        weights: dict[str, Path] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config or MTCNNConfig()
        paths = weights or mtcnn_paths()
        self.device = torch.device(device)
        self.pnet = _load_state(PNet(), paths["pnet"]).to(self.device)
        self.rnet = _load_state(RNet(), paths["rnet"]).to(self.device)
        self.onet = _load_state(ONet(), paths["onet"]).to(self.device)

    def _scales(self, h: int, w: int) -> list[float]:
        m = 12.0 / self.config.min_face_size
        minl = min(h, w) * m
        scales = []
        scale = m
        while minl >= 12:
            scales.append(scale)
            scale *= self.config.factor
            minl *= self.config.factor
        return scales

    def _crops(self, img: torch.Tensor, sat: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        # Boxes are 1-based (MATLAB) pixel boxes truncated to integers as the reference does; each integer
        # pixel range is area-resampled to size x size, reading pixels outside the image as 0 (zero padding,
        # as the original MTCNN; facenet-pytorch instead clamps the box to the image and stretches the crop).
        b = boxes.trunc().long()
        x1, y1 = b[:, 0] - 1, b[:, 1] - 1
        x2 = torch.maximum(b[:, 2], x1 + 1)
        y2 = torch.maximum(b[:, 3], y1 + 1)
        crops = _area_resize(sat, x1, y1, x2, y2, size)
        return (crops - _NORM_MEAN) * _NORM_SCALE

    @staticmethod
    def _integral(img: torch.Tensor) -> torch.Tensor:
        sat = img[0].to(torch.float64).cumsum(1).cumsum(2)
        return F.pad(sat, (1, 0, 1, 0))

    def _stage1(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[2:]
        cfg = self.config
        found = []
        for scale in self._scales(h, w):
            size = (int(h * scale + 1), int(w * scale + 1))
            data = (F.interpolate(img, size=size, mode="area") - _NORM_MEAN) * _NORM_SCALE
            reg, prob = self.pnet(data)
            score = prob[0, 1]
            ys, xs = torch.nonzero(score >= cfg.thresholds[0], as_tuple=True)
            if len(ys) == 0:
                continue
            # 1-based cell boxes of the 12x12 PNet window at stride 2, as in the reference MATLAB code.
            x1 = torch.floor((2 * xs + 1).float() / scale)
            y1 = torch.floor((2 * ys + 1).float() / scale)
            x2 = torch.floor((2 * xs + 12).float() / scale)
            y2 = torch.floor((2 * ys + 12).float() / scale)
            boxes = torch.stack([x1, y1, x2, y2], dim=1)
            cand = torch.cat([boxes, score[ys, xs, None], reg[0, :, ys, xs].T], dim=1)
            found.append(cand[nms(cand[:, :4], cand[:, 4], cfg.nms_pnet_scale)])
        if not found:
            return torch.zeros(0, 5, device=img.device)
        cand = torch.cat(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], cfg.nms_pnet)]
        boxes = _square(_regress(cand[:, :4], cand[:, 5:9], inclusive=False))
        return torch.cat([boxes, cand[:, 4:5]], dim=1)

    def _stage2(self, img: torch.Tensor, sat: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        reg, prob = self.rnet(self._crops(img, sat, cand[:, :4], 24))
        keep = prob[:, 1] > self.config.thresholds[1]
        boxes, score, reg = cand[keep, :4], prob[keep, 1], reg[keep]
        pick = nms(boxes, score, self.config.nms_rnet)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        return torch.cat([boxes, score[pick, None]], dim=1)

    def _stage3(
        self, img: torch.Tensor, sat: torch.Tensor, cand: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reg, lm, prob = self.onet(self._crops(img, sat, cand[:, :4], 48))
        keep = prob[:, 1] > self.config.thresholds[2]
        boxes, score, reg, lm = cand[keep, :4], prob[keep, 1], reg[keep], lm[keep]
        wh = boxes[:, 2:4] - boxes[:, 0:2] + 1
        # 1-based box -> 0-based pixel-index landmark coordinates.
        pts = torch.stack(
            [boxes[:, None, 0] - 1 + wh[:, None, 0] * lm[:, :5], boxes[:, None, 1] - 1 + wh[:, None, 1] * lm[:, 5:]],
            dim=2,
        )
        boxes = _regress(boxes, reg)
        pick = _nms_min(boxes, score, self.config.nms_onet)
        return boxes[pick], score[pick], pts[pick]

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> MTCNNResult:
        """Detect faces in one RGB uint8 image (H, W, 3)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"MTCNN.detect expects an RGB image of shape (H, W, 3), got {shape}")
        img = torch.from_numpy(image.astype(np.float32)).to(self.device).permute(2, 0, 1)[None]
        empty = MTCNNResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
        cand = self._stage1(img)
        if len(cand):
            sat = self._integral(img)
            cand = self._stage2(img, sat, cand)
        if not len(cand):
            return empty
        boxes, scores, pts = self._stage3(img, sat, cand)
        if not len(boxes):
            return empty
        order = torch.argsort(scores, descending=True)
        return MTCNNResult(
            boxes[order].cpu().numpy().astype(np.float32),
            scores[order].cpu().numpy().astype(np.float32),
            pts[order].cpu().numpy().astype(np.float32),
        )
