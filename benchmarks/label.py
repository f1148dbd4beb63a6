"""Label throughput and memory on 112x112 aligned crops: images/s per stage, and peak RSS of the flow by size.

Crops are real faces that packages ship (insightface t1.jpg faces, Tom Hanks,
scikit-image astronaut), aligned with our MTCNN, mirrored, and degraded with
random blur / brightness / noise, encoded as JPEG like an MS1MV2 RecordIO.

Part 1 (in this process): images/s of each stage on --stage-images crops:
decode, align (already-aligned mode: MTCNN measures the 5 landmarks on the
crop), blur (CPBD), pose (dlib 68 + solvePnP), pose (5-landmark geometric),
and the total of decode+align+blur+pose(dlib). Peer in the same run: dlib's
HOG frontal-face detector (1x upsampled) on the same crops, as a ratio to our
MTCNN, with both detection rates.

Part 2 (one child process per size): the `label` flow (Prefect, thread runner)
over an insightface RecordIO of N crops with --rss-stages, reporting the
child's peak RSS and images/s; the peak must stay flat as N grows.

    python benchmarks/label.py                          # 10k and 50k images (long on 2 cores)
    python benchmarks/label.py --rss-sizes 2000 10000   # a quicker check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
DISTINCT = 256  # distinct degraded crops, cycled: generation stays cheap, every stage still does real work
PER_IDENTITY = 50


def base_crops() -> list[np.ndarray]:
    """Aligned 112x112 crops of every package-shipped face, plus mirror images."""
    import cv2
    import insightface
    from skimage import data

    from models.detectors import MTCNNDetector
    from pipeline.align import AlignStage, similarity_transform, warp

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
    from pipeline import images
    from pipeline.align import ALREADY_ALIGNED, AlignStage
    from pipeline.blur import BlurStage
    from pipeline.pose import PoseStage

    torch.set_num_threads(1)
    jpegs = degraded_jpegs(min(n, DISTINCT))
    jpegs = [jpegs[i % len(jpegs)] for i in range(n)]
    align = AlignStage(MTCNNDetector(min_face_size=40.0), mode=ALREADY_ALIGNED)  # the flow's aligned-mode default
    blur, pose_dlib, pose_5 = BlurStage(), PoseStage(DlibPnPPose()), PoseStage(FiveLandmarkPose())
    t = {}
    t0 = time.perf_counter()
    decoded = [images.decode(b).rgb for b in jpegs]
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    faces = [align.align(str(i), img) for i, img in enumerate(decoded)]
    t["align_mtcnn_landmarks"] = time.perf_counter() - t0
    for name, stage in (("blur_cpbd", blur), ("pose_dlib68_pnp", pose_dlib), ("pose_landmarks5", pose_5)):
        t0 = time.perf_counter()
        rows = stage(faces)
        t[name] = time.perf_counter() - t0
        if len(rows) != n:
            raise RuntimeError(f"{name}: {len(rows)} rows for {n} crops")
    hog = dlib.get_frontal_face_detector()
    t0 = time.perf_counter()
    hog_found = sum(len(hog(img, 1)) > 0 for img in decoded)
    t_hog = time.perf_counter() - t0
    total = t["decode"] + t["align_mtcnn_landmarks"] + t["blur_cpbd"] + t["pose_dlib68_pnp"]
    measured = sum(f.landmarks is not None for f in faces)
    return {
        "images": n,
        "images_per_s": {k: _rate(n, v) for k, v in t.items()},
        "total_images_per_s": _rate(n, total),
        "total_stages": ["decode", "align_mtcnn_landmarks", "blur_cpbd", "pose_dlib68_pnp"],
        "peer": {
            "name": "dlib HOG frontal face detector (upsample 1)",
            "images_per_s": _rate(n, t_hog),
            "detection_rate": round(hog_found / n, 3),
            "ours": "MTCNN on the crop",
            "ours_detection_rate": round(measured / n, 3),
            "speed_ratio_ours_over_peer": round(t_hog / t["align_mtcnn_landmarks"], 2),
        },
    }


def _child(n: int, stages: str, detector: str, pose_backend: str, shard_size: int, workers: int) -> dict:
    """Build an N-image RecordIO, write its samples rows shard by shard, run the label flow; peak RSS."""
    from data_manifest import ShardWriter, Workspace
    from flows import label as L
    from pipeline.readers import open_reader
    from pipeline.recordio import FaceRecWriter
    from pipeline.samples import sample_rows

    jpegs = degraded_jpegs(DISTINCT)
    with tempfile.TemporaryDirectory(prefix="fiqa-bench-label-") as tmp:
        root = Path(tmp)
        with FaceRecWriter(root / "rec") as w:
            for i in range(n):
                w.add(i // PER_IDENTITY, jpegs[i % len(jpegs)])
        ws = Workspace(root / "ws")
        reader = open_reader(root / "rec", "recordio", shard_size=shard_size)
        for s in reader.plan():
            ShardWriter(ws, "samples", "ingest-bench").write(s.name, sample_rows("bench", reader.read(s)))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        options = {"detector": detector, "align_mode": "already_aligned", "pose_backend": pose_backend}
        t0 = time.perf_counter()
        result = L.label(stages=stages.split(","), options=options, workspace=str(ws.root), shard_size=shard_size,
                         progress=False, runner="threads", workers=workers)
        elapsed = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": n, "stages": stages, "detector": detector, "pose_backend": pose_backend,
            "seconds": round(elapsed, 1), "images_per_s": _rate(n, elapsed),
            "stage_images_per_s": result["stage_images_per_s"],
            "peak_rss_mib_before_flow": round(rss_before / 1024, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
            "faces_rows": result["counts"].get("faces_rows"), "factors_rows": result["counts"].get("factors_rows")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage-images", type=int, default=300, help="crops for the per-stage figures (0: skip)")
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[10_000, 50_000], help="dataset sizes for peak RSS")
    p.add_argument("--rss-stages", default="align,blur,pose", help="stages of the flow in the RSS runs")
    p.add_argument("--detector", default="none", help="detector of the RSS runs (none: crops are aligned)")
    p.add_argument("--pose-backend", default="dlib", help="pose backend of the RSS runs")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.rss_stages, args.detector, args.pose_backend, args.shard_size,
                                args.workers)))
        return 0
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}}
    if args.stage_images > 0:
        out["stages"] = stage_throughput(args.stage_images)
    runs = []
    for n in args.rss_sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--rss-stages", args.rss_stages, "--detector",
               args.detector, "--pose-backend", args.pose_backend, "--shard-size", str(args.shard_size),
               "--workers", str(args.workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if proc.returncode != 0:
            runs.append({"images": n, "error": proc.stderr.strip().splitlines()[-3:]})
            continue
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    peaks = [r["peak_rss_mib"] for r in runs if "peak_rss_mib" in r]
    out["flow_memory"] = {"runs": runs,
                          "peak_rss_growth_ratio_largest_over_smallest": round(peaks[-1] / peaks[0], 3)
                          if len(peaks) >= 2 else None}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
