"""Real face sets for fitting and checking labellers: package-shipped photos and an explicit extra set.

Real faces are scarce here, so every labeller threshold or model is FIT on one
set and REPORTED on another it never saw:

- ``face-api`` (FIT_SOURCE): the six group photos of the npm package
  ``@vladmandic/face-api`` 1.7.15 (MIT), fetched on request with
  ``python -m models.fit_data.face_sets --fetch face-api [DEST]`` (or the older
  ``--fetch-face-api``; never at test time).
- ``package`` (HELD_OUT_SOURCE): the photos that installed PyPI packages ship
  (insightface ``t1.jpg`` and ``Tom_Hanks_54745.png``, scikit-image's astronaut,
  matplotlib's ``grace_hopper.jpg``). Tests use these, because every install has them.
- more package-shipped sets (``models.fit_data.face_sources.SOURCES``), each FIT or
  HELD-OUT: ``--fetch SOURCE`` or ``--fetch all``; `split_faces` gives the faces of
  every present source of a split.

Every face is aligned to the ArcFace 112x112 template like the label flow does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models import geometry
from models.fit_data import face_sources as S

FIT_SOURCE = "face-api"
HELD_OUT_SOURCE = "package"
FACE_API_PACKAGE = "@vladmandic/face-api@1.7.15"
# SHA-256 of the six demo photos inside the npm tarball (package/demo/sampleN.jpg).
FACE_API_PHOTOS: dict[str, str] = {k: sha for k, (_, sha) in S.SOURCES[FIT_SOURCE].photos.items()}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ALIGNED_INPUT = "tom_hanks"  # already an aligned 112x112 crop: padded before detection
# Faces of the FIT sources that wear a real occluder over a key region, hand-labelled from their aligned crops
# (`--list human --save-crops DIR`): not clean faces, so no fit uses them as unobstructed examples. The `human`
# thumbnails with sunglasses pushed up on the head (face74), clear glasses (face33) or face paint (face57, face84)
# are not in it: nothing covers their eyes, nose or mouth. Neither are clear glasses (facexlib_test), a Santa hat
# (facetorch_test_face2) or a tongue out (facetorch_test3_face0). A hand on the face counts, even only on the
# cheeks, chin or brow (facetorch_test2, facetorch_test3 faces 1, 3, 14, 16 and 23, a fist on the chin in
# dlib_bald_guys_face10, a finger by the chin in dlib_savage_000299_01099008); a cap (dlib_salley_000200_02159354)
# does not.
WORN_OCCLUDERS: dict[str, str] = {
    **{f"facematch_face{k}": "sunglasses" for k in (3, 10, 21, 51, 68, 77, 89)},
    "pyfeat_multi_face_face0": "sunglasses",
    "facetorch_test2": "hand",
    **{f"facetorch_test3_face{k}": "hand" for k in (1, 3, 14, 16, 23)},
    "dlib_bald_guys_face10": "hand",
    "dlib_savage_000299_01099008": "hand",
}


def _insightface_image(name: str) -> Path:
    try:
        import insightface
    except ImportError as e:
        raise RuntimeError("the package-shipped faces need the 'insightface' package") from e
    p = Path(insightface.__file__).parent / "data" / "images" / name
    if not p.exists():
        raise FileNotFoundError(f"insightface does not ship {p}")
    return p


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def shipped_images() -> dict[str, np.ndarray]:
    """Real face images from installed packages (RGB uint8): name -> image."""
    from skimage import data

    return {
        "tom_hanks": _read_rgb(_insightface_image("Tom_Hanks_54745.png")),  # aligned 112x112
        "t1": _read_rgb(_insightface_image("t1.jpg")),  # group photo, several faces
        "astronaut": np.ascontiguousarray(data.astronaut()),  # 512x512 portrait
    }


FaceSetError = S.FaceSourceError  # a face set could not be fetched or read


@dataclass(frozen=True)
class RealFace:
    """One real face, aligned like the label flow aligns."""

    name: str  # "<photo>_face<k>" (left to right) or the photo name for single-face photos
    photo: str
    crop: np.ndarray  # (112, 112, 3) uint8 RGB
    landmarks: np.ndarray  # (5, 2) float32, crop coordinates
    box: np.ndarray  # (4,) x1, y1, x2, y2 in photo coordinates
    score: float


def _grace_hopper() -> np.ndarray:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FaceSetError(f"matplotlib does not ship a readable {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def package_photos() -> dict[str, np.ndarray]:
    """The held-out real photos that installed packages ship (RGB uint8): name -> image."""
    photos = dict(shipped_images())
    photos["grace_hopper"] = _grace_hopper()
    return photos


def default_face_api_dir() -> Path:
    from models.weights import models_dir

    return models_dir() / "photos" / "face-api"


def extra_photos(folder: str | Path) -> dict[str, np.ndarray]:
    """Every decodable image in `folder` (not recursive), by file stem; FaceSetError for a missing/empty folder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FaceSetError(f"photo folder {root} does not exist; for the face-api set run "
                           f"`python -m models.fit_data.face_sets --fetch-face-api {root}`")
    out: dict[str, np.ndarray] = {}
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise FaceSetError(f"cannot decode photo {p}")
            out[p.stem] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if not out:
        raise FaceSetError(f"photo folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def face_api_photos(folder: str | Path | None = None) -> dict[str, np.ndarray]:
    """The FIT set's photos from `folder` (default: the model store), checked against their pinned SHA-256."""
    root = Path(folder) if folder is not None else default_face_api_dir()
    for name, sha in FACE_API_PHOTOS.items():
        p = root / name
        if not p.is_file():
            raise FaceSetError(f"{p} is missing; run `python -m models.fit_data.face_sets --fetch-face-api {root}`")
        if hashlib.sha256(p.read_bytes()).hexdigest() != sha:
            raise FaceSetError(f"{p} does not match its pinned SHA-256 {sha[:12]}...")
    return extra_photos(root)


def fetch_face_api(dest: str | Path | None = None, timeout_s: float = 300.0) -> Path:
    """Download the face-api npm tarball (`npm pack`), keep its six demo photos and licence in dest."""
    return S.fetch(FIT_SOURCE, dest if dest is not None else default_face_api_dir(), timeout_s=timeout_s)


def _pad_aligned(image: np.ndarray) -> np.ndarray:
    """An aligned 112-px crop enlarged and border-padded so a detector sees the whole face with context."""
    big = cv2.resize(image, (168, 168), interpolation=cv2.INTER_CUBIC)
    return cv2.copyMakeBorder(big, 28, 28, 28, 28, cv2.BORDER_REPLICATE)


def original_side(face: RealFace) -> float:
    """The face's detector box's shorter side in the ORIGINAL photo, px (the aligned input was enlarged to detect)."""
    side = float(min(face.box[2] - face.box[0], face.box[3] - face.box[1]))
    return side * 112.0 / 168.0 if face.photo == ALIGNED_INPUT else side


def real_faces(photos: Mapping[str, np.ndarray], detector: object | None = None, min_side: float = 40.0,
               min_score: float = 0.95) -> list[RealFace]:
    """Every face of at least `min_side` px found in the photos, aligned to the 112x112 ArcFace template."""
    if detector is None:
        from models.detectors import MTCNNDetector

        detector = MTCNNDetector()
    out: list[RealFace] = []
    for photo, image in photos.items():
        src = _pad_aligned(image) if photo == ALIGNED_INPUT else image
        dets = [d for d in detector.detect(src)  # type: ignore[attr-defined]
                if min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= min_side and d.score >= min_score]
        if photo == ALIGNED_INPUT:
            dets = sorted(dets, key=lambda d: -d.score)[:1]
        dets.sort(key=lambda d: float(d.box[0]))
        for k, det in enumerate(dets):
            m = geometry.similarity_transform(det.landmarks)
            crop = geometry.warp(src, m)
            name = photo if len(dets) == 1 else f"{photo}_face{k}"
            out.append(RealFace(name, photo, crop, geometry.transform_points(det.landmarks, m).astype(np.float32),
                                np.asarray(det.box, np.float64), float(det.score)))
    return out


def source_photos(name: str, folder: str | Path | None = None) -> dict[str, np.ndarray]:
    """The photos of a registered source (RGB uint8, by file stem), each file checked against its SHA-256."""
    src = S.source(name)
    if src.registry == S.INSTALLED:
        return package_photos()
    out = {}
    for local, p in S.verified_files(src, folder).items():
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FaceSetError(f"cannot decode photo {p}")
        out[Path(local).stem] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return out


def source_faces(name: str, folder: str | Path | None = None, detector: object | None = None) -> list[RealFace]:
    """The aligned faces of a registered source (its own minimum face side)."""
    return real_faces(source_photos(name, folder), detector, min_side=S.source(name).min_side)


def split_faces(split: str, detector: object | None = None, *, require_all: bool = False,
                photos_root: str | Path | None = None) -> dict[str, list[RealFace]]:
    """Source name -> faces, for every source of `split` (S.FIT or S.HELD_OUT) present locally.

    Missing sources are skipped, unless `require_all`; with none present, or a
    missing one required, FaceSetError names the fetch command. Face names must
    be unique across the split's sources. `photos_root`: the folder holding one
    folder per source (default: `<model store>/photos`).
    """
    sources = S.split_sources(split)

    def folder(name: str) -> Path | None:
        return None if photos_root is None else Path(photos_root) / name

    missing = [s.name for s in sources if not S.is_present(s, folder(s.name))]
    if missing and (require_all or len(missing) == len(sources)):
        dest = "" if photos_root is None else f" {photos_root}"
        raise FaceSetError(f"the {split} face sources {', '.join(missing)} are not fetched; run "
                           f"`python -m models.fit_data.face_sets --fetch all{dest}` (or --fetch SOURCE for each)")
    if detector is None:
        from models.detectors import MTCNNDetector

        detector = MTCNNDetector()
    out: dict[str, list[RealFace]] = {}
    seen: dict[str, str] = {}
    for s in sources:
        if s.name in missing:
            continue
        out[s.name] = source_faces(s.name, folder(s.name), detector=detector)
        for f in out[s.name]:
            if f.name in seen:
                raise FaceSetError(f"face {f.name!r} is in both {seen[f.name]!r} and {s.name!r}")
            seen[f.name] = s.name
    return out


def fit_faces(detector: object | None = None, *, require_all: bool = False) -> list[RealFace]:
    """The faces of every FIT source present locally (labellers may be fitted on these)."""
    return [f for faces in split_faces(S.FIT, detector, require_all=require_all).values() for f in faces]


def held_out_faces(detector: object | None = None, *, require_all: bool = False) -> list[RealFace]:
    """The faces of every HELD-OUT source present locally (never used by any fit)."""
    return [f for faces in split_faces(S.HELD_OUT, detector, require_all=require_all).values() for f in faces]


def face_set(source: str, folder: str | Path | None = None, detector: object | None = None) -> list[RealFace]:
    """The faces of a named set (`face_sources.SOURCES`: 'package', 'face-api', ...), or of any photo folder."""
    if source == HELD_OUT_SOURCE:
        return real_faces(package_photos(), detector)
    if source in S.SOURCES:
        return source_faces(source, folder, detector)
    return real_faces(extra_photos(source), detector)


def fetch(name: str, dest: str | Path | None = None) -> list[Path]:
    """Fetch one registered source, or every fetchable one for 'all' (then dest is the parent folder)."""
    if name != "all":
        return [S.fetch(name, dest)]
    return [S.fetch(s.name, None if dest is None else Path(dest) / s.name)
            for s in S.SOURCES.values() if s.registry != S.INSTALLED]


def save_crops(faces: Iterable[RealFace], folder: str | Path) -> list[Path]:
    """Write each face's crop as <name>.png (for looking at them); returns the paths."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in faces:
        p = root / f"{f.name}.png"
        if not cv2.imwrite(str(p), cv2.cvtColor(f.crop, cv2.COLOR_RGB2BGR)):
            raise FaceSetError(f"could not write {p}")
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.fit_data.face_sets", description=__doc__.splitlines()[0])
    p.add_argument("--fetch-face-api", nargs="?", const="", default=None, metavar="DEST",
                   help="download the face-api demo photos (npm) into DEST (default: $FIQA_MODELS/photos/face-api)")
    p.add_argument("--fetch", nargs="+", default=None, metavar=("SOURCE", "DEST"),
                   help=f"download a face source ({', '.join(S.SOURCES)}) or 'all' into DEST "
                        "(default: $FIQA_MODELS/photos/SOURCE; for 'all' DEST is the parent)")
    p.add_argument("--list", default=None, metavar="SOURCE", help="list the faces of a face source or a folder")
    p.add_argument("--save-crops", default=None, metavar="DIR", help="with --list: write the aligned crops here")
    args = p.parse_args(argv)
    try:
        if args.fetch_face_api is not None:
            print(fetch_face_api(args.fetch_face_api or None))
        if args.fetch is not None:
            if len(args.fetch) > 2:
                p.error("--fetch takes SOURCE and an optional DEST")
            for path in fetch(*args.fetch):
                print(path)
        if args.list:
            faces = face_set(args.list)
            print(json.dumps([{"name": f.name, "photo": f.photo, "score": round(f.score, 4),
                               "box": [round(float(v), 1) for v in f.box]} for f in faces], indent=1))
            if args.save_crops:
                save_crops(faces, args.save_crops)
    except FaceSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
