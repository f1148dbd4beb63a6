"""The pose label stage: |yaw| of a head-pose backend -> frontal / slight / large.

The yaw/pitch/roll sign convention and rotation <-> angles are in `models.geometry`.
Only |yaw| decides the pose class (paper Sec. 4.1: faces are already aligned).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from data_manifest.vocabulary import POSE_THRESHOLDS, pose_class
from models.geometry import HeadPose
from pipeline.labellers.base import ERROR, OK, FaceCrop, factor_row


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


def near_threshold(yaw: float, thresholds: tuple[float, float], margin: float = AMBIGUOUS_MARGIN) -> bool:
    return min(abs(abs(yaw) - t) for t in thresholds) < margin


class PoseStage:
    """Label stage: one `pose` factors row per crop, value = yaw in degrees, class by |yaw| thresholds."""

    name = "pose"

    def __init__(self, backend: PoseBackend, thresholds: tuple[float, float] = POSE_THRESHOLDS,
                 withhold: bool = True) -> None:
        """`withhold`: withhold the class of ambiguous yaws (backends with `yaw_spread_batch` in invariant mode)."""
        pose_class(0.0, thresholds)  # validates the thresholds before any work
        self.backend = backend
        self.thresholds = (float(thresholds[0]), float(thresholds[1]))
        self.labeller = f"pose/{backend.name}"
        self.withholds = withhold and getattr(backend, "invariant", False) and hasattr(backend, "yaw_spread_batch")
        self.version = str(backend.version) + ("+ambiguous-withheld" if self.withholds else "")

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

    def _row(self, face: FaceCrop, pose: HeadPose | Exception, spread: float | None = None) -> dict[str, Any]:
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
            if not spread <= AMBIGUOUS_SPREAD:  # NaN too: a moved start found no pose
                details["class_withheld"] = (f"yaw within {AMBIGUOUS_MARGIN:g} deg of a class threshold and "
                                             f"unstable (spread {spread:.2f} > {AMBIGUOUS_SPREAD:g} deg)")
                decision = None
        return factor_row(face.sample_id, "pose", value=pose.yaw, decision=decision, details=details,
                          **self._common())

    def _spreads(self, crops: list[np.ndarray], landmarks: list[np.ndarray | None],
                 poses: list[HeadPose | Exception]) -> list[float | None]:
        """The yaw spread of the crops whose yaw is near a threshold (None elsewhere, or without a spread)."""
        out: list[float | None] = [None] * len(poses)
        near = [i for i, p in enumerate(poses) if not isinstance(p, Exception) and np.isfinite(p.yaw)
                and near_threshold(p.yaw, self.thresholds)]
        if not self.withholds or not near:
            return out
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in near:
            groups.setdefault(np.shape(crops[i]), []).append(i)
        for idx in groups.values():
            spreads = self.backend.yaw_spread_batch([crops[i] for i in idx], [landmarks[i] for i in idx],
                                [poses[i].yaw for i in idx])  # type: ignore[union-attr]
            for i, s in zip(idx, spreads, strict=True):
                out[i] = float(s)
        return out

    def label(self, face: FaceCrop) -> dict[str, Any]:
        """The factors row of one crop; failures become rows with a status and reason."""
        row = self._unusable(face)
        if row is not None:
            return row
        try:
            pose: HeadPose | Exception = self.backend.estimate(face.crop, face.landmarks)
        except (ValueError, RuntimeError) as e:
            pose = e
        return self._row(face, pose, self._spreads([face.crop], [face.landmarks], [pose])[0])

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
        spreads = self._spreads([batch[i].crop for i in todo], [batch[i].landmarks for i in todo], poses)
        for i, pose, spread in zip(todo, poses, spreads, strict=True):
            rows[i] = self._row(batch[i], pose, spread)
        return rows  # type: ignore[return-value]  (every entry is filled)
