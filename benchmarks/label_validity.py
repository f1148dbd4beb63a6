"""Label validity on real faces: do the factor labels follow known degradations?

    python -m benchmarks.label_validity                      # the package faces (held out), the label flow
    python -m benchmarks.label_validity --photos DIR         # every face in any photo folder (e.g. face-api)
    python -m benchmarks.label_validity --blur-thresholds paper --attributes-checkpoint CKPT   # other labellers
    python -m benchmarks.label_validity --direct             # the stage classes without the flow (faster)
    python -m benchmarks.label_validity --sets held-out      # every fetched held-out set (or fit, or one SOURCE)

Every face of the photos is cut out and aligned (`models.fit_data.face_sets`), then
`pipeline.validity` makes its clean and degraded variants (Gaussian blur
sigma 0.8-3.2 px at 112 px, 2x/4x downscale, dark / overexposed / side light,
pasted occluders with textures the occlusion labeller never saw, a grey patch)
with the labels each should get. By default the variants go through the real
label flow on a temporary workspace, as 112x112 already-aligned inputs
(`fiqa label --aligned --stages align,blur,attributes`): the detector measures
the landmarks, the stages label. `--direct` calls the same registered stages
(`pipeline.labellers.registry.get_stage`) on the crops with the landmarks found on the clean
photo. Prints JSON: per variant the rate of each class, per factor the balanced
accuracy against the expected labels, and each rule's rate against its target;
then (`pipeline.validity_invariance`) the invariance matrix (per degradation,
the flip rate of every other factor's class against the face's clean copy),
both the rates and the matrix by face size (the detector box's shorter side in
the original photo: under 100 px, at least 100 px, all), the images in which
the registered align stage's detector found no face, and the issue's headline
figures as checks (value, target, ok). `--sets` runs on the named face sets
(`models.fit_data.face_sources`) and the JSON says which split each came from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2

from pipeline import validity as V
from pipeline import validity_invariance as I

FACTOR_STAGES = ("blur", "pose", "attributes")  # the default; any registered factor stages (e.g. blur,lighting)
UNSPLIT = "unknown (a photo folder)"


def load_faces(photos: str | None, sets: str | None = None) -> tuple[str, list[Any], dict[str, str]]:
    """(set name, RealFace list, source -> split): the package photos by default, a photo folder, or named sets.

    `sets`: 'fit' or 'held-out' (every fetched source of that split) or one source name.
    """
    from models.fit_data import face_sets
    from models.fit_data import face_sources as S

    if sets is not None:
        if photos is not None:
            raise ValueError("give --photos or --sets, not both")
        if sets in S.SPLITS:
            by_source = face_sets.split_faces(sets)
        else:
            by_source = {sets: face_sets.face_set(S.source(sets).name)}
        splits = {name: S.SOURCES[name].split for name in by_source}
        return sets, [f for faces in by_source.values() for f in faces], splits
    if photos is None:
        return (face_sets.HELD_OUT_SOURCE, face_sets.real_faces(face_sets.package_photos()),
                {face_sets.HELD_OUT_SOURCE: S.HELD_OUT})
    folder = str(Path(photos).expanduser())
    return folder, face_sets.real_faces(face_sets.extra_photos(photos)), {folder: folder_split(folder)}


def folder_split(folder: str | Path) -> str:
    """The split of a photo folder: that of the registered source whose model-store folder it is, else UNSPLIT."""
    from models.fit_data import face_sources as S

    here = Path(folder).expanduser().resolve()
    for src in S.SOURCES.values():
        if src.registry != S.INSTALLED and S.default_dir(src.name).expanduser().resolve() == here:
            return f"{src.split} (the {src.name!r} set's folder)"
    return UNSPLIT


def face_sides(faces: list[Any]) -> dict[str, float]:
    """Face name -> the detector box's shorter side in the original photo (px)."""
    from models.fit_data import face_sets

    return {f.name: face_sets.original_side(f) for f in faces}


def detection_failures(variants: list[V.Variant], options: Any) -> dict[str, Any]:
    """Run the registered align stage (as the flow does on 112x112 inputs) on every image; where it found no face."""
    from pipeline.labellers import registry as L

    align = L.get_stage(L.ALIGN, options)
    found = {}
    for v in variants:
        crop = align([(f"{v.name}/{v.face}", v.image)])[0]
        found[(v.face, v.name)] = crop.status == "ok" and crop.landmarks is not None
    return I.failures(found)


def build_variants(faces: list[Any], occluders: bool = True) -> list[V.Variant]:
    """Every variant of every face (see `pipeline.validity.make_variants`)."""
    return [v for f in faces for v in V.make_variants(f.name, f.crop, f.landmarks, occluders=occluders)]


def _emotion(details: str | dict | None) -> str | None:
    d = json.loads(details) if isinstance(details, str) else details
    return d.get("top") if isinstance(d, dict) else None


def _outcomes(variants: list[V.Variant], rows: dict[tuple[str, str], list[dict[str, Any]]],
              factors: set[str]) -> list[V.Outcome]:
    """Outcomes scored on the factors the run labelled (`factors`; the FER emotion goes with expression)."""
    scored = factors | ({V.EMOTION} if "expression" in factors else set())
    out = []
    for v in variants:
        got = rows.get((v.name, v.face), [])
        by_factor = {r["factor"]: r for r in got}
        labels = {f: (by_factor[f]["class_name"] if f in by_factor and by_factor[f]["status"] == "ok" else None)
                  for f in (*V.FACTORS, *(f for f in I.INVARIANCE_FACTORS if f not in V.FACTORS))}
        expr = by_factor.get("expression")
        emotion = _emotion(expr["details"]) if expr is not None and expr["status"] == "ok" else None
        expect = {f: e for f, e in v.expect.items() if f in scored}
        out.append(V.Outcome(v.face, v.kind, v.level, labels, expect, emotion))
    return out


def label_direct(variants: list[V.Variant], faces: list[Any], options: Any, stages: tuple[str, ...]) -> dict:
    """Factor rows from the registered stages called on the crops (the flow's code path without the flow)."""
    from pipeline.labellers import registry as L
    from pipeline.labellers.base import FaceCrop

    landmarks = {f.name: f.landmarks for f in faces}
    batch = [FaceCrop(f"{v.name}/{v.face}", v.image, landmarks=landmarks[v.face].astype("float64"))
             for v in variants]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for name in stages:
        stage = L.get_stage(name, options)
        for i in range(0, len(batch), 256):
            for r in stage(batch[i:i + 256]):
                rows[tuple(r["sample_id"].split("/", 1))].append(r)  # type: ignore[index]
    return rows


def label_flow(variants: list[V.Variant], options: Any, stages: tuple[str, ...], workdir: Path) -> dict:
    """Factor rows from the real flows: ingest the variant images, `label --aligned`, read `factors` back."""
    from data_manifest import Workspace, catalog
    from flows.ingest import ingest
    from flows.label import label

    data = workdir / "data"
    for v in variants:
        p = data / v.name / f"{v.face}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(p), cv2.cvtColor(v.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {p}")
    ws = Workspace(workdir / "ws")
    ingest(path=str(data), dataset="validity", workspace=str(ws.root), shard_size=512, progress=False)
    label(stages=["align", *stages], options=options.to_params(), workspace=str(ws.root), shard_size=256,
          progress=False)
    tbl = catalog.query(ws, "SELECT s.source, f.factor, f.class_name, f.status, f.details, f.labeller, "
                            "f.labeller_version FROM factors f JOIN samples s USING (sample_id)")
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in tbl.to_pylist():
        p = Path(r["source"])
        rows[(p.parent.name, p.stem)].append(r)
    return rows


def run(photos: str | None = None, *, sets: str | None = None, direct: bool = False,
        blur_thresholds: str = "calibrated", attributes_checkpoint: str | None = None, detector: str = "mtcnn",
        occluders: bool = True, workdir: str | None = None, stages: tuple[str, ...] = FACTOR_STAGES) -> dict[str, Any]:
    """The validity report of the label stages on the faces of `photos` (see the module docstring)."""
    from pipeline.labellers import registry as L

    t0 = time.perf_counter()
    options = L.options_from({"align_mode": "already_aligned", "detector": detector,
                              "blur_thresholds": blur_thresholds, "attributes_checkpoint": attributes_checkpoint})
    stages = tuple(n for n in L.parse_stages(stages) if n != L.ALIGN)
    source, faces, splits = load_faces(photos, sets)
    if not faces:
        raise ValueError(f"no face found in the photos of {source}")
    variants = build_variants(faces, occluders)
    if direct:
        rows = label_direct(variants, faces, options, stages)
    elif workdir is not None:
        rows = label_flow(variants, options, stages, Path(workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="label_validity_") as tmp:
            rows = label_flow(variants, options, stages, Path(tmp))
    labellers = sorted({f"{r['factor']}: {r['labeller']} {r['labeller_version']}"
                        for rs in rows.values() for r in rs})
    factors = {f for n in stages for f in L.STAGES[n].factors}
    outcomes = _outcomes(variants, rows, factors)
    rep = V.report(outcomes)
    sides = face_sides(faces)
    crops = {f.name: f.crop for f in faces}
    inv_factors = [f for f in I.INVARIANCE_FACTORS if f in factors]
    buckets = I.by_size(outcomes, sides)
    matrix = {b: I.invariance_matrix(o, inv_factors) for b, o in buckets.items()}
    return {"photos": source, "splits": splits, "faces": [f.name for f in faces],
            "mode": "direct" if direct else "flow",
            "face_size": {"measure": "detector box's shorter side in the original photo (px)",
                          "small_below": I.SMALL_FACE, "faces": {k: round(v, 1) for k, v in sides.items()},
                          "counts": {b: len({o.face for o in o_}) for b, o_ in buckets.items()}},
            "stages": list(stages),
            "options": {k: options.to_params()[k] for k in ("align_mode", "detector", "blur_thresholds",
                                                             "attributes_checkpoint")},
            "labellers": labellers, "n_variants": len(variants), **rep,
            "variants_by_size": {b: V.class_rates(o) for b, o in buckets.items() if b != I.ALL},
            "invariance": matrix,
            "headline_checks": I.headline_checks(outcomes, sides, matrix[I.ALL]),
            "alignment_failures": detection_failures(variants, options),
            "faces_most_missed": [{**m, "side_px": round(sides[m["face"]], 1),
                                   "padding_share": round(V.padding_share(crops[m["face"]]), 3)}
                                  for m in V.face_misses(outcomes)],
            "seconds": round(time.perf_counter() - t0, 1)}


def format_matrix(matrix: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    """The invariance matrix per size bucket and the headline checks as text tables."""
    lines = []
    for bucket, rows in matrix.items():
        factors = [f for f in I.INVARIANCE_FACTORS if any(f in r for r in rows.values())]
        lines.append(f"\ninvariance, faces {bucket}: flip rate % (unknown)")
        lines.append(f"{'degradation':34s} {'n':>5s} " + " ".join(f"{f:>12s}" for f in factors))
        for name, r in rows.items():
            cells = []
            for f in factors:
                c = r.get(f)
                if c == I.EXPECTED:
                    cells.append(f"{'expected':>12s}")
                elif not c or c["flip_rate"] is None:
                    cells.append(f"{'-':>12s}")
                else:
                    cells.append(f"{100 * c['flip_rate']:7.1f} ({c['unknown']:2d})")
            lines.append(f"{name:34s} {r['variants']:5d} " + " ".join(cells))
    lines.append("\nheadline checks")
    for c in checks:
        v = "-" if c["value"] is None else f"{100 * c['value']:.1f} %"
        lines.append(f"{'ok ' if c['ok'] else 'NO '} {c['check']:45s} {v:>8s} {c['comparison']} "
                     f"{100 * c['target']:.0f} %  (n={c['n']})")
    return "\n".join(lines)


def format_misses(worst: list[dict[str, Any]]) -> str:
    """The faces that missed their expected labels most, one line each."""
    lines = ["\nfaces that missed most (misses / expectations scored; box side; share of black padding)"]
    for m in worst:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(m["by_kind"].items(), key=lambda kv: (-kv[1], kv[0]))[:4])
        lines.append(f"{m['face'][:34]:34s} {m['misses']:3d} / {m['scored']:3d}  {m['side_px']:6.0f} px  "
                     f"{100 * m['padding_share']:4.0f} % black  {kinds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.label_validity", description=__doc__.splitlines()[0])
    p.add_argument("--photos", default=None,
                   help="a folder of photos (default: the photos installed packages ship, the held-out set)")
    p.add_argument("--sets", default=None, help="run on named face sets: fit, held-out or one source name "
                                                "(models.fit_data.face_sources; fetch them first)")
    p.add_argument("--direct", action="store_true", help="call the stages directly instead of the label flow")
    p.add_argument("--blur-thresholds", default="calibrated", help="calibrated (default), paper or LOW,HIGH")
    p.add_argument("--attributes-checkpoint", default=None,
                   help="label occlusion/expression/lighting with this WIDER-trained CNN instead of the defaults")
    p.add_argument("--detector", default="mtcnn", choices=("mtcnn", "scrfd", "auto", "none"),
                   help="landmark measurement on the aligned inputs in flow mode (default: mtcnn)")
    p.add_argument("--stages", default=",".join(FACTOR_STAGES),
                   help="factor stages to run (default: %(default)s; e.g. blur,expression,lighting)")
    p.add_argument("--no-occluders", action="store_true", help="leave out the pasted-occluder variants")
    p.add_argument("--workdir", default=None, help="keep the flow's images and workspace here (default: temporary)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    try:
        result = run(args.photos, sets=args.sets, direct=args.direct, blur_thresholds=args.blur_thresholds,
                     attributes_checkpoint=args.attributes_checkpoint, detector=args.detector,
                     occluders=not args.no_occluders, workdir=args.workdir, stages=tuple(args.stages.split(",")))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"label_validity: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    print(format_matrix(result["invariance"], result.get("headline_checks", [])), file=sys.stderr)
    print(format_misses(result["faces_most_missed"]), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
