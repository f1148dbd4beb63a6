"""The CLIB-FIQA network (paper Sec. 3.1-3.3): an open_clip image tower scored against 360 fixed prompts.

The text tower is frozen, so the 360 prompt embeddings are computed once and
kept as a buffer (stored in every checkpoint); training then runs only the
image tower, the learnable temperature and the merged-factor MLP. The axis
order of the 360 prompts is `pipeline.factors.PROMPT_SHAPE`:
blur 3, occlusion 2, pose 3, expression 2, lighting 2, quality 5 (fastest).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import from_mapping
from pipeline.factors import FACTOR_SHAPE, N_JOINT_FACTORS, N_PROMPTS, PROMPT_SHAPE, QUALITY_ANCHORS, prompts

CONFIG_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_CONFIG_DIR = CONFIG_DIR / "open_clip"
TEXT_MODES = ("cached", "per_step")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learnable inverse temperature


@dataclass
class ClibConfig:
    """Architecture of a CLIB-FIQA model; stored in every checkpoint."""

    model_name: str = "RN50"  # open_clip architecture (built-in or registered from models/configs/open_clip)
    pretrained: str | None = "openai"  # open_clip tag, a local checkpoint path, or None for random init
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
            open_clip.add_model_config(Path(d))


def build_clip(model_name: str, pretrained: str | None) -> nn.Module:
    """An open_clip model; `pretrained` is a tag (needs the hub) or a local checkpoint path."""
    open_clip = _import_open_clip()
    register_open_clip_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {model_name!r}; register a JSON config or pick a built-in")
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"pretrained={pretrained!r} is neither a file nor a known tag for {model_name} (tags: {tags})"
            )
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise RuntimeError(
                f"pretrained={pretrained!r} needs a download but HF_HUB_OFFLINE is set; "
                "pass a local checkpoint path as pretrained (e.g. a downloaded RN50 openai .pt)"
            )
    try:
        return open_clip.create_model(model_name, pretrained=pretrained)
    except Exception as e:
        raise RuntimeError(f"could not build open_clip {model_name} with pretrained={pretrained!r}: {e}") from e


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
        clip = build_clip(config.model_name, pretrained)
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
        return F.normalize(self.text_tower.encode_text(self.prompt_tokens), dim=-1).float()

    def encode_image(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        if self.visual_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.visual(x).float(), dim=-1)

    def forward(self, images: Tensor, *, with_mlp: bool = False) -> ClibOutput:
        feats = self.encode_image(images)
        scale = self.logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
        logits = scale * feats @ self.prompt_embeddings().t()
        return self.distributions(logits, with_mlp=with_mlp)

    def distributions(self, logits: Tensor, *, with_mlp: bool = False) -> ClibOutput:
        """Softmax over the 360 prompts and all marginals by summation (Eq. 2-3)."""
        probs = torch.softmax(logits.float(), dim=-1)
        p = probs.view(-1, *PROMPT_SHAPE)
        n = len(FACTOR_SHAPE)
        quality = p.sum(dim=tuple(range(1, n + 1)))
        joint6 = p.sum(dim=-1)
        factors = tuple(joint6.sum(dim=tuple(d for d in range(1, n + 1) if d != m + 1)) for m in range(n))
        joint = joint6.reshape(-1, N_JOINT_FACTORS)
        score = quality @ self.anchors
        extra = {"merged": self.mlp(joint.detach())} if with_mlp else {}
        return ClibOutput(logits, probs, quality, factors, joint, score, extra)

    def clamp_temperature(self) -> None:
        """Keep 1/tau <= 100 as CLIP does."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    def set_channels_last(self, enabled: bool = True) -> None:
        self.visual_channels_last = enabled
        self.visual.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters trained by CLIB-FIQA: image tower + temperature (+ text parts when official), and the MLP."""
        main = [*self.visual.parameters(), self.logit_scale]
        if self.text_tower is not None:
            main += [p for p in self.text_tower.parameters() if p.requires_grad]
        return {"main": main, "mlp": list(self.mlp.parameters())}

    def state_for_checkpoint(self) -> dict[str, Tensor]:
        """Weights to save; with a per-step text tower, the cache is refreshed from it first."""
        if self.text_tower is not None:
            with torch.no_grad():
                self.text_features.copy_(self.prompt_embeddings())
        return self.state_dict()


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
