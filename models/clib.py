"""The CLIB-FIQA network (paper Sec. 3.1-3.3): an open_clip image tower scored against 360 fixed prompts.

The text tower is frozen, so the 360 prompt embeddings are computed once and
kept as a buffer (stored in every checkpoint); training then runs only the
image tower, the learnable temperature and the merged-factor MLP. The axis
order of the 360 prompts is `data_manifest.vocabulary.PROMPT_SHAPE`:
blur 3, occlusion 2, pose 3, expression 2, lighting 2, quality 5 (fastest).

`resolve_pretrained` is the one place that decides how CLIP weights load (open_clip
tag, local state dict / safetensors / hub snapshot, trusted TorchScript archive) and
refuses weights trained with another text activation than the architecture's. The
image tower may run under autocast; similarities and everything after are float32.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_manifest.vocabulary import FACTOR_SHAPE, N_JOINT_FACTORS, N_PROMPTS, PROMPT_SHAPE, QUALITY_ANCHORS, prompts
from models.config import from_mapping

CONFIG_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_CONFIG_DIR = CONFIG_DIR / "open_clip"
TEXT_MODES = ("cached", "per_step")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's training clamp on log(1/tau); TrainConfig.logit_scale_max
_REGISTERED: set[Path] = set()


@dataclass
class ClibConfig:
    """Architecture of a CLIB-FIQA model; stored in every checkpoint."""

    model_name: str = "RN50-quickgelu"  # open_clip architecture; OpenAI's weights need the -quickgelu variant
    pretrained: str | None = "openai"  # open_clip tag, a local weights file or directory, or None for random init
    trust_torchscript: bool = False  # allow torch.jit.load of a local TorchScript archive (it can run stored code)
    text_mode: str = "cached"  # "cached": text embeddings once; "per_step": text tower every forward (official)
    official_trainable_text: bool = False  # official code: token embedding + final LayerNorm stay trainable
    mlp_hidden: tuple[int, ...] = (72, 128, 64)  # merged-factor MLP: FC(72)-PReLU-FC(128)-PReLU-FC(64)-PReLU-FC(5)
    image_size: int | None = None  # encoder input side; None: the architecture's own size
    image_mean: tuple[float, ...] | None = None  # None: the open_clip preprocess config (CLIP normalisation)
    image_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.official_trainable_text and self.text_mode != "per_step":
            raise ValueError("official_trainable_text needs text_mode='per_step' (cached embeddings cannot train)")
        self.mlp_hidden = tuple(int(h) for h in self.mlp_hidden)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(float(x) for x in v))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClibConfig:
        """Build from a JSON mapping, refusing unknown keys."""
        return from_mapping(cls, d, "CLIB-FIQA config")

    @classmethod
    def from_json(cls, path_or_name: str | os.PathLike[str]) -> ClibConfig:
        """A config from a JSON file, or by name from models/configs (e.g. "clib-rn50", "clib-tiny")."""
        p = Path(path_or_name)
        if not p.suffix and not p.exists():
            p = CONFIG_DIR / f"{path_or_name}.json"
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError as e:
            known = sorted(x.stem for x in CONFIG_DIR.glob("*.json"))
            raise FileNotFoundError(f"no model config {str(path_or_name)!r}; bundled configs: {known}") from e


@dataclass
class ClibOutput:
    """Everything one forward gives: the 360-way distribution and its marginals."""

    logits: Tensor  # (B, 360)
    probs: Tensor  # (B, 360), float32
    quality: Tensor  # (B, 5) P(h^q | x)
    factors: tuple[Tensor, ...]  # per factor (B, C_m) in FACTORS order
    joint: Tensor  # (B, 72) P(H | x), row-major over FACTOR_SHAPE
    score: Tensor  # (B,) Eq. 2
    extra: dict[str, Tensor] = field(default_factory=dict)


def register_open_clip_configs(extra_dir: str | os.PathLike[str] | None = None) -> None:
    """Register the bundled tiny open_clip configs (and any user dir) with open_clip."""
    open_clip = _import_open_clip()
    for d in (OPEN_CLIP_CONFIG_DIR, extra_dir):
        if d is not None:
            if not Path(d).is_dir():
                raise NotADirectoryError(f"open_clip config dir {d} does not exist")
            if Path(d).resolve() not in _REGISTERED:
                open_clip.add_model_config(Path(d))
                _REGISTERED.add(Path(d).resolve())


class PretrainedWeightsError(ValueError):
    """The `pretrained` weights cannot be used with this architecture (missing, unreachable, mismatched)."""


@dataclass(frozen=True)
class PretrainedSource:
    """Where a config's CLIP weights come from, resolved without loading them."""

    kind: str  # "none" (random init), "tag" (open_clip hub download), "file" (state dict/safetensors), "torchscript"
    value: str | None  # the tag, or the absolute file path
    quick_gelu: bool  # the text-tower activation of the architecture that will be built

    def describe(self) -> str:
        return {"none": "random init", "tag": f"open_clip tag {self.value!r}", "file": f"weights file {self.value}",
                "torchscript": f"TorchScript archive {self.value}"}[self.kind]


def uses_quick_gelu(model_name: str) -> bool:
    """Whether open_clip builds `model_name`'s transformers with QuickGELU (else nn.GELU)."""
    open_clip = _import_open_clip()
    register_open_clip_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}; register a JSON config or pick a built-in")
    return bool(cfg.get("quick_gelu", False))


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE forbids downloads (read at call time, never set by this project)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_weight_options(model_name: str) -> str:
    """The local-file forms `pretrained` accepts, for error messages."""
    return ("pass a local file instead (`fiqa train --pretrained PATH`, or `pretrained` in the model config): "
            f"an open_clip state dict or .safetensors of {model_name} (e.g. open_clip_model.safetensors from the hub "
            "repo the tag points to), a directory holding one, or OpenAI's TorchScript archive (e.g. RN50.pt) together "
            "with `--trust-torchscript` (trust_torchscript: true)")


def resolve_pretrained(model_name: str, pretrained: str | None, *, trust_torchscript: bool = False) -> PretrainedSource:
    """Decide how `pretrained` will be loaded, refusing what cannot work before any download or model build.

    Tried in order: None (random init); an open_clip tag of `model_name` (its activation must match the
    architecture's, and the hub must not be switched off); a local file or directory (state dict, safetensors,
    or a TorchScript archive when trusted). The error names everything tried.
    """
    open_clip = _import_open_clip()
    quick_gelu = uses_quick_gelu(model_name)
    if pretrained is None:
        return PretrainedSource("none", None, quick_gelu)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if tags else {}
    if tag_cfg:
        tag_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        if tag_quick_gelu != quick_gelu:
            raise PretrainedWeightsError(_activation_mismatch(model_name, f"the {pretrained!r} weights",
                                                              quick_gelu, tag_quick_gelu))
        if hub_offline():
            raise PretrainedWeightsError(
                f"pretrained={pretrained!r} is an open_clip tag of {model_name} that needs a download, but "
                f"HF_HUB_OFFLINE is set; {local_weight_options(model_name)}")
        return PretrainedSource("tag", pretrained, quick_gelu)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        path = _checkpoint_in_dir(path)
    if path.is_file():
        path = path.resolve()
        if _is_torchscript(path):
            if not trust_torchscript:
                raise PretrainedWeightsError(
                    f"{path} is a TorchScript archive (OpenAI's checkpoint format); torch.jit.load can run code "
                    "stored in the file, so it is loaded only when you trust it: pass --trust-torchscript "
                    "(trust_torchscript: true in the model config), or convert it to a state dict")
            return PretrainedSource("torchscript", str(path), quick_gelu)
        return PretrainedSource("file", str(path), quick_gelu)
    raise PretrainedWeightsError(
        f"pretrained={pretrained!r} could not be resolved for {model_name}; tried: an open_clip tag of {model_name} "
        f"(known tags: {tags or 'none'}), a local file or directory ({path.resolve()} does not exist)")


def build_clip(model_name: str, pretrained: str | None, *, trust_torchscript: bool = False) -> nn.Module:
    """An open_clip model with the weights `pretrained` names (see resolve_pretrained), on the CPU in float32."""
    open_clip = _import_open_clip()
    src = resolve_pretrained(model_name, pretrained, trust_torchscript=trust_torchscript)
    if src.kind == "torchscript":
        return _clip_from_torchscript(model_name, Path(str(src.value)), src.quick_gelu)
    try:
        if src.kind == "none":  # a checkpoint's weights follow, or the caller chose random init and says so itself
            with _quiet_random_init():
                return open_clip.create_model(model_name, pretrained=None)
        return open_clip.create_model(model_name, pretrained=src.value)
    except Exception as e:
        if src.kind == "tag":
            raise PretrainedWeightsError(
                f"could not download open_clip {model_name} weights {src.value!r} ({type(e).__name__}: {e}); "
                f"{local_weight_options(model_name)}") from e
        raise PretrainedWeightsError(
            f"could not load {src.describe()} into open_clip {model_name}; tried: safetensors / torch.load "
            f"(weights_only=True) state dict ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (it goes to the root logger)."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    drop = _Drop()
    handlers = [root, *root.handlers]
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def _activation_mismatch(model_name: str, what: str, arch_quick_gelu: bool, weights_quick_gelu: bool) -> str:
    act = {True: "QuickGELU", False: "GELU"}
    base = model_name.removesuffix("-quickgelu")
    suggestion = base if not weights_quick_gelu else f"{base}-quickgelu"
    return (f"open_clip {model_name} builds its text tower with {act[arch_quick_gelu]}, but {what} were trained with "
            f"{act[weights_quick_gelu]}: the prompt embeddings would not be CLIP's. Use model_name "
            f"{suggestion!r} (or an architecture JSON with \"quick_gelu\": {str(weights_quick_gelu).lower()})")


_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


def _checkpoint_in_dir(d: Path) -> Path:
    """The open_clip weights file in a directory (e.g. a downloaded hub snapshot)."""
    for name in _HUB_FILES:
        if (d / name).is_file():
            return d / name
    raise PretrainedWeightsError(f"directory {d.resolve()} holds none of the open_clip weight files {list(_HUB_FILES)}")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with serialized code (`<name>/code/__torch__/...`), unlike torch.save's."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in zf.namelist())


def _clip_from_torchscript(model_name: str, path: Path, quick_gelu: bool) -> nn.Module:
    """Read a trusted TorchScript archive's weights and load them into the open_clip architecture `model_name`."""
    open_clip = _import_open_clip()
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these files are in
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise PretrainedWeightsError(f"could not read TorchScript archive {path}: {type(e).__name__}: {e}") from e
    archived = _archive_activation(archive)
    if archived is not None and archived != quick_gelu:
        raise PretrainedWeightsError(_activation_mismatch(model_name, f"the weights in {path}", quick_gelu, archived))
    with _quiet_random_init():  # the archive's weights are loaded next
        model = open_clip.create_model(model_name, pretrained=None)
    # Drop OpenAI's int entries and buffers the model computes itself (a scripted module saves e.g. attn_mask).
    derived = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in archive.state_dict().items()
             if k not in ("input_resolution", "context_length", "vocab_size") and k not in derived}
    try:
        model.load_state_dict(state, strict=True)  # copies OpenAI's fp16 tensors into the float32 parameters
    except RuntimeError as e:
        raise PretrainedWeightsError(f"TorchScript archive {path} does not hold an open_clip {model_name}: {e}") from e
    return model


def _archive_activation(archive: Any) -> bool | None:
    """QuickGELU (True) or GELU (False) as recorded in a scripted/traced CLIP's text transformer, None if unknown."""
    for name, module in archive.named_modules():
        if name.startswith("transformer."):
            kind = getattr(module, "original_name", "")
            if kind == "QuickGELU":
                return True
            if kind == "GELU":
                return False
    return None


@torch.no_grad()
def encode_prompts(clip_model: nn.Module, model_name: str, texts: list[str] | None = None) -> Tensor:
    """L2-normalised text embeddings (L, K) of the prompts through the (frozen) text tower."""
    open_clip = _import_open_clip()
    texts = prompts() if texts is None else texts
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer(texts)
    _check_tokens_fit(tokens, texts)
    was_training = clip_model.training
    clip_model.eval()
    dev = next(clip_model.parameters()).device
    out = clip_model.encode_text(tokens.to(dev), normalize=True).float()
    clip_model.train(was_training)
    return out


class MergedFactorMLP(nn.Module):
    """Maps the 72-dim joint factor distribution to a 5-level quality distribution (Sec. 3.3)."""

    def __init__(self, hidden: tuple[int, ...] = (72, 128, 64), n_in: int = N_JOINT_FACTORS, n_out: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = n_in
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.PReLU()]
            prev = h
        layers.append(nn.Linear(prev, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, joint: Tensor) -> Tensor:
        return torch.softmax(self.net(joint.float()), dim=-1)


class Preprocess(nn.Module):
    """uint8 RGB (B, H, W, 3) or float [0, 1] (B, 3, H, W) -> resized (bilinear), CLIP-normalised (B, 3, S, S)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, force_resize: bool = False) -> Tensor:
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be (B, H, W, 3) RGB, got {tuple(images.shape)}")
            x = images.permute(0, 3, 1, 2).float() / 255.0
        else:
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"float images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
            x = images.float()
        if force_resize or x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class ClibFiqa(nn.Module):
    """Image tower + fixed prompt embeddings + learnable temperature + merged-factor MLP."""

    def __init__(
        self,
        config: ClibConfig,
        visual: nn.Module,
        logit_scale: Tensor,
        text_features: Tensor,
        text_tower: nn.Module | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        super().__init__()
        if text_features.shape[0] != N_PROMPTS:
            raise ValueError(f"text_features must have {N_PROMPTS} rows, got {tuple(text_features.shape)}")
        self.config = config
        self.visual = visual
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().float().reshape(()))
        self.register_buffer("text_features", text_features.detach().clone().float())
        self.register_buffer("anchors", torch.tensor(QUALITY_ANCHORS, dtype=torch.float32), persistent=False)
        self.mlp = MergedFactorMLP(config.mlp_hidden)
        self.text_tower = text_tower
        self.preprocess = preprocess
        self.visual_channels_last = False
        if text_tower is not None:
            self.register_buffer("prompt_tokens", _tokenize(config.model_name), persistent=False)

    @classmethod
    def from_config(cls, config: ClibConfig, *, load_pretrained: bool = True) -> ClibFiqa:
        """Build the model; the prompt embeddings come from the (pretrained) text tower once."""
        pretrained = config.pretrained if load_pretrained else None
        clip = build_clip(config.model_name, pretrained, trust_torchscript=config.trust_torchscript)
        pp = clip.visual.preprocess_cfg
        size = config.image_size or _side(pp.get("size", clip.visual.image_size))
        preprocess = Preprocess(size, config.image_mean or tuple(pp["mean"]), config.image_std or tuple(pp["std"]))
        text_features = encode_prompts(clip, config.model_name) if load_pretrained else _empty_text(clip)
        visual = clip.visual
        clip.visual = nn.Identity()  # the remaining module is the text tower
        text_tower = None
        if config.text_mode == "per_step":
            text_tower = clip
            for name, p in text_tower.named_parameters():
                trainable = config.official_trainable_text and name.split(".")[0] in ("token_embedding", "ln_final")
                p.requires_grad_(trainable)
        if size != _side(visual.image_size):
            _resize_attnpool(visual, size)
        model = cls(config, visual, clip.logit_scale, text_features, text_tower, preprocess)
        return model

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def prompt_embeddings(self) -> Tensor:
        """The (360, K) normalised prompt embeddings: the cached buffer, or a fresh text-tower forward."""
        if self.text_tower is None:
            return self.text_features
        text = self.text_tower.encode_text(self.prompt_tokens)
        with _float32(text.device):
            return F.normalize(text.float(), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings in float32 (the tower itself may run under autocast)."""
        x = self.preprocess(images)
        if self.visual_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.visual(x)
        with _float32(feats.device):
            return F.normalize(feats.float(), dim=-1)

    def forward(self, images: Tensor, *, with_mlp: bool = False) -> ClibOutput:
        feats = self.encode_image(images)
        text = self.prompt_embeddings()
        with _float32(feats.device):  # bf16 logits of size 20-40 would move prompt probabilities by percents
            logits = self.logit_scale.float().exp() * (feats @ text.float().t())
            return self.distributions(logits, with_mlp=with_mlp)

    def distributions(self, logits: Tensor, *, with_mlp: bool = False) -> ClibOutput:
        """Softmax over the 360 prompts and all marginals by summation (Eq. 2-3), in float32 under any autocast."""
        with _float32(logits.device):
            return self._distributions(logits.float(), with_mlp)

    def _distributions(self, logits: Tensor, with_mlp: bool) -> ClibOutput:
        probs = torch.softmax(logits, dim=-1)
        p = probs.view(-1, *PROMPT_SHAPE)
        n = len(FACTOR_SHAPE)
        quality = p.sum(dim=tuple(range(1, n + 1)))
        joint6 = p.sum(dim=-1)
        factors = tuple(joint6.sum(dim=tuple(d for d in range(1, n + 1) if d != m + 1)) for m in range(n))
        joint = joint6.reshape(-1, N_JOINT_FACTORS)
        score = quality @ self.anchors
        extra = {"merged": self.mlp(joint.detach())} if with_mlp else {}
        return ClibOutput(logits, probs, quality, factors, joint, score, extra)

    def clamp_temperature(self, max_logit_scale: float | None = MAX_LOGIT_SCALE) -> None:
        """Keep log(1/tau) <= max_logit_scale (CLIP's ln 100) after a step; None leaves it free (official code)."""
        if max_logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(max=max_logit_scale)

    def set_channels_last(self, enabled: bool = True) -> None:
        self.visual_channels_last = enabled
        self.visual.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters trained by CLIB-FIQA: image tower + temperature (+ text parts when official), and the MLP."""
        main = [p for p in self.visual.parameters() if p.requires_grad] + [self.logit_scale]
        if self.text_tower is not None:
            main += [p for p in self.text_tower.parameters() if p.requires_grad]
        return {"main": main, "mlp": list(self.mlp.parameters())}

    def freeze_visual_positional_embeddings(self) -> list[str]:
        """Freeze image-tower parameters named *positional_embedding* (the official code's name match); their names."""
        frozen = []
        for name, p in self.visual.named_parameters():
            if "positional_embedding" in name:
                p.requires_grad_(False)
                frozen.append(f"visual.{name}")
        return frozen

    def state_for_checkpoint(self) -> dict[str, Tensor]:
        """Weights to save; with a per-step text tower, the cache is refreshed from it first."""
        if self.text_tower is not None:
            with torch.no_grad():
                self.text_features.copy_(self.prompt_embeddings())
        return self.state_dict()


def _float32(device: torch.device) -> Any:
    """A region where autocast is off, so similarities, softmax and sums run in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def _tokenize(model_name: str) -> Tensor:
    open_clip = _import_open_clip()
    texts = prompts()
    tokens = open_clip.get_tokenizer(model_name)(texts)
    _check_tokens_fit(tokens, texts)
    return tokens


def _check_tokens_fit(tokens: Tensor, texts: list[str]) -> None:
    # A truncated prompt loses its end-of-text token and with it the quality word.
    last = tokens[:, -1]
    if bool((last != 0).any()):
        i = int((last != 0).nonzero()[0])
        raise ValueError(f"prompt does not fit the text context length {tokens.shape[1]}: {texts[i]!r}")


def _empty_text(clip: nn.Module) -> Tensor:
    proj = clip.text_projection
    return torch.zeros(N_PROMPTS, proj.shape[-1] if isinstance(proj, Tensor) else proj.out_features)


def _side(size: Any) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"only square encoder inputs are supported, got {size}")
        return int(size[0])
    return int(size)


def _resize_attnpool(visual: nn.Module, size: int) -> None:
    """Resize a ModifiedResNet's attention-pool positional embedding for another input side."""
    pool = getattr(visual, "attnpool", None)
    if pool is None:
        raise ValueError(f"image_size override is only supported for ResNet towers, not {type(visual).__name__}")
    pe = pool.positional_embedding.data
    old = int(round(math.sqrt(pe.shape[0] - 1)))
    new = size // 32
    grid = pe[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    pool.positional_embedding = nn.Parameter(torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1)]))
    visual.image_size = size


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the CLIB-FIQA model needs open_clip: pip install open_clip_torch==3.3.0") from e
    return open_clip
