"""The embedded demo dataset: identities from package-shipped real faces, with recorded degradations.

Each real face becomes one identity (an ImageFolder sub-folder). Every variant
is one controlled degradation at one level, listed in `degradations.csv`, so the
demo can check each label and anchor against its known cause. A few broken
files show that bad input becomes a row with a reason, not a lost sample.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.fit_data.face_sets import shipped_images
from pipeline.synthetic.degrade import DEGRADATIONS, degrade

SOURCE_SIZE = 224  # side of each identity's loose face image
FULL_LEVELS = (1, 2, 3)
QUICK_LEVELS = (1, 3)
MANIFEST = "degradations.csv"
DATASET = "demo"  # the dataset name the demo ingests it under
IN_DEMO = f"sample_id IN (SELECT sample_id FROM samples WHERE dataset = '{DATASET}')"
MIN_FACE_SCORE = 0.95  # as models.fit_data.face_sets.real_faces: MTCNN also finds a "face" on a hand in t1.jpg
# The grey `occlusion` patch hides most of a loose face from detectors; the demo uses `mask` instead.
DEMO_KINDS = tuple(k for k in DEGRADATIONS if k != "occlusion")


@dataclass(frozen=True)
class Variant:
    path: str  # relative to the dataset root
    identity: str
    kind: str
    level: int


Box = Sequence[float]  # x1, y1, x2, y2


def loose_face(image: np.ndarray, box: Box, scale: float = 1.8, size: int = SOURCE_SIZE) -> np.ndarray:
    """A square crop `scale` times the face box around its centre (border replicated), resized to size."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * scale / 2
    m = np.array([[size / (2 * half), 0, size / 2 - cx * size / (2 * half)],
                  [0, size / (2 * half), size / 2 - cy * size / (2 * half)]], dtype=np.float64)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def identity_faces(detect: Callable[[np.ndarray], list[tuple[Box, float]]], min_side: float = 40.0,
                   max_identities: int | None = None) -> dict[str, np.ndarray]:
    """One loose face image per identity from the shipped images; `detect` gives (box, score) per face."""
    imgs = shipped_images()
    out: dict[str, np.ndarray] = {}
    # The aligned 112x112 crop: pad it so a detector sees a whole face with context.
    th = cv2.resize(imgs["tom_hanks"], (168, 168), interpolation=cv2.INTER_CUBIC)
    pad = (SOURCE_SIZE - th.shape[0]) // 2
    out["tom_hanks"] = cv2.copyMakeBorder(th, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    for name in ("astronaut", "t1"):
        faces = [(b, s) for b, s in detect(imgs[name]) if min(b[2] - b[0], b[3] - b[1]) >= min_side]
        faces.sort(key=lambda f: f[0][0])  # left to right: stable identity names
        if name == "astronaut":
            faces = sorted(faces, key=lambda f: -f[1])[:1]
        for i, (box, _) in enumerate(faces):
            out[name if name == "astronaut" else f"{name}_face{i}"] = loose_face(imgs[name], box)
    if max_identities is not None:
        out = dict(list(out.items())[:max_identities])
    return out


def build(root: Path, faces: dict[str, np.ndarray], levels: Sequence[int] = FULL_LEVELS,
          kinds: Sequence[str] = DEMO_KINDS, broken: bool = True) -> list[Variant]:
    """Write the dataset tree under root (identity/<kind>_<level>.png) and its degradations.csv."""
    root.mkdir(parents=True, exist_ok=True)
    variants: list[Variant] = []
    for ident, face in faces.items():
        d = root / ident
        d.mkdir(exist_ok=True)
        todo = [("clean", 0)] + [(k, lv) for k in kinds for lv in ((1,) if k == "flip" else levels)]
        for kind, level in todo:
            img = face if kind == "clean" else degrade(face, kind, level)
            rel = f"{ident}/{kind}_{level}.png"
            if not cv2.imwrite(str(root / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write {root / rel}")
            variants.append(Variant(rel, ident, kind, level))
    if broken:
        from skimage import data

        bad = root / "broken"
        bad.mkdir(exist_ok=True)
        jpg = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
        (bad / "truncated.jpg").write_bytes(jpg[:200])
        (bad / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
        coffee = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(bad / "no_face.png"), cv2.resize(coffee, (224, 150)))
        variants += [Variant("broken/truncated.jpg", "broken", "corrupt", 0),
                     Variant("broken/not_an_image.jpg", "broken", "corrupt", 0),
                     Variant("broken/no_face.png", "broken", "no_face", 0)]
    with open(root / MANIFEST, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "identity", "kind", "level"])
        for v in variants:
            w.writerow([v.path, v.identity, v.kind, v.level])
    return variants


def read_manifest(root: Path) -> list[Variant]:
    """The variants recorded in a built demo dataset."""
    with open(root / MANIFEST, newline="") as fh:
        return [Variant(r["path"], r["identity"], r["kind"], int(r["level"])) for r in csv.DictReader(fh)]


def build_or_read(root: Path, quick: bool) -> list[Variant]:
    """The demo dataset under root: read when already built, else built from the MTCNN-found shipped faces."""
    from models.detectors import MTCNNDetector

    if (root / MANIFEST).exists():
        return read_manifest(root)
    det = MTCNNDetector()
    faces = identity_faces(lambda im: [(d.box, d.score) for d in det.detect(im) if d.score >= MIN_FACE_SCORE],
                           max_identities=6 if quick else None)
    return build(root, faces, levels=QUICK_LEVELS if quick else FULL_LEVELS)
