"""A synthetic dataset in the WIDER FACE layout, for tests and the tiny mode of `train_attributes`.

Each image holds a few drawn faces (skin-toned ellipse, eyes, brows, nose,
mouth) on a textured background. Attributes are drawn independently and
rendered visibly: occluders (partial: a band over the eyes or the mouth;
heavy: a block over most of the face), exaggerated expressions (open mouth,
raised brows, wide eyes) and extreme lighting (a steep brightness ramp over
the face, one side nearly black, the other blown out). Some faces are invalid
or tiny, and some images have no face, so the reader's skipping is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.readers.wider import SPLITS, split_layout


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and rates of the generated dataset."""

    images: int = 120  # per split
    width: int = 240
    height: int = 160
    faces_per_image: int = 2
    face_size: tuple[int, int] = (52, 76)  # box width range, pixels
    p_occlusion: float = 0.4
    p_expression: float = 0.4
    p_illumination: float = 0.4
    p_invalid: float = 0.05
    p_tiny: float = 0.05
    p_empty_image: float = 0.03


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    low = rng.uniform(40, 200, size=(max(2, h // 20), max(2, w // 20), 3)).astype(np.float32)
    bg = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    bg += rng.normal(0, 6, size=bg.shape).astype(np.float32)
    return bg


def _draw_face(
    rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int], attrs: dict[str, int]
) -> None:
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    skin = np.array([rng.uniform(150, 235), rng.uniform(110, 190), rng.uniform(90, 160)], np.float32)
    face = np.zeros(img.shape[:2], np.uint8)
    cv2.ellipse(face, (int(cx), int(cy)), (int(w * 0.45), int(h * 0.48)), 0, 0, 360, 255, -1)
    img[face > 0] = skin
    dark = (skin * 0.25).tolist()
    yaw = (rng.uniform(-0.12, 0.12) + (0.12 if attrs["pose"] else 0.0)) * w
    eye_y = int(y + h * 0.40)
    exaggerated = attrs["expression"] == 1
    eye_r = max(2, int(w * (0.09 if exaggerated else 0.06)))
    brow_y = int(y + h * (0.22 if exaggerated else 0.31))
    for side in (-1, 1):
        ex = int(cx + yaw + side * w * 0.2)
        cv2.circle(img, (ex, eye_y), eye_r + 1, (245, 245, 245), -1)
        cv2.circle(img, (ex, eye_y), max(1, eye_r // 2), dark, -1)
        cv2.line(img, (ex - eye_r - 2, brow_y + (side * 3 if exaggerated else 0)), (ex + eye_r + 2, brow_y), dark, 2)
    cv2.line(img, (int(cx + yaw), int(y + h * 0.45)), (int(cx + yaw * 1.3), int(y + h * 0.6)), dark, 2)
    mouth_c = (int(cx + yaw), int(y + h * 0.76))
    if exaggerated:
        cv2.ellipse(img, mouth_c, (int(w * 0.17), int(h * 0.11)), 0, 0, 360, (70, 20, 30), -1)
        cv2.ellipse(img, mouth_c, (int(w * 0.12), int(h * 0.04)), 0, 0, 180, (240, 240, 240), -1)
    else:
        cv2.ellipse(img, mouth_c, (int(w * 0.14), int(h * 0.03)), 0, 0, 180, (120, 40, 50), 2)
    occ = attrs["occlusion"]
    if occ:
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        if occ == 1:
            band = rng.integers(2)  # 0: eyes (sunglasses, scarf-like band), 1: mouth (hand, mask)
            y0 = int(y + h * (0.3 if band == 0 else 0.6))
            cv2.rectangle(img, (int(x + w * 0.05), y0), (int(x + w * 0.95), y0 + int(h * 0.25)), color, -1)
        else:
            side = rng.integers(2)
            x0 = int(x + w * (0.0 if side == 0 else 0.3))
            cv2.rectangle(img, (x0, int(y + h * 0.15)), (x0 + int(w * 0.7), int(y + h * 0.95)), color, -1)
    if attrs["blur"]:
        k = 3 + 2 * attrs["blur"]
        region = img[y : y + h, x : x + w]
        img[y : y + h, x : x + w] = cv2.GaussianBlur(region, (k, k), 0)


def _light(rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int]) -> None:
    x, y, w, h = box
    x0, y0 = max(0, x - w // 4), max(0, y - h // 4)
    x1, y1 = min(img.shape[1], x + w + w // 4), min(img.shape[0], y + h + h // 4)
    region = img[y0:y1, x0:x1]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
    t = (np.cos(angle) * (xx - xx.mean()) + np.sin(angle) * (yy - yy.mean())) / (0.5 * max(w, h))
    gain = np.clip(1.0 + 1.6 * t, 0.08, 3.0)  # one side nearly black, the other blown out
    region *= gain[..., None]


def make_split(root: str | Path, split: str, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0) -> Path:
    """Write images under <root>/WIDER_<split>/images and the ground truth under <root>/wider_face_split."""
    gt, images_dir = split_layout(root, split)
    rng = np.random.default_rng(seed + 10_007 * SPLITS.index(split))
    lines: list[str] = []
    for i in range(spec.images):
        event = f"{i % 3}--Event{i % 3}"
        rel = f"{event}/{i % 3}_Event{i % 3}_synthetic_{split}_{i}.jpg"
        img = _background(rng, spec.height, spec.width)
        faces: list[tuple[tuple[int, int, int, int], dict[str, int]]] = []
        n = 0 if rng.random() < spec.p_empty_image else spec.faces_per_image
        slot_w = spec.width // max(1, n)
        for k in range(n):
            tiny = rng.random() < spec.p_tiny
            w = int(rng.integers(8, 14)) if tiny else int(rng.integers(*spec.face_size))
            w = min(w, slot_w - 4)
            h = int(w * rng.uniform(1.1, 1.25))
            h = min(h, spec.height - 4)
            x = int(k * slot_w + rng.integers(2, max(3, slot_w - w - 1)))
            y = int(rng.integers(2, max(3, spec.height - h - 1)))
            p_occ = spec.p_occlusion
            attrs = {
                "blur": int(rng.integers(3)),
                "expression": int(rng.random() < spec.p_expression),
                "illumination": int(rng.random() < spec.p_illumination),
                "invalid": int(rng.random() < spec.p_invalid),
                "occlusion": int(rng.choice(3, p=[1 - p_occ, p_occ * 0.6, p_occ * 0.4])),
                "pose": int(rng.random() < 0.3),
            }
            _draw_face(rng, img, (x, y, w, h), attrs)
            if attrs["illumination"]:
                _light(rng, img, (x, y, w, h))
            faces.append(((x, y, w, h), attrs))
        path = images_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.clip(img, 0, 255).astype(np.uint8)
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        lines += [rel, str(len(faces))]
        if not faces:
            lines.append("0 0 0 0 0 0 0 0 0 0 ")
        for (x, y, w, h), a in faces:
            order = (a["blur"], a["expression"], a["illumination"], a["invalid"], a["occlusion"], a["pose"])
            lines.append(" ".join(str(v) for v in (x, y, w, h, *order)) + " ")
    gt.parent.mkdir(parents=True, exist_ok=True)
    gt.write_text("\n".join(lines) + "\n")
    return gt


def make_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0) -> Path:
    """Both splits in the WIDER FACE layout under `root`; returns `root`."""
    for split in SPLITS:
        make_split(root, split, spec, seed)
    return Path(root)
