"""Random access to uint8 RGB crops for the trainers: the protocol and its in-memory form."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ImageSource(Protocol):
    """Crops addressed by row: `len` and `read(indices) -> uint8 (B, H, W, 3)` (e.g. models.train.PackedCrops)."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray: ...


class ArrayImages:
    """An ImageSource over crops held in memory as a (N, H, W, 3) uint8 array."""

    def __init__(self, images: np.ndarray) -> None:
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {arr.dtype} {arr.shape}")
        self.images = arr

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices)]
