"""Aligned real faces for tests: one ArcFace-aligned 112x112 crop per face that installed packages ship."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest


@lru_cache(maxsize=1)
def _build() -> tuple[tuple[str, np.ndarray], ...]:
    dlib = pytest.importorskip("dlib")
    frm = pytest.importorskip("face_recognition_models")
    from models.fit_data.face_sets import shipped_images
    from models.geometry import similarity_transform, warp

    imgs = shipped_images()
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(frm.pose_predictor_model_location())
    out = [("tom_hanks", imgs["tom_hanks"])]  # shipped already aligned
    for name in ("t1", "astronaut"):
        rects = sorted(det(imgs[name], 1), key=lambda r: -r.area())
        # astronaut: the largest box (the other detection is the mission badge); t1: left to right
        rects = rects[:1] if name == "astronaut" else sorted(rects, key=lambda r: r.left())
        for i, r in enumerate(rects):
            p = np.array([[q.x, q.y] for q in sp(imgs[name], r).parts()], dtype=np.float64)
            # 68-point landmarks -> the template's 5 points: eye centres, nose tip, mouth corners
            five = np.array([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
            out.append((f"{name}_{i}", warp(imgs[name], similarity_transform(five))))
    return tuple(out)


def aligned_identities() -> dict[str, np.ndarray]:
    """name -> aligned crop (dlib HOG detector + 68 landmarks + Umeyama to the ArcFace template)."""
    return {k: v.copy() for k, v in _build()}
