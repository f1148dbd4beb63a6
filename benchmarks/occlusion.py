"""How the occlusion labeller does on faces, occluders and textures it never saw; prints one JSON object.

Variants of every face: clean, dark (gamma 3, gain 0.35), overexposed (2 stops),
side light, Gaussian blur (sigma 2.4 px), downscaled 4x, a fixed grey band over
the lower face, each insightface mask texture, and `--draws` random occluders
of every family (photo textures of the HELD-OUT split, never trained on) plus
benign pastes. Rates are P(obstructed) >= threshold per variant, on the held-out
package faces and on the fit faces (`models.occlusion.fit_faces`: every FIT
source but the faces wearing a real occluder). Those faces, never trained on, are rated
apart (`real_occluders`: P(obstructed) per face, and per kind how many are called obstructed).

With `--two-fold` the fit faces are split in two halves (alternate faces of the
fit list), a model is trained on each half with the shipped model's config, and
each is rated on the other half: the rates of faces the model never saw, pooled
over both halves, overall and per source. The halves share people (the human
thumbnails are cut from the same group photos as face-api), so this estimate is
optimistic about new people; the held-out faces stay the headline.

With `--leave-out FAMILY ...` a model is trained per family with that family
left out (same config otherwise) and its obstructed rate on that family is
reported on the held-out faces: how the labeller does on an occluder kind it
has never seen.

    python -m benchmarks.occlusion [--model PATH] [--leave-out mask hand sunglasses band] [--two-fold]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import occlusion as mo
from models.fit_data import occluders as occ
from pipeline.synthetic import degrade

GREY_BAND = {"grey": 90.0}  # like pipeline.synthetic.degrade.occlusion's patch value


def _pasted(crop: np.ndarray, landmarks: np.ndarray | None, family: str, rng: np.random.Generator,
            bank: occ.TextureBank, **kwargs: Any) -> list[tuple[np.ndarray, bool]]:
    """One paste as (image, expected obstructed) in a list, or an empty list where the family's shape does not
    fit the face (a mask needs the nose tip well under the eyes, which a face seen from below may not have)."""
    try:
        return [(occ.paste(crop, landmarks, family, rng, bank, **kwargs).image, family != occ.BENIGN)]
    except ValueError:
        return []


def variants(crop: np.ndarray, landmarks: np.ndarray | None, rng: np.random.Generator, bank: occ.TextureBank,
             draws: int, families: Sequence[str] = occ.FAMILIES) -> dict[str, list[tuple[np.ndarray, bool]]]:
    """Named variants of one face: (image, expected obstructed) lists."""
    frame = occ.FaceFrame.from_landmarks(landmarks)
    nose_v, mouth_v = frame.point_uv(2)[1], (frame.point_uv(3)[1] + frame.point_uv(4)[1]) / 2
    out: dict[str, list[tuple[np.ndarray, bool]]] = {
        "clean": [(crop, False)],
        "dark": [(degrade.dark(crop, 3), False)],
        "overexposed": [(degrade.overexpose(crop, 2), False)],
        "side_light": [(degrade.side_light(crop, 2), False)],
        "blur": [(cv2.GaussianBlur(crop, (0, 0), 2.4), False)],
        "downscale": [(degrade.downscale(crop, 2), False)],
        "grey_band": _pasted(crop, landmarks, "band", rng, bank, top=(nose_v + mouth_v) / 2, edge_sigma=0.0,
                             **GREY_BAND),
    }
    out["degrade_patch"] = [(degrade.occlusion(crop, 2), True)]  # pipeline.synthetic.degrade's grey patch, on the crop
    out["degrade_mask"] = [(degrade.mask(crop, level), True) for level in (1, 2, 3)]
    for tex in occ.MASK_TEXTURES:
        out[f"mask:{tex}"] = _pasted(crop, landmarks, "mask", rng, bank, texture=tex)
    for fam in families:
        out[f"family:{fam}"] = [v for _ in range(draws) for v in _pasted(crop, landmarks, fam, rng, bank)]
    out["benign"] = [v for _ in range(draws) for v in _pasted(crop, landmarks, occ.BENIGN, rng, bank)]
    out["dark+mask"] = [(degrade.dark(im, 3), True) for im, _ in out["mask:mask_white"]]
    out["blur+grey_band"] = [(cv2.GaussianBlur(im, (0, 0), 2.4), True) for im, _ in out["grey_band"]]
    return out


def rates(model: mo.OcclusionModel, faces: Sequence[Any], seed: int, draws: int,
          families: Sequence[str] = occ.FAMILIES) -> dict[str, dict[str, float]]:
    """Per variant: obstructed rate, mean P(obstructed), count."""
    rng = np.random.default_rng(seed)
    bank = occ.TextureBank(photos=occ.HELD_OUT_TEXTURES, skins=[occ.skin_patch(f.crop, f.landmarks) for f in faces])
    pooled: dict[str, list[tuple[np.ndarray, bool]]] = {}
    for f in faces:
        for name, items in variants(f.crop, f.landmarks, rng, bank, draws, families).items():
            pooled.setdefault(name, []).extend(items)
    out = {}
    for name, items in ((k, v) for k, v in pooled.items() if v):
        p = mo.predict_proba(model, np.stack([im for im, _ in items]))
        out[name] = {"obstructed": round(float((p >= model.threshold).mean()), 3),
                     "mean_p": round(float(p.mean()), 3), "n": len(items)}
    return out


def merged(parts: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Rates of several disjoint face sets merged into one (count-weighted)."""
    out = {}
    for name in dict.fromkeys(k for p in parts for k in p):
        have = [p[name] for p in parts if name in p]
        n = sum(r["n"] for r in have)
        out[name] = {k: round(sum(r[k] * r["n"] for r in have) / n, 3) for k in ("obstructed", "mean_p")}
        out[name]["n"] = n
    return out


def tight_faces(faces: Sequence[Any], photos_root: str | Path | None = None, *,
                photos: dict[str, np.ndarray] | None = None, detector: Any = None) -> dict[str, Any]:
    """Face name -> the face again (`face_sets.RealFace`), detected and aligned in a crop of its photo to its
    detector box (`face_sets.real_faces`, the most confident face found there).

    The aligner pads past the crop's edges with black, as it does for a tight face photo (the held-out sets'
    `*_crop` pictures are 28-47 % black once aligned) or a face at a photo's edge: real padding, not the training
    data's own. A face the detector misses in its tight crop is left out. `photos` (name -> RGB image; default:
    the FIT sources' photos under `photos_root`) and `detector` (default: MTCNN) are for other faces and tests.
    """
    from dataclasses import replace

    from models.detectors import MTCNNDetector
    from models.fit_data import face_sets
    from models.fit_data import face_sources as S

    if photos is None:
        photos = {}
        for src in S.split_sources(S.FIT):
            folder = None if photos_root is None else Path(photos_root) / src.name
            photos.update(face_sets.source_photos(src.name, folder))
    detector = MTCNNDetector() if detector is None else detector
    out = {}
    for f in faces:
        x1, y1, x2, y2 = (int(v) for v in f.box)
        crop = np.ascontiguousarray(photos[f.photo][max(0, y1):y2 + 1, max(0, x1):x2 + 1])
        found = face_sets.real_faces({"tight": crop}, detector, min_side=0.0, min_score=0.0)
        if found:
            out[f.name] = replace(max(found, key=lambda g: g.score), name=f.name, photo=f.photo)
    return out


def two_fold(fit: Sequence[Any], config: mo.TrainConfig, seed: int, draws: int, tmp: Path,
             tight: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on each half of the fit faces (alternate faces), rate on the other: pooled and per source, and
    (`tight`: `tight_faces` of the fit faces) the other half's faces aligned from tight crops of their photos."""
    from models.fit_data.face_sources import FIT, split_sources

    halves = [list(fit[0::2]), list(fit[1::2])]
    photo_source = {Path(k).stem: src.name for src in split_sources(FIT) for k in src.photos}
    sources = {f.name: photo_source[f.photo] for f in fit}
    parts: dict[str, list[dict[str, dict[str, float]]]] = {}
    parts_tight: list[dict[str, dict[str, float]]] = []
    for k, (train_on, rate_on) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
        net, info = mo.train([f.crop for f in train_on], [f.landmarks for f in train_on], config)
        path = tmp / f"half{k}.pt"
        mo.save_model(net, config, [f.name for f in train_on], info, path)
        model = mo.load_model(path)
        for src in sorted({sources[f.name] for f in rate_on}):
            parts.setdefault(src, []).append(rates(model, [f for f in rate_on if sources[f.name] == src], seed, draws))
        if tight:
            parts_tight.append(rates(model, [tight[f.name] for f in rate_on if f.name in tight], seed, draws))
        print(f"two-fold: half {k} trained on {len(train_on)} faces", file=sys.stderr)
    by_source = {src: merged(p) for src, p in parts.items()}
    every = merged([r for p in parts.values() for r in p])
    out = {"faces": [len(h) for h in halves], "unseen": every, "unseen_summary": summary(every),
           "by_source": {src: {"faces": r["clean"]["n"], **summary(r)} for src, r in by_source.items()}}
    if parts_tight:
        r = merged(parts_tight)
        out["tight"] = {"faces": r["clean"]["n"], **summary(r),
                        **{k: v["obstructed"] for k, v in r.items() if k.startswith("family:") or k == "benign"}}
    return out


def worn_faces(photos_root: str | Path | None = None) -> list[Any]:
    """The FIT faces that wear a real occluder (`face_sets.WORN_OCCLUDERS`), which `models.occlusion.fit_faces`
    leaves out of every training."""
    from models.fit_data.face_sets import WORN_OCCLUDERS, split_faces
    from models.fit_data.face_sources import FIT

    by_source = split_faces(FIT, require_all=True, photos_root=photos_root)
    return [f for faces in by_source.values() for f in faces if f.name in WORN_OCCLUDERS]


def real_occluders(model: mo.OcclusionModel, faces: Sequence[Any]) -> dict[str, Any]:
    """P(obstructed) of the fit faces that wear a real occluder (`face_sets.WORN_OCCLUDERS`: left out of every
    training, so unseen), per face and, per occluder kind, how many are called obstructed."""
    from models.fit_data.face_sets import WORN_OCCLUDERS

    if not faces:
        return {"faces": {}, "by_kind": {}}
    p = mo.predict_proba(model, np.stack([f.crop for f in faces]))
    per_face = {f.name: {"kind": WORN_OCCLUDERS[f.name], "p_obstructed": round(float(q), 3)}
                for f, q in zip(faces, p, strict=True)}
    by_kind: dict[str, dict[str, int]] = {}
    for row in per_face.values():
        k = by_kind.setdefault(row["kind"], {"faces": 0, "obstructed": 0})
        k["faces"] += 1
        k["obstructed"] += int(row["p_obstructed"] >= model.threshold)
    return {"faces": per_face, "by_kind": by_kind}


def summary(r: dict[str, dict[str, float]]) -> dict[str, float]:
    """The issue's targets: clean unobstructed, lower-face occluders and masks obstructed, dark/blur unobstructed."""
    lower = [k for k in r if k == "grey_band" or k.startswith("mask:")
             or k in {f"family:{f}" for f in occ.LOWER_FACE_FAMILIES}]
    n_lower = sum(r[k]["n"] for k in lower)
    return {
        "clean_unobstructed": round(1 - r["clean"]["obstructed"], 3),
        "lower_face_and_masks_obstructed": round(sum(r[k]["obstructed"] * r[k]["n"] for k in lower) / n_lower, 3),
        "dark_blur_unobstructed": round(1 - (r["dark"]["obstructed"] + r["blur"]["obstructed"]) / 2, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.occlusion", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="occlusion checkpoint (default: the model store's)")
    p.add_argument("--photos-root", default=None,
                   help="folder with one photo folder per FIT source (default: <model store>/photos)")
    p.add_argument("--draws", type=int, default=4, help="random occluders per family and face")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--leave-out", nargs="*", default=[], choices=occ.FAMILIES,
                   help="train one model per family without it and report that family on held-out faces")
    p.add_argument("--no-fit", action="store_true", help="skip the fit-face rates")
    p.add_argument("--two-fold", action="store_true",
                   help="train on each half of the fit faces and report the other half (faces it never saw)")
    args = p.parse_args(argv)
    from models.fit_data.face_sets import HELD_OUT_SOURCE, face_set

    held = face_set(HELD_OUT_SOURCE)
    model = mo.load_model(args.model)
    report: dict[str, Any] = {"model": {"path": str(model.path), "version": model.version, "sha256": model.sha256,
                                        "threshold": model.threshold},
                              "held_out_faces": len(held)}
    report["held_out"] = rates(model, held, args.seed, args.draws)
    report["held_out_summary"] = summary(report["held_out"])
    fit = None
    if not args.no_fit or args.leave_out or args.two_fold:
        fit = mo.fit_faces(args.photos_root)
    if not args.no_fit:
        report["fit_faces"] = len(fit)
        report["fit"] = rates(model, fit, args.seed, args.draws)
        report["fit_summary"] = summary(report["fit"])
        report["real_occluders"] = real_occluders(model, worn_faces(args.photos_root))
    base = mo.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.config.items()})
    if args.two_fold:
        with tempfile.TemporaryDirectory() as tmp:
            report["two_fold"] = two_fold(fit, base, args.seed, args.draws, Path(tmp),
                                          tight=tight_faces(fit, args.photos_root))
    if args.leave_out:
        report["leave_family_out"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for fam in args.leave_out:
                cfg = mo.TrainConfig(**{**base.__dict__, "families": tuple(f for f in base.families if f != fam)})
                net, info = mo.train([f.crop for f in fit], [f.landmarks for f in fit], cfg)
                path = Path(tmp) / f"without_{fam}.pt"
                mo.save_model(net, cfg, [f.name for f in fit], info, path)
                r = rates(mo.load_model(path), held, args.seed, args.draws, families=(fam,))
                report["leave_family_out"][fam] = {"family": r[f"family:{fam}"], "clean": r["clean"],
                                                   "grey_band": r["grey_band"], "benign": r["benign"],
                                                   "masks": {k: v for k, v in r.items() if k.startswith("mask:")}}
                print(f"left out {fam}: {r[f'family:{fam}']}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
