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


class PoseStage:
    """Label stage: one `pose` factors row per crop, value = yaw in degrees, class by |yaw| thresholds."""

    name = "pose"

    def __init__(self, backend: PoseBackend, thresholds: tuple[float, float] = POSE_THRESHOLDS) -> None:
        pose_class(0.0, thresholds)  # validates the thresholds before any work
        self.backend = backend
        self.thresholds = (float(thresholds[0]), float(thresholds[1]))
        self.labeller = f"pose/{backend.name}"
        self.version = str(backend.version)

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

    def _row(self, face: FaceCrop, pose: HeadPose | Exception) -> dict[str, Any]:
        try:
            if isinstance(pose, Exception):
                raise pose
            decision = pose_class(pose.yaw, self.thresholds)
        except (ValueError, RuntimeError) as e:
            return factor_row(face.sample_id, "pose", status=ERROR, error=f"{type(e).__name__}: {e}",
                              **self._common())
        details = {"yaw": pose.yaw, "pitch": pose.pitch, "roll": pose.roll, **pose.details}
        return factor_row(face.sample_id, "pose", value=pose.yaw, decision=decision, details=details,
                          **self._common())

    def label(self, face: FaceCrop) -> dict[str, Any]:
        """The factors row of one crop; failures become rows with a status and reason."""
        row = self._unusable(face)
        if row is not None:
            return row
        try:
            pose: HeadPose | Exception = self.backend.estimate(face.crop, face.landmarks)
        except (ValueError, RuntimeError) as e:
            pose = e
        return self._row(face, pose)

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
        for i, pose in zip(todo, poses, strict=True):
            rows[i] = self._row(batch[i], pose)
        return rows  # type: ignore[return-value]  (every entry is filled)
