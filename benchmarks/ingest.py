"""Ingest throughput and memory: the sharded `ingest` flow vs a naive one-record-at-a-time loop.

Generates insightface-style RecordIO files of 112x112 JPEGs (default 20k and 100k
records), ingests the large one with a naive loop and with the flow under each task
runner (threads, processes; 2 workers on 2 cores) in the same run: records/s and the
ratio of each runner to the naive loop; the processes runner also ingests the large
file with one worker (its ratio to one worker is the scaling with cores). The flow's
rate counts its whole run (worker start-up included). It also samples the peak RSS (this process plus its workers and
the local Prefect server) while the flow ingests each size: the peak must stay flat
as the dataset grows. Prints one JSON object.

    python benchmarks/ingest.py                      # the full figure (100k records)
    python benchmarks/ingest.py --sizes 2000 10000   # a quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.readers.recordio_format import FaceRecWriter  # noqa: E402

IMAGES_PER_IDENTITY = 50
DISTINCT_IMAGES = 512  # encoded once and cycled: generation stays cheap, decoding cost is real


def face_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 112x112 JPEGs: smooth shaded ellipses with noise, about the size of aligned face crops."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32)
    out = []
    for _ in range(n):
        cx, cy, rx, ry = rng.uniform(46, 66), rng.uniform(50, 62), rng.uniform(28, 40), rng.uniform(36, 50)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        base = np.where(inside < 1, 200 - 60 * inside, 60 + 0.5 * yy)
        rgb = np.stack([base * rng.uniform(0.8, 1.1), base * rng.uniform(0.6, 0.9), base * rng.uniform(0.5, 0.8)], -1)
        rgb += rng.normal(0, 6, rgb.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_rec(folder: Path, n: int, jpegs: list[bytes]) -> Path:
    with FaceRecWriter(folder) as w:
        for i in range(n):
            w.add(i // IMAGES_PER_IDENTITY, jpegs[i % len(jpegs)])
    return folder


class RssSampler:
    """Peak resident memory of this process and all its descendants, sampled every `period` seconds."""

    def __init__(self, period: float = 0.05) -> None:
        import psutil

        self._proc, self._period = psutil.Process(), period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._period)

    def __enter__(self) -> RssSampler:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def naive_loop(rec_dir: Path, out: Path) -> dict:
    """The peer: read train.idx, then for each key seek + read + unpack + decode + hash, one row at a time."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.readers.recordio_format import read_record, unpack_ir

    t0 = time.perf_counter()
    lines = (rec_dir / "train.idx").read_text().splitlines()
    offsets = {int(k): int(v) for k, v in (line.split("\t") for line in lines)}
    rows = []
    with open(rec_dir / "train.rec", "rb") as f:

        def read_at(pos: int, n: int) -> bytes:
            f.seek(pos)
            return f.read(n)

        head, _ = unpack_ir(read_record(read_at, offsets[0])[0])
        for key in range(1, int(head.label[0])):
            header, img = unpack_ir(read_record(read_at, offsets[key])[0])
            try:
                im = Image.open(io.BytesIO(img))
                im.load()
                status, w, h = "ok", im.width, im.height
            except OSError:
                status, w, h = "error", None, None
            rows.append({"key": key, "identity": header.identity, "width": w, "height": h, "status": status,
                         "bytes": len(img), "content_hash": hashlib.sha256(img).hexdigest()})
    pq.write_table(pa.Table.from_pylist(rows), out)
    seconds = time.perf_counter() - t0
    return {"records": len(rows), "seconds": round(seconds, 3), "records_per_s": round(len(rows) / seconds, 1)}


def run_flow(rec_dir: Path, ws: Path, dataset: str, runner: str, workers: int, shard_size: int) -> dict:
    from flows.ingest import ingest

    t0 = time.perf_counter()
    with RssSampler() as rss:
        result = ingest(path=str(rec_dir), dataset=dataset, shard_size=shard_size, workspace=str(ws), progress=False,
                        runner=runner, workers=workers)
    wall = time.perf_counter() - t0
    return {"records": result["counts"]["rows"], "ok": result["counts"].get("status_ok", 0),
            "seconds": result["seconds"], "records_per_s": result["records_per_s"], "wall_s_with_startup":
            round(wall, 3), "peak_rss_mb": round(rss.peak / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    from flows.ingest import DEFAULT_SHARD_SIZE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[20_000, 100_000], metavar=("SMALL", "LARGE"),
                   help="record counts of the two RecordIO files (default: 20000 100000)")
    p.add_argument("--runners", nargs="+", default=["threads", "processes"], choices=["threads", "processes"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"records per shard (default: the ingest default, {DEFAULT_SHARD_SIZE})")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate data (default: a temp dir)")
    args = p.parse_args(argv)
    small, large = args.sizes
    flows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
        jpegs = face_like_jpegs(DISTINCT_IMAGES)
        t0 = time.perf_counter()
        recs = {n: write_rec(root / f"rec{n}", n, jpegs) for n in (small, large)}
        gen_s = time.perf_counter() - t0
        # Warm-up: start the local Prefect server (not timed) on a tiny dataset.
        warm = write_rec(root / "warm", 10, jpegs)
        run_flow(warm, root / "ws_warm", "warm", "threads", args.workers, args.shard_size)
        # The machine's speed drifts between minutes here (shared cores): the naive loop runs before and
        # after the flows, and the peer rate is the mean of the two.
        naive_runs = [naive_loop(recs[large], root / "naive.parquet")]
        for runner in args.runners:
            f_small = run_flow(recs[small], root / f"ws_small_{runner}", "bench", runner, args.workers,
                               args.shard_size)
            f_large = run_flow(recs[large], root / f"ws_large_{runner}", "bench", runner, args.workers,
                               args.shard_size)
            flows[runner] = {"small": f_small, "large": f_large,
                             "peak_rss_ratio_large_over_small": round(f_large["peak_rss_mb"] / f_small["peak_rss_mb"],
                                                                      3)}
        one = None
        if "processes" in args.runners and args.workers > 1:  # the same runner on one worker: scaling 1 -> N
            one = run_flow(recs[large], root / "ws_large_processes_1", "bench", "processes", 1, args.shard_size)
        naive_runs.append(naive_loop(recs[large], root / "naive.parquet"))
        naive = {"records": naive_runs[0]["records"], "runs": naive_runs,
                 "records_per_s": round(float(np.mean([n["records_per_s"] for n in naive_runs])), 1)}
        for f in flows.values():
            f["speedup_vs_naive"] = round(f["large"]["records_per_s"] / naive["records_per_s"], 2)
        if one is not None:
            flows["processes"]["one_worker_large"] = one
            flows["processes"]["one_worker_vs_naive"] = round(one["records_per_s"] / naive["records_per_s"], 2)
            flows["processes"]["scaling_vs_one_worker"] = round(
                flows["processes"]["large"]["records_per_s"] / one["records_per_s"], 2)
        rec_mb = (recs[large] / "train.rec").stat().st_size / 2**20
    print(json.dumps({
        "benchmark": "ingest",
        "data": {"records": {"small": small, "large": large}, "image": "112x112 JPEG q90",
                 "mean_jpeg_bytes": round(float(np.mean([len(j) for j in jpegs])), 1),
                 "large_rec_mb": round(rec_mb, 1), "generate_s": round(gen_s, 2)},
        "workers": args.workers, "shard_size": args.shard_size,
        "peer": "naive one-record-at-a-time loop (read, unpack, full PIL decode, sha256, one Parquet write), "
                "one process, same run, large file, run before and after the flows (records_per_s: their mean)",
        "naive_loop": naive,
        "speedup_vs_naive": {runner: f["speedup_vs_naive"] for runner, f in flows.items()},
        "flows": flows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
