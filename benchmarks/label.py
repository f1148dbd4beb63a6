"""Label throughput and memory on 112x112 aligned crops: images/s per stage, and peak RSS of the flow by size.

Crops are real faces that packages ship (insightface t1.jpg faces, Tom Hanks,
scikit-image astronaut), aligned with our MTCNN, mirrored, and degraded with
random blur / brightness / noise, encoded as JPEG like an MS1MV2 RecordIO.

Part 1 (in this process): images/s of each stage on --stage-images crops:
decode, align (already-aligned mode: MTCNN measures the 5 landmarks on the
crop; `align_none`: --detector none), blur (CPBD), pose (dlib 68 + PnP, the
whole batch at once), pose (5-landmark geometric), the occlusion, expression
and lighting labellers of the default `attributes` stage, the total of
decode+align+blur+pose(dlib), the label pass of `--aligned --detector none`
(decode + align_none + blur + pose) and the whole five-factor pass (that plus
occlusion, expression and lighting; ms per image of each part; the occlusion
rows come after the pose stage, whose obstruction check measured the crops
already, `occlusion_after_pose`). Peers in the
same run: the blur stage crop by crop against its batched call (and whether
the rows are the same); dlib's HOG frontal-face detector (1x upsampled) on the
same crops, as a ratio to our MTCNN, with both detection rates; dlib's own
shape predictor crop by crop against the batched cascade (and whether the
points are the same); lighting's luminance looked up against computed.

Part 2 (scaling, two child processes): the `label` flow with the processes
runner, 1 then 2 workers, over one insightface RecordIO of --scaling-images
crops (stages --rss-stages, default all five factors; detector --detector):
steady-state images/s of each, their ratio, the wall-clock ratios (of the
run, and of the whole call with Prefect's start), and the MS1MV2 and
WebFace42M projections on --project-cores cores (formula in the JSON and
docs/labelling.md). `--peer-rev REV` runs the same two children with the code
of git revision REV (a temporary worktree) on the same RecordIO and reports
ours over it.

Part 3 (one child process per size): the `label` flow (Prefect, thread runner)
over an insightface RecordIO of N crops with --rss-stages, reporting the
child's peak RSS and images/s; the peak must stay flat as N grows.

    python benchmarks/label.py                          # all parts: 10k and 50k images (long on 2 cores)
    python benchmarks/label.py --rss-sizes 2000 10000   # a quicker check
    python benchmarks/label.py --scaling-only --scaling-images 8000 --peer-rev 180c525   # the five-factor pass
                                                        # against that revision's code (about 8 min on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DISTINCT = 256  # distinct degraded crops, cycled: generation stays cheap, every stage still does real work
PER_IDENTITY = 50
MS1MV2_IMAGES = 5_822_653  # faces in MS1MV2 (insightface faces_emore)
WEBFACE42M_IMAGES = 42_474_558  # faces in WebFace42M (Zhu et al., CVPR 2021)


def base_crops() -> list[np.ndarray]:
    """Aligned 112x112 crops of every package-shipped face, plus mirror images."""
    import cv2
    import insightface
    from skimage import data

    from models.detectors import MTCNNDetector
    from models.geometry import similarity_transform, warp
    from pipeline.labellers.align import AlignStage

    det = MTCNNDetector()
    stage = AlignStage(det)
    folder = Path(insightface.__file__).parent / "data" / "images"
    t1 = np.ascontiguousarray(cv2.imread(str(folder / "t1.jpg"))[:, :, ::-1])
    tom = np.ascontiguousarray(cv2.imread(str(folder / "Tom_Hanks_54745.png"))[:, :, ::-1])
    crops = [stage.align("tom", tom).crop, stage.align("astro", data.astronaut()).crop]
    for d in det.detect(t1):
        if d.score > 0.95 and d.box[2] - d.box[0] > 50:
            crops.append(warp(t1, similarity_transform(d.landmarks)))
    crops = [c for c in crops if c is not None]
    return crops + [np.ascontiguousarray(c[:, ::-1]) for c in crops]


def degraded_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEG crops: random base face, Gaussian blur sigma 0-2.5, brightness 0.6-1.3, noise sigma 0-8."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = base_crops()
    out = []
    for _ in range(n):
        img = bases[rng.integers(len(bases))].astype(np.float32)
        sigma = rng.uniform(0, 2.5)
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        img = img * rng.uniform(0.6, 1.3) + rng.normal(0, rng.uniform(0, 8), img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 1)


def stage_throughput(n: int) -> dict:
    """images/s of each stage on n crops, and the dlib HOG peer ratio."""
    import dlib
    import torch

    from models.detectors import MTCNNDetector
    from models.pose import DlibPnPPose, FiveLandmarkPose
    from models.shape_predictor import ShapePredictor
    from models.weights import dlib_model
    from pipeline import images
    from pipeline.labellers.align import ALREADY_ALIGNED, AlignStage
    from pipeline.labellers.blur import BlurStage
    from pipeline.labellers.occlusion import OcclusionStage
    from pipeline.labellers.pose import PoseStage

    torch.set_num_threads(1)
    jpegs = degraded_jpegs(min(n, DISTINCT))
    jpegs = [jpegs[i % len(jpegs)] for i in range(n)]
    align = AlignStage(MTCNNDetector(min_face_size=40.0), mode=ALREADY_ALIGNED)  # the flow's aligned-mode default
    dlib_backend = DlibPnPPose()

    def default_pose(backend: DlibPnPPose = dlib_backend) -> PoseStage:
        """The registry's default pose stage with an occlusion labeller of its own (nothing measured yet)."""
        occlusion = OcclusionStage()
        occlusion.measures(np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), np.uint8))  # built and warm
        return PoseStage(backend, obstruction=occlusion)

    blur, pose_5 = BlurStage(), PoseStage(FiveLandmarkPose())
    pose_plain = PoseStage(DlibPnPPose(invariant=False))  # the peer of the default: no equalising, one view
    pose_always = PoseStage(dlib_backend, withhold=False)  # the default without the ambiguous-yaw checks
    t = {}
    t0 = time.perf_counter()
    decoded = [images.decode(b).rgb for b in jpegs]
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    faces = [align.align(str(i), img) for i, img in enumerate(decoded)]
    t["align_mtcnn_landmarks"] = time.perf_counter() - t0
    pose_dlib = default_pose()
    for name, stage in (("blur_cpbd", blur), ("pose_dlib68_pnp", pose_dlib), ("pose_dlib68_pnp_plain", pose_plain),
                        ("pose_dlib68_pnp_no_withholding", pose_always), ("pose_landmarks5", pose_5)):
        t0 = time.perf_counter()
        rows = stage(faces)
        t[name] = time.perf_counter() - t0
        if len(rows) != n:
            raise RuntimeError(f"{name}: {len(rows)} rows for {n} crops")
        if stage is blur:
            blur_rows = rows
        if stage is pose_dlib:
            pose_details = [json.loads(r["details"]) for r in rows if r["details"]]
    # The blur stage measures the batch's crops as stacks; its peer: the same stage crop by crop.
    t0 = time.perf_counter()
    blur_same = [blur.label(f) for f in faces] == blur_rows
    t["blur_cpbd_crop_by_crop"] = time.perf_counter() - t0
    # The pass of `fiqa label --aligned --detector none`: no landmark measurement on the crop.
    t0 = time.perf_counter()
    bare = [AlignStage(None, mode=ALREADY_ALIGNED).align(str(i), img) for i, img in enumerate(decoded)]
    t["align_none"] = time.perf_counter() - t0
    pose_bare = default_pose()
    t0 = time.perf_counter()
    pose_rows = pose_bare(bare)
    t["pose_dlib68_pnp_no_landmarks5"] = time.perf_counter() - t0
    # Its peer: the same stage with the numpy cascade (the reference path of models/shape_predictor.py).
    numpy_backend = DlibPnPPose()
    numpy_backend.predictor = ShapePredictor(dlib_backend.predictor.model, compiled=False)
    pose_numpy = default_pose(numpy_backend)
    t0 = time.perf_counter()
    pose_numpy_same = pose_numpy(bare) == pose_rows
    t["pose_dlib68_pnp_no_landmarks5_numpy_cascade"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # the occlusion rows after the pose stage: its crops' measures are kept (one forward)
    pose_bare.obstruction(bare)
    t["occlusion_after_pose"] = time.perf_counter() - t0
    # The attribute factors of the default `attributes` stage (occlusion CNN, FER expression, analytic lighting).
    from pipeline.labellers import lighting
    from pipeline.labellers.registry import LabelOptions, get_stage

    options = LabelOptions(detector="none", align_mode=ALREADY_ALIGNED)
    built = {}
    for name in ("occlusion", "expression", "lighting"):
        stage = built[name] = get_stage(name, options)
        stage(bare[:8])  # built and warm, as in a pool worker
        t0 = time.perf_counter()
        stage(bare)
        t[name] = time.perf_counter() - t0
    # The two CNNs' forwards alone (each crop and its mirror, the stages' engines, one thread): a floor of the pass.
    from pipeline.labellers.expression import mirrored_inputs

    stack = np.stack([f.crop for f in bare])
    t0 = time.perf_counter()
    built["occlusion"].views(stack)
    t["occlusion_cnn_forward_two_views"] = time.perf_counter() - t0
    inputs = mirrored_inputs(stack, built["expression"].exposure_floor)
    t0 = time.perf_counter()
    built["expression"].forward(inputs)
    t["expression_cnn_forward_two_views"] = time.perf_counter() - t0
    pixels = stack.reshape(n, -1, 3)
    t0 = time.perf_counter()
    looked_up = lighting._luma(pixels)
    t["luminance_lookup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    computed = lighting.luma_reference(pixels)
    t["luminance_computed"] = time.perf_counter() - t0
    # Landmarks alone: the batched cascade against dlib's own predictor crop by crop (the same points).
    backend = pose_dlib.backend
    crops, marks = [f.crop for f in faces if f.crop is not None], [f.landmarks for f in faces if f.crop is not None]
    t_ours = t_numpy = float("inf")
    for _ in range(3):  # alternating, the best of three each: the two paths see the same moments of the host
        t0 = time.perf_counter()
        ours = backend.landmarks68_batch(crops, marks)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        by_numpy = numpy_backend.landmarks68_batch(crops, marks)
        t_numpy = min(t_numpy, time.perf_counter() - t0)
    predictor = dlib.shape_predictor(str(dlib_model("shape_predictor_68_face_landmarks.dat")))
    t0 = time.perf_counter()
    theirs = [[(p.x, p.y) for p in predictor(c, dlib.rectangle(*backend._box(lm))).parts()]
              for c, lm in zip(crops, marks, strict=True)]
    t_dlib = time.perf_counter() - t0
    hog = dlib.get_frontal_face_detector()
    t0 = time.perf_counter()
    hog_found = sum(len(hog(img, 1)) > 0 for img in decoded)
    t_hog = time.perf_counter() - t0
    total = t["decode"] + t["align_mtcnn_landmarks"] + t["blur_cpbd"] + t["pose_dlib68_pnp"]
    measured = sum(f.landmarks is not None for f in faces)
    label_pass = t["decode"] + t["align_none"] + t["blur_cpbd"] + t["pose_dlib68_pnp_no_landmarks5"]
    five = label_pass + t["occlusion_after_pose"] + t["expression"] + t["lighting"]
    return {
        "images": n,
        "images_per_s": {k: _rate(n, v) for k, v in t.items()},
        "total_images_per_s": _rate(n, total),
        "total_stages": ["decode", "align_mtcnn_landmarks", "blur_cpbd", "pose_dlib68_pnp"],
        "label_pass_images_per_s": _rate(n, label_pass),
        "label_pass_stages": ["decode", "align_none", "blur_cpbd", "pose_dlib68_pnp_no_landmarks5"],
        "five_factor_pass_images_per_s": _rate(n, five),
        "five_factor_pass_stages": ["decode", "align_none", "blur_cpbd", "pose_dlib68_pnp_no_landmarks5",
                                    "occlusion_after_pose", "expression", "lighting"],
        "five_factor_pass_images_per_s_numpy_cascade": _rate(n, five - t["pose_dlib68_pnp_no_landmarks5"]
                                                             + t["pose_dlib68_pnp_no_landmarks5_numpy_cascade"]),
        "cnn_floor": {
            "what": "decode plus the occlusion and expression networks' forwards on each crop and its mirror, "
                    "nothing else of the pass: no labeller with the same labels is faster than this on one core",
            "ms_per_image": round((t["decode"] + t["occlusion_cnn_forward_two_views"]
                                   + t["expression_cnn_forward_two_views"]) / n * 1000, 3),
            "images_per_s": _rate(n, t["decode"] + t["occlusion_cnn_forward_two_views"]
                                  + t["expression_cnn_forward_two_views"]),
        },
        "five_factor_ms_per_image": {k: round(t[k] / n * 1000, 3) for k in
                                     ("decode", "align_none", "blur_cpbd", "pose_dlib68_pnp_no_landmarks5",
                                      "occlusion_after_pose", "expression", "lighting")},
        "luminance_lookup": {
            "ours": "lighting's luminance looked up in a table of every 24-bit colour",
            "peer": "the same luminance computed per pixel (linear sRGB, Rec. 709 weights)",
            "speed_ratio_ours_over_peer": round(t["luminance_computed"] / t["luminance_lookup"], 2),
            "same_values": bool(np.array_equal(looked_up, computed)),
        },
        "pose_withholding": {
            "ours": "pose_dlib68_pnp: P(obstructed) of every crop, the yaw spread measured near a class threshold "
                    "and on obstructed faces, ambiguous classes withheld",
            "peer": "pose_dlib68_pnp_no_withholding",
            "cost_ratio_ours_over_peer": round(t["pose_dlib68_pnp"] / t["pose_dlib68_pnp_no_withholding"], 2),
            "spread_measured_fraction": round(sum("yaw_spread" in d for d in pose_details) / n, 3),
            "withheld_fraction": round(sum("class_withheld" in d for d in pose_details) / n, 3),
            "obstructed_fraction": round(sum(d.get("p_obstructed", 0.0) >= pose_dlib.obstruction.threshold
                                             for d in pose_details) / n, 3),
        },
        "blur_batched": {
            "ours": "BlurStage on the whole batch (same-size crops measured as stacks)",
            "peer": "BlurStage.label crop by crop",
            "speed_ratio_ours_over_peer": round(t["blur_cpbd_crop_by_crop"] / t["blur_cpbd"], 2),
            "same_rows": blur_same,
        },
        "landmarks68": {
            "ours": "the cascade over the whole batch (models/shape_predictor.py), engine below",
            "engine": backend.predictor.engine,
            "peer": "dlib.shape_predictor, crop by crop",
            "images_per_s": _rate(len(crops), t_ours), "peer_images_per_s": _rate(len(crops), t_dlib),
            "speed_ratio_ours_over_peer": round(t_dlib / t_ours, 2),
            "timing": "ours and the numpy path: the best of three alternating runs; dlib: one run",
            "same_points": bool(np.array_equal(ours, np.asarray(theirs, dtype=np.float64))),
            "numpy_path_images_per_s": _rate(len(crops), t_numpy),
            "speed_ratio_ours_over_numpy_path": round(t_numpy / t_ours, 2),
            "same_points_as_numpy_path": bool(np.array_equal(ours, by_numpy)),
        },
        "pose_compiled_cascade": {
            "ours": "pose_dlib68_pnp_no_landmarks5 (the default pose stage of the pass)",
            "peer": "the same stage with the numpy cascade (pose_dlib68_pnp_no_landmarks5_numpy_cascade)",
            "speed_ratio_ours_over_peer": round(t["pose_dlib68_pnp_no_landmarks5_numpy_cascade"]
                                                / t["pose_dlib68_pnp_no_landmarks5"], 2),
            "same_rows": pose_numpy_same,
        },
        "peer": {
            "name": "dlib HOG frontal face detector (upsample 1)",
            "images_per_s": _rate(n, t_hog),
            "detection_rate": round(hog_found / n, 3),
            "ours": "MTCNN on the crop",
            "ours_detection_rate": round(measured / n, 3),
            "speed_ratio_ours_over_peer": round(t_hog / t["align_mtcnn_landmarks"], 2),
        },
    }


def _write_rec(root: Path, n: int) -> Path:
    """An insightface RecordIO of n degraded JPEG crops (DISTINCT distinct ones, cycled)."""
    from pipeline.readers.recordio_format import FaceRecWriter

    jpegs = degraded_jpegs(DISTINCT)
    with FaceRecWriter(root / "rec") as w:
        for i in range(n):
            w.add(i // PER_IDENTITY, jpegs[i % len(jpegs)])
    return root / "rec"


def _ingested(root: Path, rec: Path, shard_size: int):
    """A workspace whose `samples` rows describe the RecordIO (written shard by shard, as ingest does)."""
    from data_manifest import ShardWriter, Workspace
    from pipeline.readers import open_reader
    from pipeline.samples import sample_rows

    ws = Workspace(root / "ws")
    reader = open_reader(rec, "recordio", shard_size=shard_size)
    for s in reader.plan():
        ShardWriter(ws, "samples", "ingest-bench").write(s.name, sample_rows("bench", reader.read(s)))
    return ws


def _child(n: int, stages: str, detector: str, pose_backend: str, shard_size: int, workers: int,
           runner: str = "threads", rec: str | None = None) -> dict:
    """Run the label flow over an N-image RecordIO (built here unless `rec` names one); time and peak RSS."""
    from flows import label as L

    with tempfile.TemporaryDirectory(prefix="fiqa-bench-label-") as tmp:
        root = Path(tmp)
        ws = _ingested(root, Path(rec) if rec else _write_rec(root, n), shard_size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        options = {"detector": detector, "align_mode": "already_aligned", "pose_backend": pose_backend}
        t0 = time.perf_counter()
        result = L.label(stages=stages.split(","), options=options, workspace=str(ws.root), shard_size=shard_size,
                         progress=False, runner=runner, workers=workers)
        elapsed = time.perf_counter() - t0
        n = result["selected"]
        steady = _steady_state(ws.runs_dir / result["run_id"] / "shards", workers)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": n, "stages": stages, "detector": detector, "pose_backend": pose_backend, "runner": runner,
            "workers": workers, "shard_size": shard_size,
            "seconds": round(elapsed, 2), "images_per_s": _rate(n, elapsed),
            "run_seconds": result["seconds"], "run_images_per_s": _rate(n, result["seconds"]),
            "stage_images_per_s": result["stage_images_per_s"], **steady,
            "peak_rss_mib_before_flow": round(rss_before / 1024, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
            "faces_rows": result["counts"].get("faces_rows"), "factors_rows": result["counts"].get("factors_rows")}


def _steady_state(shard_dir: Path, workers: int) -> dict:
    """Rates once every worker is up, from the shards' commit records (time committed, samples, task seconds).

    `steady_images_per_s`: the least-squares slope of samples committed against commit time, over the
    commits after the first `workers` ones (each worker's first shard also pays its process start and
    model loading; the catalog refresh after the last shard is left out too).
    `busy_images_per_s_per_worker`: samples over the summed task seconds of all shards (read, stages,
    writes), the rate of one worker while it works.
    """
    from datetime import datetime

    recs = sorted((datetime.fromisoformat(r["committed_at"]).timestamp(), r["counts"])
                  for r in (json.loads(p.read_text()) for p in shard_dir.glob("*.json")))
    out: dict = {"shards": len(recs)}
    busy = sum(c.get("seconds_shard", 0.0) for _, c in recs)
    if busy > 0:
        out["busy_images_per_s_per_worker"] = _rate(sum(c.get("samples", 0) for _, c in recs), busy)
    tail = recs[workers - 1:]
    if len(tail) >= 2:
        t = np.array([ts for ts, _ in tail])
        done = np.cumsum([0] + [c.get("samples", 0) for _, c in tail[1:]])
        out["steady_images_per_s"] = round(float(np.polyfit(t - t[0], done, 1)[0]), 1)
    return out


def child_environment() -> dict[str, str]:
    """This process's environment for a child run, with one BLAS/OpenMP thread per process unless the caller set
    OMP_NUM_THREADS (every worker process of the child's flow inherits it); this process's own is left alone."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run_child(n: int, args: argparse.Namespace, *, workers: int, runner: str, rec: Path | None = None,
               root: Path = ROOT) -> dict:
    """One child run of this benchmark's `--child` mode, from the checkout at `root` (a peer revision's too)."""
    cmd = [sys.executable, str(root / "benchmarks" / "label.py"), "--child", str(n), "--rss-stages", args.rss_stages,
           "--detector", args.detector, "--pose-backend", args.pose_backend, "--shard-size", str(args.shard_size),
           "--workers", str(workers), "--runner", runner]
    if rec is not None:
        cmd += ["--rec", str(rec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root, env=child_environment())
    if proc.returncode != 0:
        return {"images": n, "runner": runner, "workers": workers, "error": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _projection(dataset: str, images: int, rate: float, cores: int) -> dict:
    return {"dataset": dataset, "images": images, "cores": cores, "images_per_s": round(rate, 1),
            "minutes": round(images / rate / 60, 1)}


def _one_and_two(n: int, args: argparse.Namespace, rec: Path, root: Path) -> dict:
    """The label pass with 1 then 2 workers of the processes runner (code of the checkout at `root`)."""
    one = _run_child(n, args, workers=1, runner="processes", rec=rec, root=root)
    two = _run_child(n, args, workers=2, runner="processes", rec=rec, root=root)
    out: dict = {"one_worker": one, "two_workers": two}
    if "error" in one or "error" in two or "steady_images_per_s" not in one or "steady_images_per_s" not in two:
        return out
    r1, r2 = one["steady_images_per_s"], two["steady_images_per_s"]
    efficiency = r2 / r1 / 2
    cores = args.project_cores
    rate = r1 * cores * efficiency
    out.update({
        "images_per_s_per_worker": r1,
        "images_per_s_two_workers": r2,
        "ratio_two_over_one": round(r2 / r1, 3),
        "scaling_efficiency": round(efficiency, 3),
        "wall_ratio_two_over_one": round(two["run_images_per_s"] / one["run_images_per_s"], 3),
        "wall_call_ratio_two_over_one": round(two["images_per_s"] / one["images_per_s"], 3),
        "start_up_seconds": {w: round(r["seconds"] - r["images"] / r["steady_images_per_s"], 2)
                             for w, r in (("one_worker", one), ("two_workers", two))},
        "projections": [_projection("MS1MV2", MS1MV2_IMAGES, rate, cores),
                        _projection("WebFace42M", WEBFACE42M_IMAGES, rate, cores)],
    })
    return out


@contextlib.contextmanager
def _checkout(rev: str) -> Iterator[Path]:
    """A temporary detached worktree of this repository at `rev` (the peer revision's code)."""
    with tempfile.TemporaryDirectory(prefix="fiqa-bench-peer-") as tmp:
        path = Path(tmp) / "peer"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def scaling(n: int, args: argparse.Namespace) -> dict:
    """The label pass with 1 and 2 workers of the processes runner on one N-image RecordIO, and the projections;
    with `--peer-rev`, the same runs of that revision's code on the same RecordIO, and ours over theirs."""
    with tempfile.TemporaryDirectory(prefix="fiqa-bench-scaling-") as tmp:
        rec = _write_rec(Path(tmp), n)
        ours = _one_and_two(n, args, rec, ROOT)
        if args.peer_rev:
            with _checkout(args.peer_rev) as root:
                peer = _one_and_two(n, args, rec, root)
    out: dict = {"images": n, "stages": args.rss_stages, "detector": args.detector,
                 "pose_backend": args.pose_backend, "shard_size": args.shard_size, "runner": "processes", **ours,
                 "rates": "steady state: samples committed after each worker's first shard over the time from the "
                          "workers-th commit to the last (no process start, model loading or catalog refresh); "
                          "wall_ratio: the same ratio of samples over the run's own seconds; wall_call_ratio: over "
                          "the whole label() call (the client's stage check and Prefect's temporary server too)",
                 "projection_formula": "minutes = images / (images_per_s_per_worker * cores * scaling_efficiency) "
                                       "/ 60, scaling_efficiency = ratio_two_over_one / 2 as measured here on 2 "
                                       "workers, assumed to hold up to `cores` workers"}
    if args.peer_rev:
        out["peer"] = {"revision": args.peer_rev, **peer}
        keys = ("images_per_s_per_worker", "wall_ratio_two_over_one", "wall_call_ratio_two_over_one")
        if all(k in ours and k in peer for k in keys):
            out["ours_over_peer"] = {k: round(ours[k] / peer[k], 3) for k in keys}
            out["ours_over_peer"]["two_worker_run_seconds"] = round(
                ours["two_workers"]["run_seconds"] / peer["two_workers"]["run_seconds"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage-images", type=int, default=300, help="crops for the per-stage figures (0: skip)")
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[10_000, 50_000], help="dataset sizes for peak RSS")
    p.add_argument("--rss-stages", default="align,blur,pose,attributes",
                   help="stages of the flow in the RSS and scaling runs (default: all five factors)")
    p.add_argument("--detector", default="none", help="detector of the flow runs (none: crops are aligned)")
    p.add_argument("--pose-backend", default="dlib", help="pose backend of the flow runs")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="workers of the RSS runs (thread runner)")
    p.add_argument("--scaling-images", type=int, default=8000,
                   help="images of the 1- vs 2-worker label pass with the processes runner (0: skip)")
    p.add_argument("--scaling-only", action="store_true", help="run only the scaling part (and its projection)")
    p.add_argument("--project-cores", type=int, default=16, help="cores of the MS1MV2 and WebFace42M projections")
    p.add_argument("--peer-rev", default=None,
                   help="also run the scaling part with the code of this git revision (a temporary worktree) on the "
                        "same images, and report ours over it")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--runner", default="threads", help=argparse.SUPPRESS)
    p.add_argument("--rec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.rss_stages, args.detector, args.pose_backend, args.shard_size,
                                args.workers, args.runner, args.rec)))
        return 0
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
                             "child_omp_num_threads": child_environment()["OMP_NUM_THREADS"]}}
    if args.stage_images > 0 and not args.scaling_only:
        out["stages"] = stage_throughput(args.stage_images)
    if args.scaling_images > 0:
        out["scaling"] = scaling(args.scaling_images, args)
    if not args.scaling_only:
        runs = [_run_child(n, args, workers=args.workers, runner="threads") for n in args.rss_sizes]
        peaks = [r["peak_rss_mib"] for r in runs if "peak_rss_mib" in r]
        out["flow_memory"] = {"runs": runs,
                              "peak_rss_growth_ratio_largest_over_smallest": round(peaks[-1] / peaks[0], 3)
                              if len(peaks) >= 2 else None}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
