"""The label stages: a registry of named stages built from LabelOptions (pure compute, no Prefect, no files).

A stage maps a batch of FaceCrop to rows (`align` makes the crops; factor stages make `factors` rows).
Stages are chosen by name (`--stages align,blur,pose,attributes`), so new labellers plug in with
:func:`register_stage` without touching the flow; a built stage is cached per process and options.

Adding a labeller for an existing factor is one new file and one line: a module with a stage class (a
callable from a list of FaceCrop to factors rows, with `name` and `version`) and a `build(options)` function,
and `register_stage("my_blur", ("blur",), "pipeline.labellers.my_blur:build")` below. The builder is named
as "module:function" and imported only when the stage is first built, so a registered labeller costs nothing
to runs that do not use it (docs/labelling.md, "Adding a labeller").
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from data_manifest.vocabulary import BLUR_THRESHOLDS, FACTOR_CLASSES, ordered_thresholds, parse_blur_thresholds
from pipeline.labellers.base import FaceCrop
from pipeline.process_lock import ProcessLock

ALIGN = "align"
DEFAULT_STAGES = ("align", "blur", "pose", "attributes")
REAL_ATTRIBUTE_STAGES = ("occlusion", "expression", "lighting")  # `attributes` without a checkpoint


# `--pose-withhold`: obstructed (the default: the ambiguous-yaw check, and the wider one on faces the occlusion
# labeller calls obstructed), ambiguous (the first only), none (every face gets a class, as the paper).
POSE_WITHHOLD = ("obstructed", "ambiguous", "none")


@dataclass(frozen=True)
class LabelOptions:
    """Labeller settings; recorded in the run's parameters."""

    detector: str = "auto"  # auto (SCRFD when the pack is present, else MTCNN) | mtcnn | scrfd | none (aligned only)
    pack: str = "buffalo_l"  # insightface model pack name or directory
    align_mode: str = "detect"  # detect | already_aligned (MS1MV2-style 112x112 inputs)
    min_face_size: float | None = None  # MTCNN smallest face in pixels; None: 20 (detect), 40 (already aligned)
    pose_backend: str = "dlib"  # dlib (the authors' method) | insightface | landmarks5 | auto
    pose_thresholds: tuple[float, float] = (10.0, 25.0)  # |yaw| degrees
    pose_withhold: str = "obstructed"  # POSE_WITHHOLD: which unsure pose classes the dlib backend withholds
    blur_thresholds: tuple[float, float] = BLUR_THRESHOLDS  # CPBD hazy-below, clear-above (`--blur-thresholds`)
    attributes_checkpoint: str | None = None  # WIDER attribute CNN for `attributes`; None: the real-face labellers
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)  # settings of stages registered by others

    def __post_init__(self) -> None:
        for key in ("pose_thresholds", "blur_thresholds"):
            object.__setattr__(self, key, ordered_thresholds(getattr(self, key), key.removesuffix("_thresholds")))
        if self.align_mode not in ("detect", "already_aligned"):
            raise ValueError(f"align_mode must be 'detect' or 'already_aligned', got {self.align_mode!r}")
        if self.pose_withhold not in POSE_WITHHOLD:
            raise ValueError(f"pose_withhold must be one of {', '.join(POSE_WITHHOLD)}, got {self.pose_withhold!r}")

    def to_params(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass(frozen=True)
class StageSpec:
    """A registered label stage: its factors, and a builder from LabelOptions."""

    name: str
    factors: tuple[str, ...]
    build: Callable[[LabelOptions], Any] | str  # a callable, or "module:function" imported when first built

    def builder(self) -> Callable[[LabelOptions], Any]:
        """The build function; a "module:function" reference is imported here, with an error naming it."""
        if callable(self.build):
            return self.build
        module, _, func = self.build.partition(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"stage {self.name!r}: cannot load its builder {self.build!r}: {e}") from e


def _build_align(o: LabelOptions) -> Any:
    from models.detectors import make_detector
    from pipeline.labellers.align import ALREADY_ALIGNED, AlignStage

    if o.detector == "none":
        if o.align_mode != ALREADY_ALIGNED:
            raise ValueError("detector 'none' only works with already-aligned inputs (--aligned)")
        return AlignStage(None, mode=ALREADY_ALIGNED)  # no measured 5 landmarks: use the dlib pose backend

    min_face = o.min_face_size or (40.0 if o.align_mode == ALREADY_ALIGNED else 20.0)  # aligned faces fill the crop
    kwargs = {"min_face_size": min_face} if o.detector in ("auto", "mtcnn") else {}
    if o.detector == "auto":
        from models.weights import find_pack

        kwargs = {} if find_pack(o.pack) is not None else kwargs
    return AlignStage(make_detector(o.detector, pack=o.pack, device=o.device, **kwargs), mode=o.align_mode)


def _build_blur(o: LabelOptions) -> Any:
    from pipeline.labellers.blur import BlurStage

    return BlurStage(thresholds=o.blur_thresholds)


def _build_pose(o: LabelOptions) -> Any:
    from models.pose import make_pose_backend
    from pipeline.labellers.pose import PoseStage

    backend = make_pose_backend(o.pose_backend, pack=o.pack, device=o.device)
    # the real occlusion labeller (the one `occlusion` runs, shared) tells which faces get the wider ambiguity check
    wider = o.pose_withhold == "obstructed" and getattr(backend, "invariant", False)
    return PoseStage(backend, thresholds=o.pose_thresholds, withhold=o.pose_withhold != "none",
                     obstruction=get_stage("occlusion", o) if wider else None)


def _build_occlusion(o: LabelOptions) -> Any:
    from pipeline.labellers.occlusion import OcclusionStage

    return OcclusionStage(device=o.device)


def _build_expression(o: LabelOptions) -> Any:
    from pipeline.labellers.expression import ExpressionStage

    return ExpressionStage(device=o.device)


def _build_lighting(o: LabelOptions) -> Any:
    from pipeline.labellers.lighting import LightingStage

    return LightingStage()  # analytic: no model, no device


class StageGroup:
    """Several factor stages run as one (their rows concatenated); each row keeps its own labeller."""

    def __init__(self, name: str, stages: Sequence[Any]) -> None:
        self.name = name
        self.stages = list(stages)
        self.version = "+".join(f"{getattr(s, 'name', type(s).__name__)}:{s.version}" for s in self.stages)

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        return [row for stage in self.stages for row in stage(batch)]


def _build_attributes(o: LabelOptions) -> Any:
    """The WIDER-trained CNN with a checkpoint, else the real-face labellers (the default)."""
    if o.attributes_checkpoint:
        from pipeline.labellers.attributes import AttributeStage

        return AttributeStage(o.attributes_checkpoint, device=o.device)
    return StageGroup("attributes", [get_stage(name, o) for name in REAL_ATTRIBUTE_STAGES])


STAGES: dict[str, StageSpec] = {}
_CACHE: dict[tuple[str, str], Any] = {}  # built stages per (name, options), shared by thread workers
_CACHE_LOCK = ProcessLock(reentrant=True)  # re-entrant: a group stage builds its members through get_stage


def register_stage(name: str, factors: Sequence[str], build: Callable[[LabelOptions], Any] | str) -> None:
    """Add (or replace) a label stage by name; factor stages map a list of FaceCrop to factors rows.

    `build` makes the stage from LabelOptions: a function, or "module:function" (imported on first use)."""
    unknown = [f for f in factors if f not in FACTOR_CLASSES]
    if unknown:
        raise ValueError(f"stage {name!r} labels unknown factor(s) {unknown}; known: {list(FACTOR_CLASSES)}")
    if isinstance(build, str) and not re.fullmatch(r"[\w.]+:\w+", build):
        raise ValueError(f"stage {name!r}: builder must be a function or 'module:function', got {build!r}")
    STAGES[name] = StageSpec(name, tuple(factors), build)
    with _CACHE_LOCK:
        for key in [k for k in _CACHE if k[0] == name]:
            del _CACHE[key]


register_stage(ALIGN, (), _build_align)
register_stage("blur", ("blur",), _build_blur)
register_stage("pose", ("pose",), _build_pose)
register_stage("occlusion", ("occlusion",), _build_occlusion)
register_stage("expression", ("expression",), _build_expression)
register_stage("lighting", ("lighting",), _build_lighting)
register_stage("attributes", ("occlusion", "expression", "lighting"), _build_attributes)


def parse_stages(stages: str | Sequence[str]) -> list[str]:
    """Validated, de-duplicated stage names in run order (align first)."""
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if not names:
        raise ValueError("no stages given; choose from " + ", ".join(STAGES))
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; registered stages: {', '.join(STAGES)}")
    ordered = list(dict.fromkeys(names))
    owner: dict[str, str] = {}
    for name in ordered:  # two stages writing the same factor in one run would make its latest row ambiguous
        for factor in STAGES[name].factors:
            if factor in owner:
                raise ValueError(f"stages {owner[factor]!r} and {name!r} both label {factor!r}; choose one")
            owner[factor] = name
    return ([ALIGN] if ALIGN in ordered else []) + [n for n in ordered if n != ALIGN]


def _key(name: str, options: LabelOptions) -> tuple[str, str]:
    return name, json.dumps(options.to_params(), sort_keys=True)


def is_built(name: str, options: LabelOptions) -> bool:
    """Whether this process has built the stage for these options already (its models are loaded)."""
    return _key(name, options) in _CACHE


def get_stage(name: str, options: LabelOptions) -> Any:
    """The built stage for these options, once per process (models load once, shared by thread workers)."""
    key = _key(name, options)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = STAGES[name].builder()(options)
        return _CACHE[key]


def options_from(raw: dict[str, Any] | LabelOptions | None) -> LabelOptions:
    """LabelOptions from a plain dict (flow parameters), validating names and thresholds."""
    if isinstance(raw, LabelOptions):
        return raw
    raw = dict(raw or {})
    known = set(LabelOptions.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown label option(s) {sorted(unknown)}; known: {sorted(known)}")
    if isinstance(raw.get("blur_thresholds"), str):  # 'calibrated', 'paper' or 'LOW,HIGH'
        raw["blur_thresholds"] = parse_blur_thresholds(raw["blur_thresholds"])
    return LabelOptions(**raw)  # validated in LabelOptions.__post_init__
