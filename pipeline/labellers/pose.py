"""The pose label stage: |yaw| of a head-pose backend -> frontal / slight / large.

The yaw/pitch/roll sign convention and rotation <-> angles are in `models.geometry`.
Only |yaw| decides the pose class (paper Sec. 4.1: faces are already aligned).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from data_manifest.vocabulary import POSE_THRESHOLDS, binary_class, pose_class
from models.geometry import HeadPose
from pipeline.labellers.base import ERROR, OK, FaceCrop, crop_problem, factor_row


class PoseBackend(Protocol):
    """Estimates head pose on an aligned crop, using measured 5 landmarks (crop pixels) when given.

    A backend may also offer `estimate_batch(crops, landmarks5) -> list[HeadPose | Exception]`
    (one entry per crop, the exception that stopped it where it has no pose); the stage then
    hands it all of a batch's usable crops at once.
    """

    name: str
    version: str

    def estimate(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> HeadPose: ...


# A class is withheld (the row keeps its yaw, class null) where the yaw lies within AMBIGUOUS_MARGIN of a class
# threshold and moves more than AMBIGUOUS_SPREAD when the landmark search starts from other boxes: a hidden or
# unreadable part of the face then decides the side of the threshold, not the head (docs/labelling.md,
# "Pose"). Both were set on the fit faces only: the spread is the 80th percentile of the clean fit faces'.
AMBIGUOUS_MARGIN = 4.0  # degrees
AMBIGUOUS_SPREAD = 0.5  # degrees (standard deviation of three starts)
# On a face the occlusion labeller calls obstructed, the landmark search is misled by the occluder as a whole (the
# yaw moves by 2.5 degrees in the median and 8-9 at the 90th percentile under pasted lower-face occluders on the fit
# faces; fitting only the visible landmarks moved it as much or more), so the class is withheld within this wider
# margin of a threshold, and at any yaw where the three starts disagree by more than OBSTRUCTED_SPREAD. Set on the fit
# faces only.
OBSTRUCTED_MARGIN = 6.0  # degrees
OBSTRUCTED_SPREAD = 1.0  # degrees


class Obstruction(Protocol):
    """The occlusion labeller as the pose stage reads it: P(obstructed) of 112x112 crops and its class threshold."""

    labeller: str
    version: str
    threshold: float

    def probabilities(self, crops: np.ndarray) -> np.ndarray: ...


def near_threshold(yaw: float, thresholds: tuple[float, float], margin: float = AMBIGUOUS_MARGIN) -> bool:
    return min(abs(abs(yaw) - t) for t in thresholds) < margin


class PoseStage:
    """Label stage: one `pose` factors row per crop, value = yaw in degrees, class by |yaw| thresholds."""

    name = "pose"

    def __init__(self, backend: PoseBackend, thresholds: tuple[float, float] = POSE_THRESHOLDS,
                 withhold: bool = True, obstruction: Obstruction | None = None) -> None:
        """`withhold`: withhold the class of ambiguous yaws (backends with `yaw_spread_batch` in invariant mode);
        `obstruction`: the occlusion labeller whose obstructed faces get the wider check (with `withhold` only)."""
        pose_class(0.0, thresholds)  # validates the thresholds before any work
        self.backend = backend
        self.thresholds = (float(thresholds[0]), float(thresholds[1]))
        self.labeller = f"pose/{backend.name}"
        self.withholds = withhold and getattr(backend, "invariant", False) and hasattr(backend, "yaw_spread_batch")
        self.obstruction = obstruction if self.withholds else None
        self.version = str(backend.version) + ("+ambiguous-withheld" if self.withholds else "") + (
            f"+obstructed-withheld({obstruction.labeller}:{obstruction.version})" if self.obstruction else "")

    def _common(self) -> dict[str, Any]:
        return {"labeller": self.labeller, "labeller_version": self.version, "thresholds": list(self.thresholds)}

    def _unusable(self, face: FaceCrop) -> dict[str, Any] | None:
        """The row of a face without a usable crop, else None."""
        if face.status != OK:
            return factor_row(face.sample_id, "pose", status=face.status,
                              error=face.error or f"no crop (status {face.status})", **self._common())
        if face.crop is None:
            return factor_row(face.sample_id, "pose", status=ERROR, error="crop is missing although status is ok",
                              **self._common())
        return None

    def _is_obstructed(self, p_obstructed: float | None) -> bool:
        """Whether the occlusion labeller's class of this probability is obstructed."""
        return p_obstructed is not None and self.obstruction is not None and \
            binary_class("occlusion", p_obstructed, self.obstruction.threshold).name == "obstructed"

    def _withheld(self, yaw: float, spread: float | None, p_obstructed: float | None) -> str | None:
        """Why the class of this yaw is withheld, or None (spread NaN: a moved start found no pose)."""
        if self._is_obstructed(p_obstructed):
            face = f"face obstructed (p {p_obstructed:.2f})"
            if near_threshold(yaw, self.thresholds, OBSTRUCTED_MARGIN):
                return f"{face} and yaw within {OBSTRUCTED_MARGIN:g} deg of a class threshold"
            if spread is not None and not spread <= OBSTRUCTED_SPREAD:
                return f"{face} and yaw unstable (spread {spread:.2f} > {OBSTRUCTED_SPREAD:g} deg)"
            return None
        if spread is not None and near_threshold(yaw, self.thresholds) and not spread <= AMBIGUOUS_SPREAD:
            return (f"yaw within {AMBIGUOUS_MARGIN:g} deg of a class threshold and unstable "
                    f"(spread {spread:.2f} > {AMBIGUOUS_SPREAD:g} deg)")
        return None

    def _row(self, face: FaceCrop, pose: HeadPose | Exception, spread: float | None = None,
             p_obstructed: float | None = None) -> dict[str, Any]:
        try:
            if isinstance(pose, Exception):
                raise pose
            decision = pose_class(pose.yaw, self.thresholds)
        except (ValueError, RuntimeError) as e:
            return factor_row(face.sample_id, "pose", status=ERROR, error=f"{type(e).__name__}: {e}",
                              **self._common())
        details = {"yaw": pose.yaw, "pitch": pose.pitch, "roll": pose.roll, **pose.details}
        if spread is not None:
            details["yaw_spread"] = spread
        if p_obstructed is not None:
            details["p_obstructed"] = p_obstructed
        why = self._withheld(pose.yaw, spread, p_obstructed)
        if why is not None:
            details["class_withheld"] = why
            decision = None
        return factor_row(face.sample_id, "pose", value=pose.yaw, decision=decision, details=details,
                          **self._common())

    def _obstructed(self, crops: list[np.ndarray]) -> list[float | None]:
        """P(obstructed) of each crop the occlusion labeller can read (112x112 RGB uint8), None elsewhere."""
        out: list[float | None] = [None] * len(crops)
        if self.obstruction is None:
            return out
        idx = [i for i, c in enumerate(crops) if crop_problem(FaceCrop("", c)) is None]
        if idx:
            p = np.asarray(self.obstruction.probabilities(np.stack([crops[i] for i in idx])), dtype=np.float64)
            for i, v in zip(idx, p, strict=True):
                out[i] = float(v) if np.isfinite(v) else None
        return out

    def _checks(self, crops: list[np.ndarray], landmarks: list[np.ndarray | None],
                poses: list[HeadPose | Exception]) -> tuple[list[float | None], list[float | None]]:
        """The yaw spread (where it decides: near a threshold, or on an obstructed face) and P(obstructed) of each
        crop; None where not measured."""
        spreads: list[float | None] = [None] * len(poses)
        if not self.withholds:
            return spreads, [None] * len(poses)
        found = [i for i, p in enumerate(poses) if not isinstance(p, Exception) and np.isfinite(p.yaw)]
        p_obstructed: list[float | None] = [None] * len(poses)
        for i, p in zip(found, self._obstructed([crops[i] for i in found]), strict=True):
            p_obstructed[i] = p
        yaws = {i: float(poses[i].yaw) for i in found}  # type: ignore[union-attr]
        need = [i for i in found if (not near_threshold(yaws[i], self.thresholds, OBSTRUCTED_MARGIN)
                                     if self._is_obstructed(p_obstructed[i]) else
                                     near_threshold(yaws[i], self.thresholds))]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in need:
            groups.setdefault(np.shape(crops[i]), []).append(i)
        for idx in groups.values():
            measured = self.backend.yaw_spread_batch([crops[i] for i in idx], [landmarks[i] for i in idx],
                                                     [yaws[i] for i in idx])
            for i, s in zip(idx, measured, strict=True):
                spreads[i] = float(s)
        return spreads, p_obstructed

    def label(self, face: FaceCrop) -> dict[str, Any]:
        """The factors row of one crop; failures become rows with a status and reason."""
        row = self._unusable(face)
        if row is not None:
            return row
        try:
            pose: HeadPose | Exception = self.backend.estimate(face.crop, face.landmarks)
        except (ValueError, RuntimeError) as e:
            pose = e
        spreads, p_obstructed = self._checks([face.crop], [face.landmarks], [pose])
        return self._row(face, pose, spreads[0], p_obstructed[0])

    def __call__(self, batch: Sequence[FaceCrop]) -> list[dict[str, Any]]:
        """Rows of a batch, in order; a backend with `estimate_batch` gets all usable crops in one call."""
        many = getattr(self.backend, "estimate_batch", None)
        if many is None:
            return [self.label(face) for face in batch]
        rows: list[dict[str, Any] | None] = [self._unusable(face) for face in batch]
        todo = [i for i, row in enumerate(rows) if row is None]
        poses = many([batch[i].crop for i in todo], [batch[i].landmarks for i in todo]) if todo else []
        if len(poses) != len(todo):
            raise RuntimeError(f"pose backend {self.backend.name!r} returned {len(poses)} poses for {len(todo)} crops")
        spreads, p_obstructed = self._checks([batch[i].crop for i in todo], [batch[i].landmarks for i in todo],
                                             poses)
        for i, pose, spread, p in zip(todo, poses, spreads, p_obstructed, strict=True):
            rows[i] = self._row(batch[i], pose, spread, p)
        return rows  # type: ignore[return-value]  (every entry is filled)
