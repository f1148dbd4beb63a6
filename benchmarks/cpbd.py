"""CPBD speed and agreement: `pipeline.labellers.blur.cpbd` against the cpbd-py312 port on the same images.

``python -m benchmarks.cpbd [--repeats 30] [--port-repeats 3]`` prints JSON:
for 112x112 and 512x512 images (package-shipped faces and generated
textures), the per-image median times of both, the speed ratio (port / ours)
per size, and the largest absolute difference of the two CPBD values. The
blur labeller's face measure (`face_cpbd` on a 112x112 RGB crop) is timed too,
and the batched measure the blur stage uses (`face_measure_many` on --batch
crops: real faces blurred, darkened and noisy) against `face_measure` crop by
crop, with whether both give the same results.

Calls of the two are interleaved, and both process CPU time and wall time are
reported (medians, and CPU minima: the least disturbed calls): on a shared
machine the CPU-time ratio is the stable figure (both are single-threaded),
the wall-time ratio moves with the other load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from pipeline.labellers.blur import cpbd, face_cpbd, face_measure, face_measure_many, rgb_to_gray


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU ms, wall ms) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) * 1e3, (time.perf_counter() - w0) * 1e3


def _compare(ours: Callable[[], object], peer: Callable[[], object], repeats: int, peer_repeats: int) -> dict:
    """Median CPU and wall times of both, calls interleaved so both see the same machine load (warm: run once)."""
    per_round = max(1, repeats // peer_repeats)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
    for _ in range(peer_repeats):
        times["peer"].append(_timed(peer))
        times["ours"].extend(_timed(ours) for _ in range(per_round))
    cpu = {k: [c for c, _ in v] for k, v in times.items()}
    wall = {k: [w for _, w in v] for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "ours_cpu_ms": round(med_cpu["ours"], 3),
        "peer_cpu_ms": round(med_cpu["peer"], 3),
        "ours_cpu_min_ms": round(min(cpu["ours"]), 3),
        "peer_cpu_min_ms": round(min(cpu["peer"]), 3),
        "ours_wall_ms": round(med_wall["ours"], 3),
        "peer_wall_ms": round(med_wall["peer"], 3),
        "cpu_ratio": round(med_cpu["peer"] / med_cpu["ours"], 1),
        "cpu_min_ratio": round(min(cpu["peer"]) / min(cpu["ours"]), 1),
        "wall_ratio": round(med_wall["peer"] / med_wall["ours"], 1),
    }


def _shipped_rgb() -> dict[str, np.ndarray]:
    import insightface
    from skimage import data

    images = Path(insightface.__file__).parent / "data" / "images"
    tom = cv2.imread(str(images / "Tom_Hanks_54745.png"))
    t1 = cv2.imread(str(images / "t1.jpg"))
    if tom is None or t1 is None:
        raise FileNotFoundError(f"insightface package images missing under {images}")
    return {"tom_hanks": tom[:, :, ::-1], "t1": t1[:, :, ::-1], "astronaut": data.astronaut()}


def images() -> dict[int, dict[str, np.ndarray]]:
    """Grayscale test images per size: real faces and generated textures."""
    rgb = _shipped_rgb()
    rng = np.random.default_rng(0)
    by_size: dict[int, dict[str, np.ndarray]] = {112: {}, 512: {}}
    by_size[112]["tom_hanks"] = rgb_to_gray(rgb["tom_hanks"])
    by_size[112]["astronaut_face"] = rgb_to_gray(cv2.resize(rgb["astronaut"][20:220, 120:320], (112, 112)))
    by_size[112]["t1_face"] = rgb_to_gray(cv2.resize(rgb["t1"][280:430, 430:580], (112, 112)))
    by_size[512]["astronaut"] = rgb_to_gray(rgb["astronaut"])
    by_size[512]["t1_crop"] = rgb_to_gray(rgb["t1"][200:712, 300:812])
    for size in (112, 512):
        by_size[size]["texture"] = np.rint(ndi.gaussian_filter(rng.random((size, size)) * 255, 1.2))
    return by_size


def face_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """n 112x112 RGB face crops: the shipped faces, Gaussian blur sigma 0-2.5, brightness 0.6-1.3, noise 0-8."""
    rgb = _shipped_rgb()
    bases = [rgb["tom_hanks"], cv2.resize(rgb["astronaut"][20:220, 120:320], (112, 112)),
             cv2.resize(rgb["t1"][280:430, 430:580], (112, 112))]
    bases += [np.ascontiguousarray(b[:, ::-1]) for b in bases]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = bases[i % len(bases)].astype(np.float32)
        sigma = rng.uniform(0, 2.5)
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        img = img * rng.uniform(0.6, 1.3) + rng.normal(0, rng.uniform(0, 8), img.shape)
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return out


def batched(n: int, rounds: int) -> dict:
    """face_measure_many on n crops against face_measure crop by crop (interleaved rounds, CPU time)."""
    crops = face_crops(n)
    same = face_measure_many(crops) == [face_measure(c) for c in crops]
    times: dict[str, list[float]] = {"batched": [], "crop_by_crop": []}
    for _ in range(rounds):
        times["crop_by_crop"].append(_timed(lambda: [face_measure(c) for c in crops])[0])
        times["batched"].append(_timed(lambda: face_measure_many(crops))[0])
    best = {k: min(v) for k, v in times.items()}
    return {
        "crops": n,
        "rounds": rounds,
        "same_results": same,
        "batched_images_per_s": round(n / best["batched"] * 1e3, 1),
        "crop_by_crop_images_per_s": round(n / best["crop_by_crop"] * 1e3, 1),
        "cpu_min_ratio": round(best["crop_by_crop"] / best["batched"], 2),
        "cpu_median_ratio": round(statistics.median(times["crop_by_crop"]) / statistics.median(times["batched"]), 2),
    }


def run(repeats: int, port_repeats: int) -> dict:
    import cpbd as cpbd_port  # the cpbd-py312 package (test dependency)

    out: dict = {
        "peer": "cpbd-py312 1.0.3 (cpbd.compute)",
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "repeats": {"ours": repeats, "peer": port_repeats},
        "sizes": {},
    }
    max_diff = 0.0
    for size, imgs in images().items():
        rows = {}
        for name, img in imgs.items():
            ours_value = cpbd(img)
            peer_value = float(cpbd_port.compute(img))
            diff = abs(ours_value - peer_value)
            max_diff = max(max_diff, diff)
            rows[name] = {
                "cpbd": ours_value,
                "peer_cpbd": peer_value,
                "abs_diff": diff,
                **_compare(lambda img=img: cpbd(img), lambda img=img: cpbd_port.compute(img), repeats, port_repeats),
            }
        out["sizes"][f"{size}x{size}"] = {
            "images": rows,
            "cpu_speed_ratio": round(
                sum(r["peer_cpu_ms"] for r in rows.values()) / sum(r["ours_cpu_ms"] for r in rows.values()), 1
            ),
            "wall_speed_ratio": round(
                sum(r["peer_wall_ms"] for r in rows.values()) / sum(r["ours_wall_ms"] for r in rows.values()), 1
            ),
            "cpu_min_speed_ratio": round(
                sum(r["peer_cpu_min_ms"] for r in rows.values()) / sum(r["ours_cpu_min_ms"] for r in rows.values()), 1
            ),
            "min_image_cpu_ratio": min(r["cpu_ratio"] for r in rows.values()),
        }
    face = _shipped_rgb()["tom_hanks"]
    face_times = [_timed(lambda: face_cpbd(face)) for _ in range(repeats)]
    out["face_cpbd_112_rgb"] = {
        "cpu_ms": round(statistics.median(c for c, _ in face_times), 3),
        "wall_ms": round(statistics.median(w for _, w in face_times), 3),
    }
    out["max_abs_diff"] = max_diff
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of our CPBD per image")
    parser.add_argument("--port-repeats", type=int, default=3, help="timed calls of the port per image")
    parser.add_argument("--batch", type=int, default=512, help="crops of the batched face measure (0: skip)")
    parser.add_argument("--batch-rounds", type=int, default=5, help="timed rounds of the batched comparison")
    parser.add_argument("--batch-only", action="store_true", help="only the batched comparison (no port needed)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.port_repeats < 1 or args.batch < 0 or args.batch_rounds < 1:
        parser.error("repeats, port repeats and batch rounds must be >= 1, batch >= 0")
    out = {} if args.batch_only else run(args.repeats, args.port_repeats)
    if args.batch:
        out["face_measure_batched"] = batched(args.batch, args.batch_rounds)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
