"""sRGB <-> linear light (IEC 61966-2-1) and Rec. 709 luminance weights, shared by degradations and lighting."""

from __future__ import annotations

import numpy as np

REC709 = np.array([0.2126, 0.7152, 0.0722])  # relative luminance of linear RGB
# Linear light of every 8-bit sRGB value: decoding a uint8 image is one table look-up.
_LEVELS = np.arange(256, dtype=np.float64) / 255.0
SRGB_TO_LINEAR = np.where(_LEVELS <= 0.04045, _LEVELS / 12.92, ((_LEVELS + 0.055) / 1.055) ** 2.4)


def to_linear(img: np.ndarray) -> np.ndarray:
    """sRGB uint8 -> linear light in 0..1, float64."""
    return SRGB_TO_LINEAR[np.asarray(img, dtype=np.uint8)]


def to_srgb(lin: np.ndarray) -> np.ndarray:
    """Linear light (clipped to 0..1) -> sRGB uint8, rounded."""
    v = np.clip(lin, 0.0, 1.0)
    s = np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(s * 255.0), 0, 255).astype(np.uint8)
