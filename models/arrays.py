"""Small array checks and transforms every layer uses: the RGB image contract and row-wise L2 normalisation."""

from __future__ import annotations

import numpy as np


def require_rgb(image: object, what: str = "image") -> np.ndarray:
    """The image itself if it is an (H, W, 3) uint8 RGB array, else a ValueError naming what was given."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what} must be an RGB uint8 image (H, W, 3), got {desc}")
    return image



def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, eps)

