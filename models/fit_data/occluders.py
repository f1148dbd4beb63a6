"""Seeded occluder synthesis on aligned 112x112 face crops: masks, bands, hands, sunglasses and more.

No real occluded-face data is reachable here, so the occlusion labeller is
trained and checked on real face crops with pasted occluders. To keep it from
learning paste artefacts rather than occluders, every occluder has soft edges,
random shape, colour, shading and texture (real photo textures from
scikit-image, the mask textures insightface ships, skin patches cut from real
faces), and "benign" pastes (hats above the brows, thin clear glasses, objects
beside the face) are made as UNOBSTRUCTED examples. Occluders are placed in a
face frame built from the five landmarks: u runs along the eye line in units
of the inter-ocular distance (0 between the eyes), v runs down, perpendicular
to it, in the same unit (0 on the eye line; the nose tip is near v=0.57 and
the mouth near v=1.16 in the ArcFace template).

The label rule is geometric: a crop is obstructed when the occluder covers at
least OBSTRUCTED_COVERAGE of one key region (either eye, the nose, the mouth).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from models.geometry import ARCFACE_TEMPLATE, CROP_SIZE

OBSTRUCTED_COVERAGE = 0.5  # mean occluder opacity over a key region that makes the face obstructed
KEY_REGIONS = ("left_eye", "right_eye", "nose", "mouth")
# Occluder families: each covers at least one key region. BENIGN pastes cover none (unobstructed examples).
FAMILIES: tuple[str, ...] = ("mask", "band", "scarf", "hand", "sunglasses", "microphone", "hair", "cap", "object")
LOWER_FACE_FAMILIES: tuple[str, ...] = ("mask", "band", "scarf", "hand", "microphone")
BENIGN = "benign"
# A training-only occluder: the labeller learns from it, the checks (which draw FAMILIES) never paste it.
PATCH = "patch"
MASK_TEXTURES = ("mask_white", "mask_blue", "mask_black", "mask_green")  # insightface package data
# Non-face scikit-image photos used as occluder textures, split so that a check can use textures never trained on.
FIT_TEXTURES = ("chelsea", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "coins", "moon")
HELD_OUT_TEXTURES = ("coffee", "rocket", "retina")


class OccluderError(ValueError):
    """Bad input to occluder synthesis (crop shape, landmarks, family name)."""


@dataclass(frozen=True)
class FaceFrame:
    """The face frame of an aligned crop: origin between the eyes, unit = inter-ocular distance."""

    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth corner, right mouth corner
    origin: np.ndarray
    right: np.ndarray  # unit vector along the eye line (image left -> right)
    down: np.ndarray  # unit vector perpendicular to it, pointing to the mouth
    iod: float

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray | None) -> FaceFrame:
        """Frame from five crop landmarks (None: the ArcFace template)."""
        pts = np.asarray(ARCFACE_TEMPLATE if landmarks is None else landmarks, dtype=np.float64)
        if pts.shape != (5, 2) or not np.isfinite(pts).all():
            raise OccluderError(f"landmarks must be 5 finite (x, y) points, got shape {pts.shape}")
        vec = pts[1] - pts[0]
        iod = float(np.hypot(*vec))
        if iod < 4.0:
            raise OccluderError(f"eyes are {iod:.1f} px apart; landmarks do not describe a face crop")
        right = vec / iod
        down = np.array([-right[1], right[0]])
        if np.dot(pts[3:].mean(axis=0) - pts[:2].mean(axis=0), down) < 0:
            down = -down
        return cls(pts, pts[:2].mean(axis=0), right, down, iod)

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        """(N, 2) face-frame points -> crop pixel coordinates."""
        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
        return self.origin + self.iod * (uv[:, :1] * self.right + uv[:, 1:] * self.down)

    def grid(self, size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """Face-frame (u, v) of every crop pixel centre, each (size, size)."""
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
        dx, dy = xs - self.origin[0], ys - self.origin[1]
        u = (dx * self.right[0] + dy * self.right[1]) / self.iod
        v = (dx * self.down[0] + dy * self.down[1]) / self.iod
        return u, v

    def point_uv(self, index: int) -> np.ndarray:
        """Face-frame coordinates of landmark `index`."""
        d = self.landmarks[index] - self.origin
        return np.array([d @ self.right, d @ self.down]) / self.iod


def key_regions(frame: FaceFrame, size: int = CROP_SIZE) -> dict[str, np.ndarray]:
    """Boolean masks of the key regions (ellipses around each eye, the nose, the mouth)."""
    u, v = frame.grid(size)
    le, re, nose = frame.point_uv(0), frame.point_uv(1), frame.point_uv(2)
    ml, mr = frame.point_uv(3), frame.point_uv(4)
    mouth = (ml + mr) / 2
    half_mouth = max(abs(mr[0] - ml[0]) / 2 + 0.08, 0.2)

    def ellipse(c: np.ndarray, a: float, b: float) -> np.ndarray:
        return ((u - c[0]) / a) ** 2 + ((v - c[1]) / b) ** 2 <= 1.0

    return {
        "left_eye": ellipse(le, 0.27, 0.16),
        "right_eye": ellipse(re, 0.27, 0.16),
        "nose": ellipse(nose - np.array([0.0, 0.12]), 0.2, 0.27),
        "mouth": ellipse(mouth, half_mouth, 0.17),
    }


def coverage(alpha: np.ndarray, frame: FaceFrame) -> dict[str, float]:
    """Mean occluder opacity over each key region."""
    return {k: float(alpha[m].mean()) if m.any() else 0.0 for k, m in key_regions(frame, alpha.shape[0]).items()}


def is_obstructed(cov: Mapping[str, float]) -> bool:
    """The label rule: some key region is covered at least OBSTRUCTED_COVERAGE."""
    return max(cov.values()) >= OBSTRUCTED_COVERAGE


# ----------------------------------------------------------------------------------------------- textures


def _insightface_dir() -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images"


@cache
def mask_texture(name: str) -> np.ndarray:
    """One of the surgical-mask textures insightface ships (RGB uint8)."""
    if name not in MASK_TEXTURES:
        raise OccluderError(f"unknown mask texture {name!r}; known: {MASK_TEXTURES}")
    path = _insightface_dir() / f"{name}.jpg"
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OccluderError(f"insightface does not ship a readable {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@cache
def photo_texture(name: str) -> np.ndarray:
    """A non-face scikit-image photo as an RGB uint8 texture."""
    if name not in FIT_TEXTURES + HELD_OUT_TEXTURES:
        raise OccluderError(f"unknown texture {name!r}; known: {FIT_TEXTURES + HELD_OUT_TEXTURES}")
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def skin_patch(crop: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
    """A square skin patch cut from a face's cheek below the eye (RGB uint8, 16x16), for hands."""
    frame = FaceFrame.from_landmarks(landmarks)
    side = max(6, int(round(0.28 * frame.iod)))
    patches = []
    for u in (-0.45, 0.45):
        c = frame.to_image(np.array([u, 0.55]))[0]
        x0, y0 = int(round(c[0] - side / 2)), int(round(c[1] - side / 2))
        x0, y0 = min(max(x0, 0), crop.shape[1] - side), min(max(y0, 0), crop.shape[0] - side)
        patches.append(crop[y0:y0 + side, x0:x0 + side])
    patch = patches[0] if patches[0].astype(float).std() <= patches[1].astype(float).std() else patches[1]
    return cv2.resize(patch, (16, 16), interpolation=cv2.INTER_AREA)


@dataclass
class TextureBank:
    """Where occluder colours come from: photo textures by split and real skin patches."""

    photos: tuple[str, ...] = FIT_TEXTURES
    masks: tuple[str, ...] = MASK_TEXTURES
    skins: list[np.ndarray] = field(default_factory=list)  # 16x16 RGB patches from real faces


def _random_crop(img: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    scale = rng.uniform(0.25, 1.0) * min(img.shape[0] / h, img.shape[1] / w)
    ch, cw = max(4, int(h * scale)), max(4, int(w * scale))
    y0 = int(rng.integers(0, img.shape[0] - ch + 1))
    x0 = int(rng.integers(0, img.shape[1] - cw + 1))
    return cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)


def _fabric(size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes or a plaid of two or three random colours, rotated (a scarf-like pattern)."""
    cols = rng.uniform(0, 255, (3, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(4, 18)
    t = (xx * np.cos(ang) + yy * np.sin(ang)) / period
    a = (np.floor(t) % 2)[..., None]
    img = cols[0] * a + cols[1] * (1 - a)
    if rng.random() < 0.5:
        t2 = (-xx * np.sin(ang) + yy * np.cos(ang)) / rng.uniform(4, 18)
        b = (np.floor(t2) % 2)[..., None]
        img = img * (1 - 0.5 * b) + cols[2] * 0.5 * b
    return np.clip(img, 0, 255).astype(np.uint8)


def _layer(bank: TextureBank, rng: np.random.Generator, size: int, kinds: tuple[str, ...]) -> np.ndarray:
    """A (size, size, 3) float colour layer of a random kind: solid, gradient, photo, fabric, skin, dark."""
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "photo" and bank.photos:
        img = _random_crop(photo_texture(bank.photos[int(rng.integers(len(bank.photos)))]), size, size, rng)
        out = img.astype(np.float64)
        if rng.random() < 0.3:
            out = out.mean(axis=2, keepdims=True).repeat(3, axis=2)
    elif kind == "fabric":
        out = _fabric(size, rng).astype(np.float64)
    elif kind == "skin" and bank.skins:
        patch = bank.skins[int(rng.integers(len(bank.skins)))].astype(np.float64)
        base = patch.reshape(-1, 3).mean(axis=0)
        tile = cv2.resize(patch, (size, size), interpolation=cv2.INTER_CUBIC)
        out = base + 0.6 * (tile - base) + rng.normal(0, 3.0, (size, size, 1))
    elif kind == "dark":
        out = np.full((size, size, 3), rng.uniform(5, 60)) + rng.normal(0, 6, 3)
    elif kind == "grey":
        out = np.full((size, size, 3), rng.uniform(30, 225))
    else:  # solid or gradient
        c0 = rng.uniform(0, 255, 3)
        out = np.broadcast_to(c0, (size, size, 3)).copy()
        if kind == "gradient":
            c1 = rng.uniform(0, 255, 3)
            t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
            out = c0 * (1 - t) + c1 * t
    return np.clip(out, 0, 255)


def _shade(layer: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth random shading (a 3D-ish fall-off across the face and a light direction) and mild noise."""
    du, dv = rng.normal(0, 0.15, 2)
    gain = 1.0 - rng.uniform(0, 0.25) * np.clip(u**2, 0, 2) + du * u + dv * (v - 1)
    gain = np.clip(gain * rng.uniform(0.7, 1.15), 0.2, 1.5)[..., None]
    return np.clip(layer * gain + rng.normal(0, rng.uniform(0, 5), layer.shape), 0, 255)


# ----------------------------------------------------------------------------------------------- shapes
# Each shape returns (alpha in [0, 1] before edge softening, colour layer) on the crop grid.

Shape = Callable[[FaceFrame, np.ndarray, np.ndarray, np.random.Generator, TextureBank], tuple[np.ndarray, np.ndarray]]


def _sheet_coords(u: np.ndarray, v: np.ndarray, top: np.ndarray, bottom: np.ndarray, half: np.ndarray):
    s = (u + half) / (2 * half)
    t = (v - top) / np.maximum(bottom - top, 1e-6)
    inside = (s >= 0) & (s <= 1) & (t >= 0) & (t <= 1)
    return s, t, inside


def face_mask(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, bank: TextureBank,
              top: float | None = None, texture: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A surgical / cloth mask from over the nose to under the chin, ear to ear, its texture bent onto the face.

    Placement follows insightface's mask renderer in spirit (texture rectangle from about a third of the face
    height to below the chin, 0.1-0.9 of the face width) but in 2D: top and bottom edges curve with the face.
    """
    nose_v = frame.point_uv(2)[1]
    top = float(rng.uniform(0.3, nose_v - 0.08)) if top is None else float(top)
    top_c = top + rng.uniform(0.05, 0.25) * u**2
    bottom = rng.uniform(1.75, 2.1) - rng.uniform(0.1, 0.3) * u**2
    half = rng.uniform(0.95, 1.25) - np.clip(v - 1.3, 0, None) * rng.uniform(0.2, 0.6)
    s, t, inside = _sheet_coords(u, v, top_c, bottom, np.maximum(half, 0.2))
    use_texture = texture is not None or (bank.masks and rng.random() < 0.7)
    if use_texture:
        name = texture or bank.masks[int(rng.integers(len(bank.masks)))]
        tex = mask_texture(name)
        h, w = tex.shape[:2]
        layer = cv2.remap(tex, (np.clip(s, 0, 1) * (w - 1)).astype(np.float32),
                          (np.clip(t, 0, 1) * (h - 1)).astype(np.float32), cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE).astype(np.float64)
        if rng.random() < 0.3:  # recolour the fabric, keep its folds
            grey = layer.mean(axis=2, keepdims=True) / 255.0
            layer = grey * rng.uniform(40, 255, 3)
    else:
        layer = _layer(bank, rng, u.shape[0], ("solid", "grey", "fabric", "photo", "dark"))
        folds = 1.0 - 0.12 * (np.sin(t * rng.uniform(12, 25)) > 0.7)
        layer = layer * folds[..., None]
    alpha = inside.astype(np.float64)
    if rng.random() < 0.6:  # ear loops
        for side in (-1, 1):
            p0 = frame.to_image(np.array([side * 1.0, top + 0.1]))[0]
            p1 = frame.to_image(np.array([side * 1.5, 0.3]))[0]
            loop = np.zeros_like(alpha)
            cv2.line(loop, tuple(int(x) for x in p0), tuple(int(x) for x in p1), 1.0, 1)
            alpha = np.maximum(alpha, loop)
    return alpha, layer


def band(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, bank: TextureBank,
         top: float | None = None, grey: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A flat band over the lower face: from `top` (face-frame v) down, across the face (grey, colour or photo)."""
    mouth_v = (frame.point_uv(3)[1] + frame.point_uv(4)[1]) / 2
    top = float(rng.uniform(0.35, mouth_v - 0.15)) if top is None else float(top)
    half = rng.uniform(0.8, 2.5)
    tilt = rng.normal(0, 0.08)
    alpha = ((v >= top + tilt * u) & (np.abs(u) <= half)).astype(np.float64)
    if grey is not None:
        layer = np.full((*u.shape, 3), float(grey))
    else:
        layer = _layer(bank, rng, u.shape[0], ("grey", "grey", "solid", "gradient", "photo"))
    return alpha, layer


def scarf(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
          bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A scarf or collar pulled up over the mouth: wavy top edge, fabric or photo texture."""
    mouth_v = (frame.point_uv(3)[1] + frame.point_uv(4)[1]) / 2
    top = rng.uniform(0.4, mouth_v - 0.12) + rng.uniform(0.02, 0.08) * np.sin(u * rng.uniform(3, 9) + rng.uniform(0, 6))
    top = top - rng.uniform(0, 0.2) * np.cos(np.clip(u, -1.5, 1.5))  # higher at the centre
    alpha = (v >= top).astype(np.float64)
    layer = _layer(bank, rng, u.shape[0], ("fabric", "fabric", "photo", "solid"))
    return alpha, layer


def _capsule(img: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float, value: float = 1.0) -> None:
    cv2.line(img, tuple(int(round(x * 16)) for x in p0), tuple(int(round(x * 16)) for x in p1), value,
             max(1, int(round(2 * radius))), cv2.LINE_AA, shift=4)


def hand(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
         bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A hand (palm and four fingers, skin tone from a real face's cheek) over the mouth, nose or an eye."""
    size = u.shape[0]
    target = rng.choice(["mouth", "mouth", "nose", "eye"])
    if target == "mouth":
        centre = (frame.point_uv(3) + frame.point_uv(4)) / 2
    elif target == "nose":
        centre = frame.point_uv(2)
    else:
        centre = frame.point_uv(int(rng.integers(2)))
    centre = centre + rng.normal(0, 0.1, 2)
    palm_r = rng.uniform(0.35, 0.55)
    ang = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(ang), np.sin(ang)])
    normal = np.array([-direction[1], direction[0]])
    palm_c = centre - direction * palm_r * rng.uniform(0.2, 0.9)
    alpha = np.zeros((size, size), np.float64)
    pc = frame.to_image(palm_c)[0]
    axes = (int(palm_r * frame.iod * 1.1), int(palm_r * frame.iod * 0.95))
    cv2.ellipse(alpha, (int(pc[0]), int(pc[1])), axes, float(np.degrees(ang)), 0, 360, 1.0, -1, cv2.LINE_AA)
    # the wrist leaves the crop away from the fingers
    _capsule(alpha, pc, frame.to_image(palm_c - direction * 3.0)[0], palm_r * frame.iod * 0.8)
    finger_r = palm_r * rng.uniform(0.17, 0.23) * frame.iod
    lines = np.zeros_like(alpha)
    for k, off in enumerate(np.linspace(-0.62, 0.62, 4)):
        base = palm_c + normal * off * palm_r + direction * palm_r * 0.6
        length = palm_r * rng.uniform(1.0, 1.6) * (0.8 if k in (0, 3) else 1.0)
        bend = direction + normal * rng.normal(0, 0.12)
        tip = base + bend / np.linalg.norm(bend) * length
        _capsule(alpha, frame.to_image(base)[0], frame.to_image(tip)[0], finger_r)
        _capsule(lines, frame.to_image(base)[0], frame.to_image(tip)[0], finger_r)
        _capsule(lines, frame.to_image(base)[0], frame.to_image(tip)[0], max(finger_r - 1.2, 0.5), 0.0)
    layer = _layer(bank, rng, size, ("skin", "skin", "skin", "solid"))
    layer = layer * (1.0 - 0.35 * cv2.GaussianBlur(lines, (0, 0), 0.7))[..., None]  # creases between fingers
    return np.clip(alpha, 0, 1), layer


def sunglasses(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
               bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """Dark (or mirrored) lenses over both eyes with a bridge and arms to the crop edge."""
    le, re = frame.point_uv(0), frame.point_uv(1)
    a, b = rng.uniform(0.3, 0.45), rng.uniform(0.2, 0.32)
    p = rng.uniform(2.0, 6.0)  # superellipse exponent: round to rectangular lenses
    dy = rng.normal(0.02, 0.04)
    alpha = np.zeros(u.shape, np.float64)
    for c in (le, re):
        lens = (np.abs((u - c[0]) / a) ** p + np.abs((v - c[1] - dy) / b) ** p) <= 1.0
        alpha = np.maximum(alpha, lens.astype(np.float64) * rng.uniform(0.85, 1.0))
    frame_w = max(1.0, rng.uniform(0.03, 0.07) * frame.iod)
    arm = np.zeros_like(alpha)
    _capsule(arm, frame.to_image(np.array([le[0] + a * 0.8, le[1] + dy - b * 0.5]))[0],
             frame.to_image(np.array([re[0] - a * 0.8, re[1] + dy - b * 0.5]))[0], frame_w)
    for c, side in ((le, -1), (re, 1)):
        _capsule(arm, frame.to_image(np.array([c[0] + side * a, c[1] + dy - b * 0.4]))[0],
                 frame.to_image(np.array([c[0] + side * 3.0, c[1] + dy - b * 0.2]))[0], frame_w)
    alpha = np.maximum(alpha, arm)
    layer = _layer(bank, rng, u.shape[0], ("dark", "dark", "dark", "photo", "solid"))
    glint = np.exp(-(((u - le[0] + 0.1) ** 2 + (v - le[1] + 0.1) ** 2) / 0.01)) * rng.uniform(0, 120)
    glint += np.exp(-(((u - re[0] + 0.1) ** 2 + (v - re[1] + 0.1) ** 2) / 0.01)) * rng.uniform(0, 120)
    return alpha, layer + glint[..., None]


def microphone(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
               bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A hand-held microphone: a meshed ball in front of the mouth and a handle leaving the crop."""
    size = u.shape[0]
    mouth = (frame.point_uv(3) + frame.point_uv(4)) / 2 + rng.normal(0, 0.08, 2)
    r = rng.uniform(0.42, 0.65)
    ball = np.clip((r - np.hypot(u - mouth[0], v - mouth[1])) * frame.iod, 0, 1)
    ang = rng.uniform(0.2 * np.pi, 0.8 * np.pi)  # handle points downwards
    tail = mouth + np.array([np.cos(ang), np.sin(ang)]) * 4.0
    handle = np.zeros((size, size), np.float64)
    _capsule(handle, frame.to_image(mouth)[0], frame.to_image(tail)[0], r * 0.45 * frame.iod)
    mesh_period = rng.uniform(0.06, 0.12)
    mesh = ((np.sin(u / mesh_period * np.pi) > 0.6) | (np.sin(v / mesh_period * np.pi) > 0.6)).astype(np.float64)
    base = rng.uniform(20, 200)
    ball_col = base * (1 - 0.35 * mesh) * (1 - 0.5 * np.clip(np.hypot(u - mouth[0], v - mouth[1]) / r, 0, 1) ** 2)
    handle_col = _layer(bank, rng, size, ("dark", "solid", "grey"))
    w = (ball > 0)[..., None]
    layer = np.where(w, ball_col[..., None] * np.ones(3), handle_col)
    return np.maximum(ball, handle), layer


def _hair_texture(size: int, rng: np.random.Generator, angle: float) -> np.ndarray:
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    k = np.zeros((15, 15), np.float32)
    k[7, :] = 1.0
    rot = cv2.getRotationMatrix2D((7, 7), float(np.degrees(angle)), 1.0)
    k = cv2.warpAffine(k, rot, (15, 15))
    strands = cv2.filter2D(noise, -1, k / max(k.sum(), 1e-6)).astype(np.float64)
    strands = (strands - strands.mean()) / (strands.std() + 1e-6)
    colour = np.array([[20, 15, 10], [60, 40, 25], [110, 75, 40], [190, 150, 90], [140, 60, 30], [90, 90, 90]],
                      np.float64)[int(rng.integers(6))]
    return np.clip(colour * (1 + 0.25 * strands[..., None]) + rng.normal(0, 6, 3), 0, 255)


def hair(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
         bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A lock of hair falling across one eye from above, ragged strand edges."""
    eye = frame.point_uv(int(rng.integers(2)))
    slope = rng.uniform(-0.6, 0.6)
    width = rng.uniform(0.3, 0.6)
    centre_u = eye[0] + rng.normal(0, 0.08) + slope * (v - eye[1])
    end_v = eye[1] + rng.uniform(0.3, 1.2)
    ragged = 0.06 * np.sin(v * rng.uniform(20, 40) + rng.uniform(0, 6))
    alpha = ((np.abs(u - centre_u) <= width / 2 + ragged) & (v <= end_v)).astype(np.float64)
    return alpha, _hair_texture(u.shape[0], rng, float(np.arctan2(1.0, slope)))


def cap(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, bank: TextureBank,
        bottom: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A cap or hat pulled down: everything above a curved brim at face-frame `bottom` (over the eyes)."""
    bottom = float(rng.uniform(0.12, 0.35)) if bottom is None else float(bottom)
    edge = bottom - rng.uniform(0.0, 0.15) * u**2 + rng.normal(0, 0.05) * u
    alpha = (v <= edge).astype(np.float64)
    layer = _layer(bank, rng, u.shape[0], ("solid", "fabric", "photo", "dark", "gradient"))
    brim_shadow = np.clip(1 - (edge - v) / 0.3, 0, 1)
    return alpha, layer * (1 - 0.3 * brim_shadow[..., None])


def blob(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
         bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A random star-shaped object with a photo texture over one key region (cup, phone, toy...)."""
    targets = [frame.point_uv(0), frame.point_uv(1), frame.point_uv(2), (frame.point_uv(3) + frame.point_uv(4)) / 2]
    c = targets[int(rng.integers(4))] + rng.normal(0, 0.08, 2)
    r0 = rng.uniform(0.4, 0.8)
    theta = np.arctan2(v - c[1], u - c[0])
    harmonics = sum(rng.normal(0, 0.12) * np.cos(k * theta + rng.uniform(0, 6)) for k in range(1, 5))
    alpha = (np.hypot(u - c[0], v - c[1]) <= r0 * (1 + harmonics)).astype(np.float64)
    layer = _layer(bank, rng, u.shape[0], ("photo", "photo", "solid", "gradient", "fabric"))
    return alpha, layer


def patch(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
          bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A compact rigid patch (card, phone, paper, sticker, a censor box): a rotated rectangle or ellipse of flat,
    grey or textured colour over an eye, both eyes, the nose or the mouth. Training only (PATCH)."""
    eyes = (frame.point_uv(0) + frame.point_uv(1)) / 2
    nose, mouth = frame.point_uv(2), (frame.point_uv(3) + frame.point_uv(4)) / 2
    targets = [frame.point_uv(0), frame.point_uv(1), eyes, nose, (nose + mouth) / 2, mouth]
    c = targets[int(rng.integers(len(targets)))] + rng.normal(0, 0.12, 2)
    hu, hv = rng.uniform(0.25, 0.9), rng.uniform(0.2, 0.8)
    ang = rng.normal(0, 0.3) if rng.random() < 0.7 else rng.uniform(0, np.pi)
    du, dv = u - c[0], v - c[1]
    pu, pv = du * np.cos(ang) + dv * np.sin(ang), -du * np.sin(ang) + dv * np.cos(ang)
    if rng.random() < 0.6:
        inside = (np.abs(pu) <= hu) & (np.abs(pv) <= hv)
    else:
        inside = (pu / hu) ** 2 + (pv / hv) ** 2 <= 1.0
    layer = _layer(bank, rng, u.shape[0], ("grey", "grey", "solid", "gradient", "photo", "fabric", "dark"))
    return inside.astype(np.float64), layer


def facial_hair(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
                full: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stubble (sparse dark dots, partly transparent) or a beard on chin and jaw that leaves the lips free.

    Faces, not occluders: benign examples so that a man's lower face does not read as covered.
    """
    nose_v = frame.point_uv(2)[1]
    ml, mr = frame.point_uv(3), frame.point_uv(4)
    mouth = (ml + mr) / 2
    half = np.clip(0.95 - 0.5 * np.clip(v - 1.4, 0, None), 0.2, None)
    area = (v >= nose_v + 0.12) & (np.abs(u) <= half)
    lips = (((u - mouth[0]) / (abs(mr[0] - ml[0]) / 2 + 0.05)) ** 2 + ((v - mouth[1]) / 0.12) ** 2) <= 1.0
    dots = (rng.random(u.shape) < rng.uniform(0.2, 0.6)).astype(np.float64)
    if full:
        area = area & (v >= mouth[1] + rng.uniform(0.1, 0.2)) | (area & ~lips & (rng.random() < 0.5))
        alpha = area * (0.35 + 0.4 * dots) * rng.uniform(0.6, 0.9)
    else:
        alpha = area * ~lips * dots * rng.uniform(0.15, 0.45)
    return alpha, _hair_texture(u.shape[0], rng, np.pi / 2) * rng.uniform(0.3, 1.0)


def benign(frame: FaceFrame, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
           bank: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """A paste that covers no key region: hat above the brows, clear thin glasses, an object beside the face."""
    kind = rng.choice(["hat", "glasses", "side", "collar", "fringe", "stubble", "beard"])
    if kind in ("stubble", "beard"):
        return facial_hair(frame, u, v, rng, full=kind == "beard")
    if kind == "hat":
        return cap(frame, u, v, rng, bank, bottom=float(rng.uniform(-0.9, -0.45)))
    if kind == "collar":
        return band(frame, u, v, rng, bank, top=float(rng.uniform(1.75, 2.1)))
    if kind == "fringe":
        alpha = (v <= rng.uniform(-0.9, -0.45) + 0.05 * np.sin(u * 25)).astype(np.float64)
        return alpha, _hair_texture(u.shape[0], rng, np.pi / 2)
    if kind == "glasses":
        le, re = frame.point_uv(0), frame.point_uv(1)
        a, b = rng.uniform(0.3, 0.42), rng.uniform(0.2, 0.3)
        width = rng.uniform(0.03, 0.06)
        alpha = np.zeros(u.shape, np.float64)
        for c in (le, re):
            r = np.sqrt(((u - c[0]) / a) ** 2 + ((v - c[1]) / b) ** 2)
            alpha = np.maximum(alpha, (np.abs(r - 1) <= width / b).astype(np.float64))
            alpha = np.maximum(alpha, (r < 1) * rng.uniform(0.0, 0.15))  # faint tint
        return alpha, _layer(bank, rng, u.shape[0], ("dark", "solid"))
    side = rng.choice([-1, 1])  # beside the face, outside the cheek line
    c = np.array([side * rng.uniform(1.35, 1.8), rng.uniform(-0.5, 1.8)])
    alpha = (np.hypot(u - c[0], v - c[1]) <= rng.uniform(0.2, 0.45)).astype(np.float64)
    return alpha, _layer(bank, rng, u.shape[0], ("photo", "solid", "fabric"))


SHAPES: dict[str, Shape] = {
    "mask": face_mask, "band": band, "scarf": scarf, "hand": hand, "sunglasses": sunglasses,
    "microphone": microphone, "hair": hair, "cap": cap, "object": blob, BENIGN: benign, PATCH: patch,
}


# ----------------------------------------------------------------------------------------------- compositing


@dataclass(frozen=True)
class Occluded:
    """A crop with a pasted occluder and what it covers."""

    image: np.ndarray  # (112, 112, 3) uint8 RGB
    alpha: np.ndarray  # (112, 112) float in [0, 1]: occluder opacity per pixel
    family: str
    coverage: dict[str, float]
    obstructed: bool


def check_crop(crop: np.ndarray) -> None:
    """Occluders are pasted on aligned CROP_SIZE x CROP_SIZE RGB uint8 crops."""
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.shape != (CROP_SIZE, CROP_SIZE, 3):
        got = f"{crop.dtype} {crop.shape}" if isinstance(crop, np.ndarray) else type(crop).__name__
        raise OccluderError(f"crop must be uint8 ({CROP_SIZE}, {CROP_SIZE}, 3) RGB, got {got}")


def composite(crop: np.ndarray, alpha: np.ndarray, layer: np.ndarray, edge_sigma: float = 0.0) -> np.ndarray:
    """crop * (1 - alpha) + layer * alpha, after softening alpha's edge with a Gaussian of `edge_sigma` px."""
    a = cv2.GaussianBlur(alpha, (0, 0), edge_sigma) if edge_sigma > 0 else alpha
    out = crop.astype(np.float64) * (1 - a[..., None]) + np.clip(layer, 0, 255) * a[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def paste(crop: np.ndarray, landmarks: np.ndarray | None, family: str, rng: np.random.Generator,
          bank: TextureBank | None = None, *, edge_sigma: float | None = None, max_tries: int = 8,
          **shape_kwargs: float | str) -> Occluded:
    """Paste one random occluder of `family` (or BENIGN) on an aligned crop; label it by the coverage rule.

    Occluder families are redrawn (up to `max_tries`) until the rule says obstructed, BENIGN pastes until it
    says unobstructed, so the family name and the label agree. `landmarks` are crop coordinates (None: the
    ArcFace template). `shape_kwargs` fix a shape parameter (e.g. band top, mask texture).
    """
    check_crop(crop)
    if family not in SHAPES:
        raise OccluderError(f"unknown occluder family {family!r}; known: {list(SHAPES)}")
    bank = bank or TextureBank()
    frame = FaceFrame.from_landmarks(landmarks)
    u, v = frame.grid(crop.shape[0])
    want = family != BENIGN
    for _ in range(max_tries):
        alpha, layer = SHAPES[family](frame, u, v, rng, bank, **shape_kwargs)
        layer = _shade(layer, u, v, rng)
        sigma = float(rng.uniform(0.4, 2.0)) if edge_sigma is None else float(edge_sigma)
        soft = np.clip(cv2.GaussianBlur(alpha, (0, 0), sigma) if sigma > 0 else alpha, 0.0, 1.0)
        cov = coverage(soft, frame)
        if is_obstructed(cov) == want:
            return Occluded(composite(crop, soft, layer), soft, family, cov, want)
    raise OccluderError(f"could not draw a {family!r} occluder that the coverage rule labels "
                        f"{'obstructed' if want else 'unobstructed'} in {max_tries} tries (coverage {cov})")
