"""Label throughput on a local two-worker Dask cluster against the local `processes` runner on the same images.

The same insightface RecordIO of --images degraded 112x112 crops as benchmarks/label.py (real faces that
packages ship, degraded and JPEG-encoded), its `samples` written once; then the `label` flow twice over it
in this process, each a run of its own: with `--runner processes --workers 2` (the peer), and with
`--runner dask --address` to a `distributed.LocalCluster` of two worker processes with one thread each,
started here before the run (its start-up is not timed; the workers load their models on their first
shard, as the processes runner's do). Both runs write the same rows (`same_rows`). Rates: images over the
flow's wall time, and the steady-state rate from the shards' commit records (benchmarks/label.py).

    python benchmarks/cluster_label.py                      # 2,000 images
    python benchmarks/cluster_label.py --images 8000 --shard-size 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(ws, runner: str, args: argparse.Namespace, address: str | None = None) -> dict:
    from benchmarks.label import _rate, _steady_state
    from flows import label as L

    options = {"detector": args.detector, "align_mode": "already_aligned", "pose_backend": args.pose_backend}
    t0 = time.perf_counter()
    result = L.label(stages=args.stages.split(","), options=options, workspace=str(ws.root), run_id=f"label-{runner}",
                     shard_size=args.shard_size, progress=False, runner=runner, workers=2, address=address)
    elapsed = time.perf_counter() - t0
    n = result["selected"]
    return {"runner": runner, "workers": 2, "images": n, "seconds": round(elapsed, 2),
            "images_per_s": _rate(n, elapsed),
            **_steady_state(ws.runs_dir / result["run_id"] / "shards", 2)}


def _rows(ws, run_id: str) -> list[tuple]:
    from data_manifest import catalog

    return [tuple(r.values()) for r in catalog.query(
        ws, "SELECT sample_id, factor, round(value, 6), class_name, status FROM factors_history "
            f"WHERE run_id = '{run_id}' ORDER BY ALL").to_pylist()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--stages", default="align,blur,pose")
    p.add_argument("--detector", default="none", help="detector (none: the crops are aligned)")
    p.add_argument("--pose-backend", default="dlib")
    args = p.parse_args(argv)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(key, "1")  # one compute thread per worker process, under both runners
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    from distributed import LocalCluster

    from benchmarks.label import _ingested, _write_rec

    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
                 "images": args.images, "stages": args.stages, "detector": args.detector,
                 "shard_size": args.shard_size}
    with tempfile.TemporaryDirectory(prefix="fiqa-bench-cluster-") as tmp:
        ws = _ingested(Path(tmp), _write_rec(Path(tmp), args.images), args.shard_size)
        peer = _run(ws, "processes", args)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            dask = _run(ws, "dask", args, address=cluster.scheduler_address)
        out["same_rows"] = _rows(ws, "label-processes") == _rows(ws, "label-dask")
    out["peer"], out["dask_cluster"] = peer, dask
    out["ratio_dask_over_processes"] = {
        "images_per_s": round(dask["images_per_s"] / peer["images_per_s"], 3),
        **({"steady_images_per_s": round(dask["steady_images_per_s"] / peer["steady_images_per_s"], 3)}
           if "steady_images_per_s" in dask and "steady_images_per_s" in peer else {})}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
