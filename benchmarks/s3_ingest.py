"""Ingest to and from object storage: the same RecordIO file ingested into a local-disk workspace and into an
``s3://`` workspace on a local S3-compatible server (moto's, from PyPI), in one run.

Three figures, each as the object-storage time over the local-disk time (a ratio, so the machine's speed
cancels out), and a fourth, `fresh_sync`: a new client's sync moving FIQA_S3_TRANSFERS files at once over one at a
time. The first three: `ingest` (the flow's whole run: shards written into the cache, then committed to the store,
files and a marker per shard); `read` (a second client with an empty cache syncs the committed files and
answers a count over `samples`, against the same query on the local workspace's catalog); `resync` (the same
client again: nothing new, one listing of the markers). The rows of both workspaces are checked equal.
Prints one JSON object.

    python benchmarks/s3_ingest.py                   # 20000 records, shards of 2000
    python benchmarks/s3_ingest.py --records 2000    # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ingest import DISTINCT_IMAGES, face_like_jpegs, write_rec  # noqa: E402

SAMPLE_COLUMNS = "sample_id, dataset, identity, status, error, content_hash, width, height"


def start_server() -> tuple[object, str]:
    """moto's S3 server on a free port of 127.0.0.1; (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t0, 3)


def count_samples(ws) -> int:
    from data_manifest import catalog

    return catalog.query(ws, "SELECT count(*) AS n FROM samples").column("n")[0].as_py()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20_000, help="records of the RecordIO file (default: 20000)")
    p.add_argument("--shard-size", type=int, default=2_000, help="records per shard (default: 2000)")
    p.add_argument("--runner", default="threads", choices=["threads", "processes"])
    p.add_argument("--workdir", type=Path, default=None, help="where to generate data (default: a temp dir)")
    args = p.parse_args(argv)
    server, endpoint = start_server()
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            root = Path(tmp)
            os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_REGION="us-east-1", FIQA_CACHE=str(root / "cache"))
            from pyarrow import fs

            fs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1",
                            allow_bucket_creation=True).create_dir("bench")
            from data_manifest import Workspace, catalog
            from flows.ingest import ingest

            jpegs = face_like_jpegs(DISTINCT_IMAGES)
            rec = write_rec(root / "rec", args.records, jpegs)
            run = {"path": str(rec), "dataset": "bench", "shard_size": args.shard_size, "progress": False,
                   "runner": args.runner}
            ingest(**{**run, "path": str(write_rec(root / "warm", 10, jpegs)), "dataset": "warm",
                      "workspace": str(root / "warm_ws")})  # starts the local Prefect server (not timed)
            local, url = root / "local", "s3://bench/ws"
            results = {}
            for name, where in (("local", str(local)), ("s3", url)):
                out, wall = timed(ingest, **run, workspace=where)
                results[name] = {"records": out["counts"]["rows"], "seconds": out["seconds"],
                                 "records_per_s": out["records_per_s"], "wall_s": wall}
            local_ws = Workspace(local)
            n_local, q_local = timed(count_samples, local_ws)
            os.environ["FIQA_CACHE"] = str(root / "reader")  # a second client, empty cache
            reader, open_s = timed(Workspace, url)
            n_s3, q_s3 = timed(count_samples, reader)
            _, resync_s = timed(Workspace, url)
            from data_manifest import store

            sync = {}  # a fresh client's sync with one transfer at a time, and with the default number at once
            for n in (1, store.transfers()):
                os.environ.update(FIQA_CACHE=str(root / f"sync-{n}"), FIQA_S3_TRANSFERS=str(n))
                _, sync[n] = timed(Workspace, url)
            os.environ.pop("FIQA_S3_TRANSFERS")
            sql = f"SELECT {SAMPLE_COLUMNS} FROM samples ORDER BY sample_id"
            same = catalog.query(reader, sql).to_pylist() == catalog.query(local_ws, sql).to_pylist()
            s3fs = reader.store.fs
            stored = [i for i in s3fs.get_file_info(fs.FileSelector("bench/ws", recursive=True)) if i.is_file]
            markers = sum("/_commits/" in i.path for i in stored)
    finally:
        server.stop()
    if not same or n_local != n_s3 or n_local != args.records:
        raise SystemExit(f"rows differ: local {n_local}, object storage {n_s3}, expected {args.records}")
    read_s3 = round(open_s + q_s3, 3)
    print(json.dumps({
        "benchmark": "s3_ingest",
        "data": {"records": args.records, "image": "112x112 JPEG q90", "shard_size": args.shard_size,
                 "runner": args.runner},
        "store": "moto S3 server on 127.0.0.1 (same machine): the protocol's cost, not a network's",
        "ingest": {**results, "ratio_s3_over_local": round(results["s3"]["seconds"] / results["local"]["seconds"], 2)},
        "read": {"local_query_s": q_local, "s3_sync_s": open_s, "s3_query_s": q_s3, "s3_total_s": read_s3,
                 "ratio_s3_over_local": round(read_s3 / max(q_local, 1e-3), 2)},
        "resync_nothing_new_s": resync_s,
        "fresh_sync": {"ours": f"{max(sync)} files moved at once (FIQA_S3_TRANSFERS)", "peer": "one at a time",
                       "seconds": {str(k): v for k, v in sync.items()},
                       "speed_ratio_ours_over_peer": round(sync[1] / max(sync[max(sync)], 1e-3), 2)},
        "rows_equal": same,
        "objects_in_store": len(stored), "commit_markers": markers,
        "store_mb": round(sum(i.size for i in stored) / 2**20, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
