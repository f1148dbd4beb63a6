"""Controlled, recorded image degradations (the package-shipped faces are `models.fit_data.face_sets.shipped_images`).

Used to build the demo dataset and the test identities: every variant records
its degradation kind and level, so a label or an anchor can be checked against
a known cause.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from pipeline.colour import REC709, to_linear, to_srgb

SEVERITY_LEVELS = (0, 1, 2, 3)


def gaussian_blur(img: np.ndarray, level: int) -> np.ndarray:
    """Gaussian blur, sigma = 0.8 * level * (short side / 112)."""
    if level == 0:
        return img.copy()
    sigma = 0.8 * level * min(img.shape[:2]) / 112
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)


def downscale(img: np.ndarray, level: int) -> np.ndarray:
    """Down- then up-sample by a factor 2**level (resolution loss at the same size)."""
    if level == 0:
        return img.copy()
    h, w = img.shape[:2]
    f = 2**level
    small = cv2.resize(img, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(img: np.ndarray, level: int) -> np.ndarray:
    """JPEG re-encoding at quality 90, 30, 12, 5 for levels 0..3."""
    q = (90, 30, 12, 5)[min(level, 3)]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def noise(img: np.ndarray, level: int, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise, std = 12 * level grey levels (seeded)."""
    if level == 0:
        return img.copy()
    rng = np.random.default_rng(seed + level)
    out = img.astype(np.float32) + rng.normal(0, 12.0 * level, img.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def occlusion(img: np.ndarray, level: int) -> np.ndarray:
    """A grey patch over the lower-central face; side = (0, 0.25, 0.4, 0.55) of the short side."""
    out = img.copy()
    if level == 0:
        return out
    h, w = img.shape[:2]
    side = int((0, 0.25, 0.4, 0.55)[min(level, 3)] * min(h, w))
    cy, cx = int(h * 0.62), w // 2
    out[max(0, cy - side // 2): cy + side // 2, max(0, cx - side // 2): cx + side // 2] = 90
    return out


def mask(img: np.ndarray, level: int) -> np.ndarray:
    """A light face-mask-like patch over mouth and chin of a loose face crop; it rises with the level.

    Unlike `occlusion`, it leaves eyes and nose visible, so detectors still find the face.
    """
    out = img.copy()
    if level == 0:
        return out
    h, w = img.shape[:2]
    top, bottom = int(h * (0.66, 0.62, 0.585)[min(level, 3) - 1]), int(h * 0.80)
    x0, x1, taper = int(w * 0.33), int(w * 0.67), max(1, w // 28)
    pts = np.array([[x0, top], [x1, top], [x1 - taper, bottom], [x0 + taper, bottom]], np.int32)
    cv2.fillPoly(out, [pts], (235, 235, 240))
    return out


def lighting(img: np.ndarray, level: int) -> np.ndarray:
    """A strong left-to-right illumination gradient (gain from 1 down to 1 - 0.3 * level) plus darkening."""
    if level == 0:
        return img.copy()
    w = img.shape[1]
    gain = np.linspace(1.0, max(0.05, 1.0 - 0.3 * level), w, dtype=np.float32)[None, :, None]
    return np.clip(img.astype(np.float32) * gain * (1.0 - 0.1 * level), 0, 255).astype(np.uint8)


DARK_LEVELS = ((1.5, 0.7), (2.0, 0.5), (3.0, 0.35))  # (gamma, gain) for levels 1..3
OVEREXPOSE_STOPS = (1.0, 2.0, 3.0)  # exposure added in linear light, in stops, for levels 1..3
SIDE_LIGHT_SHADOW = (0.25, 0.1, 0.03)  # linear-light gain of the shadowed side for levels 1..3


def _level(level: int, table: tuple[Any, ...], kind: str) -> Any:
    """The parameters of a level 1..len(table), with an error naming the degradation otherwise."""
    if not 1 <= level <= len(table):
        raise ValueError(f"{kind} level must be 0..{len(table)}, got {level}")
    return table[level - 1]


def dark(img: np.ndarray, level: int) -> np.ndarray:
    """Under-exposure: 255 * gain * (x / 255) ** gamma with (gamma, gain) = (1.5, 0.7), (2, 0.5), (3, 0.35)."""
    if level == 0:
        return img.copy()
    gamma, gain = _level(level, DARK_LEVELS, "dark")
    out = 255.0 * gain * (img.astype(np.float64) / 255.0) ** gamma
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overexpose(img: np.ndarray, level: int) -> np.ndarray:
    """Over-exposure: linear light times 2 ** stops (1, 2, 3 stops), clipped at white."""
    if level == 0:
        return img.copy()
    return to_srgb(to_linear(img) * 2.0 ** _level(level, OVEREXPOSE_STOPS, "overexpose"))


def side_light(img: np.ndarray, level: int) -> np.ndarray:
    """Strong side light: linear light kept on the image-left half, times 0.25 / 0.1 / 0.03 on the right.

    The gain falls smoothly (logistic, scale 5 % of the width) across the vertical centre line.
    """
    if level == 0:
        return img.copy()
    shadow = _level(level, SIDE_LIGHT_SHADOW, "side_light")
    w = img.shape[1]
    x = (np.arange(w, dtype=np.float64) + 0.5 - w / 2) / (0.05 * w)
    gain = shadow + (1.0 - shadow) / (1.0 + np.exp(x))
    return to_srgb(to_linear(img) * gain[None, :, None])


def rotation(img: np.ndarray, level: int) -> np.ndarray:
    """In-plane rotation by 10 * level degrees about the centre (border replicated)."""
    if level == 0:
        return img.copy()
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 10.0 * level, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def hflip(img: np.ndarray, level: int) -> np.ndarray:
    """Horizontal flip for any level > 0 (a mirror, not a quality loss)."""
    return img[:, ::-1].copy() if level else img.copy()


SKIN_CHROMA_SCALE = 0.05  # normalised (r, g) chromaticity distance at which a pixel is 1/e skin-like


def darker_skin(img: np.ndarray, region: np.ndarray, albedo: float = 0.25) -> np.ndarray:
    """A darker skin under the same light: skin pixels' linear light times `albedo`, smoothly weighted.

    A pixel's skin weight falls off with the distance of its (r, g) chromaticity from
    the median of the face `region` (bool HxW mask), smoothed over ~2 px, so forehead,
    neck and ears darken with the cheeks. Highlights (luminance between the region's
    90th and 99th percentiles and above), which skin albedo does not set, keep their
    light. A check of labellers, not a recorded degradation: a well-lit darker face
    must stay "normal lighting" and "unobstructed".
    """
    if not 0.0 < albedo <= 1.0:
        raise ValueError(f"albedo must be in (0, 1], got {albedo}")
    mask = np.asarray(region, dtype=bool)
    if mask.shape != img.shape[:2] or not mask.any():
        raise ValueError(f"region must be a non-empty {img.shape[:2]} mask, got {mask.shape}")
    lin = to_linear(img)
    y = lin @ REC709
    chroma = lin[..., :2] / np.maximum(lin.sum(axis=-1, keepdims=True), 1e-6)
    dist = np.linalg.norm(chroma - np.median(chroma[mask], axis=0), axis=-1)
    skin = cv2.GaussianBlur(np.exp(-((dist / SKIN_CHROMA_SCALE) ** 2)), (0, 0), 2.0)
    q90, q99 = np.percentile(y[mask], [90.0, 99.0])
    highlight = np.clip((y - q90) / max(q99 - q90, 1e-6), 0.0, 1.0)
    gain = 1.0 - (1.0 - albedo) * skin * (1.0 - highlight)
    return to_srgb(lin * gain[..., None])


DEGRADATIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "blur": gaussian_blur,
    "downscale": downscale,
    "jpeg": jpeg,
    "noise": noise,
    "occlusion": occlusion,
    "mask": mask,
    "lighting": lighting,
    "dark": dark,
    "overexpose": overexpose,
    "side_light": side_light,
    "rotation": rotation,
    "flip": hflip,
}


def degrade(img: np.ndarray, kind: str, level: int) -> np.ndarray:
    """Apply one named degradation at an integer level (0 = untouched)."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    if level < 0:
        raise ValueError(f"degradation level must be >= 0, got {level}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"degrade expects an RGB uint8 image, got {img.dtype} {img.shape}")
    return DEGRADATIONS[kind](img, level)
