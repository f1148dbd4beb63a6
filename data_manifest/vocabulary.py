"""Factor vocabulary, class thresholds and the CLIB-FIQA prompt space (paper Sec. 3.1, 4.1).

Every decision here is a pure function of a measured value; the label stages,
the model and the SQL views all take their names and orders from this module.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass
from typing import Any

# Quality levels h^q and their anchors A (Eq. 1-2).
QUALITY_LEVELS: tuple[str, ...] = ("bad", "poor", "fair", "good", "perfect")
QUALITY_ANCHORS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)

# Factor axes in the fixed order of the prompt tensor (official-code order):
# blur 3, occlusion 2, pose 3, expression 2, lighting 2; quality 5 is last.
FACTOR_CLASSES: dict[str, tuple[str, ...]] = {
    "blur": ("hazy", "blurry", "clear"),
    "occlusion": ("obstructed", "unobstructed"),
    "pose": ("profile", "slight angle", "frontal"),
    "expression": ("exaggerated expression", "typical expression"),
    "lighting": ("extreme lighting", "normal lighting"),
}
FACTORS: tuple[str, ...] = tuple(FACTOR_CLASSES)
FACTOR_SHAPE: tuple[int, ...] = tuple(len(v) for v in FACTOR_CLASSES.values())  # (3, 2, 3, 2, 2)
N_JOINT_FACTORS: int = math.prod(FACTOR_SHAPE)  # 72
PROMPT_SHAPE: tuple[int, ...] = FACTOR_SHAPE + (len(QUALITY_LEVELS),)  # (3, 2, 3, 2, 2, 5)
N_PROMPTS: int = math.prod(PROMPT_SHAPE)  # 360

PROMPT_TEMPLATE = (
    "a photo of a {blur}, {occlusion}, and {pose} face with {expression} "
    "under {lighting}, which is of {quality} quality"
)

# Default thresholds (paper Sec. 4.1, except blur).
PAPER_BLUR_THRESHOLDS: tuple[float, float] = (0.35, 0.7)  # paper: CPBD < 0.35 hazy, 0.35-0.7 blurry, > 0.7 clear
# True CPBD of 112x112 aligned faces, calibrated on real faces (docs/blur.md: `python -m benchmarks.calibrate_blur`).
CALIBRATED_BLUR_THRESHOLDS: tuple[float, float] = (0.018, 0.083)  # < 0.018 hazy, up to 0.083 blurry, above clear
BLUR_THRESHOLDS: tuple[float, float] = CALIBRATED_BLUR_THRESHOLDS
NAMED_BLUR_THRESHOLDS: dict[str, tuple[float, float]] = {
    "calibrated": CALIBRATED_BLUR_THRESHOLDS,
    "paper": PAPER_BLUR_THRESHOLDS,
}
POSE_THRESHOLDS: tuple[float, float] = (10.0, 25.0)  # |yaw| deg: < 10 frontal, 10-25 slight, > 25 profile
BINARY_THRESHOLD: float = 0.5  # default probability threshold of the attribute CNN heads


@dataclass(frozen=True)
class FactorClass:
    """A class decision: index into FACTOR_CLASSES[factor] and its name."""

    factor: str
    index: int

    @property
    def name(self) -> str:
        return FACTOR_CLASSES[self.factor][self.index]


def ordered_thresholds(values: Any, what: str) -> tuple[float, float]:
    """(low, high) as floats, or a ValueError naming `what` when they are not two ordered numbers."""
    lo, hi = (float(v) for v in values)
    if not lo <= hi:
        raise ValueError(f"{what} thresholds must be ordered (low <= high), got ({lo}, {hi})")
    return lo, hi


def _band(value: float, thresholds: tuple[float, float], what: str, quantity: str) -> int:
    """0 below the low threshold, 2 above the high one, 1 between (both inclusive); NaN is an error."""
    lo, hi = ordered_thresholds(thresholds, what)
    if math.isnan(value):
        raise ValueError(f"{what}_class: {quantity} is NaN")
    return 0 if value < lo else 2 if value > hi else 1


def blur_class(cpbd: float, thresholds: tuple[float, float] = BLUR_THRESHOLDS) -> FactorClass:
    """CPBD -> hazy (< low), blurry (low..high, both inclusive), clear (> high)."""
    return FactorClass("blur", _band(cpbd, thresholds, "blur", "CPBD value"))


class ThresholdsError(ValueError, argparse.ArgumentTypeError):
    """Bad threshold text: a ValueError for callers, and argparse shows its message as it is."""


def parse_blur_thresholds(text: str) -> tuple[float, float]:
    """Blur thresholds from 'calibrated', 'paper' or 'LOW,HIGH' (ordered numbers in 0..1); usable as argparse type."""
    key = text.strip().lower()
    if key in NAMED_BLUR_THRESHOLDS:
        return NAMED_BLUR_THRESHOLDS[key]
    try:
        lo, hi = (float(v) for v in key.split(","))
    except ValueError:
        raise ThresholdsError(
            f"blur thresholds must be {' or '.join(repr(k) for k in NAMED_BLUR_THRESHOLDS)} or 'LOW,HIGH', got {text!r}"
        ) from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ThresholdsError(f"blur thresholds must satisfy 0 <= LOW <= HIGH <= 1 (CPBD range), got {text!r}")
    return lo, hi


def pose_class(yaw_degrees: float, thresholds: tuple[float, float] = POSE_THRESHOLDS) -> FactorClass:
    """|yaw| -> frontal (< low), slight angle (low..high, both inclusive), profile (> high)."""
    return FactorClass("pose", 2 - _band(abs(yaw_degrees), thresholds, "pose", "yaw"))


def binary_class(factor: str, probability: float, threshold: float = BINARY_THRESHOLD) -> FactorClass:
    """Attribute probability of the adverse class (obstructed / exaggerated / extreme) -> class.

    Index 0 is the adverse class for occlusion, expression and lighting, so
    probability >= threshold gives index 0.
    """
    if factor not in ("occlusion", "expression", "lighting"):
        raise ValueError(f"binary_class: {factor!r} is not a binary factor")
    if math.isnan(probability):
        raise ValueError(f"binary_class: {factor} probability is NaN")
    return FactorClass(factor, 0 if probability >= threshold else 1)


def class_index(factor: str, name: str) -> int:
    """Index of a class name on its factor axis, with a clear error for unknown names."""
    try:
        return FACTOR_CLASSES[factor].index(name)
    except (KeyError, ValueError) as e:
        raise ValueError(f"unknown class {name!r} for factor {factor!r}; known: {FACTOR_CLASSES.get(factor)}") from e


def prompts() -> list[str]:
    """The 360 prompts in row-major order of PROMPT_SHAPE (quality varies fastest)."""
    axes = [*FACTOR_CLASSES.values(), QUALITY_LEVELS]
    keys = [*FACTORS, "quality"]
    return [PROMPT_TEMPLATE.format(**dict(zip(keys, combo, strict=True))) for combo in itertools.product(*axes)]
