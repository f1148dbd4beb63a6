"""Benchmark: throughput of the nearest-negative search vs this machine's float32 GEMM, projected to MS1MV2.

Prints one JSON object: samples/s of `NearestNegativeSearch` at 10k centers x 512 dims, the
same work expressed in GFLOP/s, the peer figure (the bare float32 GEMMs of the same tiles,
timed alternately with the search in the same run: the physical limit of a matmul-bound
search), their ratio, a 2048^3 GEMM for reference, the projected wall time
for MS1MV2 (5.8M samples x 85,742 centers), the peak-RSS growth of the search when the
number of samples grows 5x (each size in its own subprocess), and the peak RSS (ru_maxrss) of
the `anchors` flow itself at each of --flow-sizes samples: a synthetic workspace per size (samples
rows, the flow's own frozen selection, then random embeddings around --flow-identities identity
centers written as the run's `embeddings` shards with the project's writer and committed), then
the flow resumed in a fresh child process (centers, search, normalise, anchors written), with
its peak both before the run's closing catalog refresh (the flow's own work) and overall. The
freezing of the selection is measured in a child of its own. The recogniser is never called (its
shards are committed), so a stub gives the model id and dimension.

    python benchmarks/anchors.py [--samples 8192] [--centers 10000] [--dim 512] [--device cpu]
                                 [--flow-sizes 100000 1000000] [--flow-dim 512] [--flow-identities 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MS1MV2_SAMPLES = 5_822_653
MS1MV2_CLASSES = 85_742


def gemm_gflops(m: int, k: int, n: int, device: str, repeats: int = 5) -> float:
    """Best-of float32 torch.mm throughput for an (m x k) @ (k x n) product."""
    import torch

    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def search_vs_gemm(n: int, centers: int, dim: int, device: str, chunk: int, block: int,
                   rounds: int = 3) -> tuple[float, float]:
    """Best-of seconds for the full search over n samples and for the bare GEMMs of the same tiles.

    The two are measured alternately in each round, so load from other processes hits both alike.
    """
    import torch

    from pipeline.anchors import NearestNegativeSearch

    rng = np.random.default_rng(0)
    c = rng.normal(size=(centers, dim)).astype(np.float32)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, centers, size=n)
    search = NearestNegativeSearch(c, chunk_size=chunk, center_block=block, device=device)
    search.search(emb[:chunk], labels[:chunk])  # warm-up
    ct = torch.from_numpy(c).to(device)
    et = torch.from_numpy(emb).to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def gemms() -> None:
        for s in range(0, n, chunk):
            for b in range(0, centers, block):
                torch.mm(et[s:s + chunk], ct[b:b + block].T)
        sync()

    gemms()
    best_search = best_gemm = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        search.search(emb, labels)
        sync()
        best_search = min(best_search, time.perf_counter() - t)
        t = time.perf_counter()
        gemms()
        best_gemm = min(best_gemm, time.perf_counter() - t)
    return best_search, best_gemm


_RSS = """
import json, resource, sys
import numpy as np
sys.path.insert(0, {root!r})
from pipeline.anchors import NearestNegativeSearch
n, dim, centers, chunk = int(sys.argv[1]), {dim}, {centers}, {chunk}
s = NearestNegativeSearch(np.random.default_rng(0).normal(size=(centers, dim)).astype(np.float32),
                          chunk_size=chunk, center_block={block}, device={device!r})
def shard(i):
    g = np.random.default_rng(i)
    return g.normal(size=(chunk, dim)).astype(np.float32), g.integers(0, centers, chunk)
s.search(*shard(10**6))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = np.empty(n, dtype=np.int64)
for i in range(0, n, chunk):
    out[i:i + chunk] = s.search(*shard(i))[2][: n - i]
print(json.dumps({{"n": n, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""


def rss_growth(n: int, **kw: object) -> dict:
    code = _RSS.format(root=str(ROOT), **kw)
    out = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_FLOW_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from benchmarks.anchors import flow_child
print(json.dumps(flow_child({ws!r}, {step!r}, **{kw!r})))
"""
FLOW_RUN = "anchors-bench"


def synthetic_samples(ws_root: str, n: int, identities: int, seed: int = 0) -> None:
    """n `samples` rows (identity = i mod identities), written column-wise in 100k-row shards."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from data_manifest import ShardWriter, Workspace

    writer = ShardWriter(Workspace(ws_root), "samples", "ingest-bench")
    for k, start in enumerate(range(0, n, 100_000)):
        idx = pa.array(np.arange(start, min(n, start + 100_000), dtype=np.int64))
        m = len(idx)
        writer.write(k, pa.table({
            "sample_id": pc.binary_join_element_wise("s", pc.utf8_lpad(pc.cast(idx, pa.string()), 8, "0"), ""),
            "dataset": pa.repeat("bench", m), "source_kind": pa.repeat("list", m),
            "source": pc.binary_join_element_wise("/nowhere/", pc.cast(idx, pa.string()), ".png", ""),
            "identity": pa.array(np.arange(start, start + m, dtype=np.int64) % identities),
            "status": pa.repeat("ok", m)}))


def synthetic_embeddings(ws_root: str, dim: int, identities: int, shard_size: int, seed: int = 0) -> int:
    """Embeddings (identity center + noise) for every row group of the run's frozen selection, committed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_manifest import ShardWriter, Workspace, runs
    from data_manifest.selection import selection_path, selection_shards

    ws = Workspace(ws_root)
    centers = np.random.default_rng(seed).normal(size=(identities, dim)).astype(np.float32)
    writer = ShardWriter(ws, "embeddings", FLOW_RUN)
    path = selection_path(ws, FLOW_RUN)
    total = 0
    for name, group in selection_shards(path).items():
        sel = pq.ParquetFile(path).read_row_group(group, columns=["sample_id", "identity"])
        ident = sel.column("identity").to_numpy()
        rng = np.random.default_rng([seed, group])
        emb = centers[ident] + rng.normal(scale=1.5, size=(len(ident), dim)).astype(np.float32)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
        writer.write(name, pa.table({"sample_id": sel.column("sample_id"), "identity": sel.column("identity"),
                                     "model_id": pa.repeat("synthetic", len(ident)), "embedding": vec,
                                     "status": pa.repeat("ok", len(ident))}))
        runs.mark_shard_done(ws, FLOW_RUN, f"embed-{name}", {"embedded": len(ident)})
        total += len(ident)
    return total


def stub_recognizer(dim: int) -> None:
    """The flow's recogniser replaced by its model id and dimension (its embedding shards are all committed)."""
    from types import SimpleNamespace

    from pipeline import anchors_embed

    anchors_embed.recognizer = lambda *a, **k: SimpleNamespace(model_id="synthetic", embedding_dim=dim)


def flow_child(ws_root: str, step: str, *, n: int, dim: int, identities: int, shard_size: int) -> dict:
    """One step of the flow-RSS figure in this (child) process; returns its seconds and ru_maxrss."""
    import resource

    from data_manifest import Workspace, catalog
    from data_manifest.selection import freeze_selection
    from flows import anchors as F

    t = time.perf_counter()
    out: dict = {"step": step, "n": n}
    if step == "samples":
        synthetic_samples(ws_root, n, identities)
        catalog.refresh(Workspace(ws_root))
    elif step == "freeze":
        freeze_selection(Workspace(ws_root), FLOW_RUN, F.selection_sql(), shard_size, required=F.REQUIRED)
    elif step == "embeddings":
        out["embeddings"] = synthetic_embeddings(ws_root, dim, identities, shard_size)
    elif step == "flow":
        stub_recognizer(dim)
        refresh, seen = catalog.refresh, []

        def timed_refresh(*a: object, **k: object) -> object:  # the run's end: its shards fold into the catalog
            seen.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            return refresh(*a, **k)

        catalog.refresh = timed_refresh
        res = F.anchors_flow(workspace=ws_root, run_id=FLOW_RUN, shard_size=shard_size, device="cpu",
                             progress=False, fr_model="synthetic")
        catalog.refresh = refresh
        out.update(selected=res["selected"], ok=res.get("ok", 0), num_centers=res["metrics"]["num_centers"],
                   peak_before_catalog_refresh_mib=round(seen[0], 1) if seen else None)
    out["seconds"] = round(time.perf_counter() - t, 2)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def flow_rss(n: int, *, dim: int, identities: int, shard_size: int, workdir: str | None,
             prefect_home: str) -> dict:
    """Build a synthetic workspace of n samples and run the flow's steps, each in a fresh child process."""
    import tempfile

    kw = {"n": n, "dim": dim, "identities": identities, "shard_size": shard_size}
    steps = {}
    with tempfile.TemporaryDirectory(dir=workdir) as ws:
        for step in ("samples", "freeze", "embeddings", "flow"):
            code = _FLOW_CHILD.format(root=str(ROOT), ws=ws, step=step, kw=kw)
            env = {"PREFECT_HOME": prefect_home, **os.environ}  # the user's PREFECT_HOME wins
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode:
                raise RuntimeError(f"flow step {step} at n={n} failed: {proc.stderr[-2000:]}")
            steps[step] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"n": n, "freeze_peak_rss_mib": steps["freeze"]["peak_rss_mib"], "freeze_s": steps["freeze"]["seconds"],
            "flow_peak_rss_mib": steps["flow"]["peak_rss_mib"], "flow_s": steps["flow"]["seconds"],
            "flow_peak_rss_before_catalog_refresh_mib": steps["flow"]["peak_before_catalog_refresh_mib"],
            "selected": steps["flow"]["selected"], "ok": steps["flow"]["ok"],
            "build_s": round(steps["samples"]["seconds"] + steps["embeddings"]["seconds"], 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--centers", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--block", type=int, default=16384)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rss-samples", type=int, default=8192, help="small size of the 5x RSS comparison")
    p.add_argument("--flow-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="samples of the synthetic workspaces the flow's peak RSS is measured on (none: skip)")
    p.add_argument("--flow-dim", type=int, default=512, help="embedding dimension of the flow-RSS workspaces")
    p.add_argument("--flow-identities", type=int, default=1000, help="identities of the flow-RSS workspaces")
    p.add_argument("--flow-shard-size", type=int, default=8192, help="shard size of the flow-RSS runs")
    p.add_argument("--workdir", default=None, help="where the flow-RSS workspaces are built (default: a temp dir)")
    args = p.parse_args(argv)
    import tempfile

    # First, while this process is small: a child's ru_maxrss starts at its parent's RSS when it is spawned.
    with tempfile.TemporaryDirectory(dir=args.workdir) as prefect_home:  # one Prefect database for every size
        flow = [flow_rss(n, dim=args.flow_dim, identities=args.flow_identities, shard_size=args.flow_shard_size,
                         workdir=args.workdir, prefect_home=prefect_home) for n in args.flow_sizes]

    import torch

    t_search, t_gemm = search_vs_gemm(args.samples, args.centers, args.dim, args.device, args.chunk, args.block)
    flop = 2.0 * args.samples * args.centers * args.dim
    sps = args.samples / t_search
    search_gflops = flop / t_search / 1e9
    peak = flop / t_gemm / 1e9
    square = gemm_gflops(2048, 2048, 2048, args.device)
    ms1m_s = MS1MV2_SAMPLES * MS1MV2_CLASSES * args.dim * 2.0 / (search_gflops * 1e9)
    kw = {"dim": args.dim, "centers": args.centers, "chunk": args.chunk, "block": args.block, "device": args.device}
    small, large = rss_growth(args.rss_samples, **kw), rss_growth(5 * args.rss_samples, **kw)
    print(json.dumps({
        "benchmark": "anchors.nearest_negative_search",
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "samples": args.samples, "centers": args.centers, "dim": args.dim,
        "samples_per_s": round(sps, 1),
        "search_gflops": round(search_gflops, 2),
        "peer": "torch float32 GEMM of the same tiles alone (no masking / max), measured alternately",
        "peer_gemm_gflops": round(peak, 2), "gemm_2048_cubed_gflops": round(square, 2),
        "fraction_of_gemm": round(search_gflops / peak, 3),
        "ms1mv2_projection": {"samples": MS1MV2_SAMPLES, "centers": MS1MV2_CLASSES,
                              "hours": round(ms1m_s / 3600, 2),
                              "hours_at_gemm_peak": round(ms1m_s * search_gflops / peak / 3600, 2)},
        "peak_rss_mib": {"n": small["n"], "peak": round(small["peak_mib"], 1),
                         "n_x5": large["n"], "peak_x5": round(large["peak_mib"], 1),
                         "ratio": round(large["peak_mib"] / small["peak_mib"], 3)},
        "flow_peak_rss": {"dim": args.flow_dim, "identities": args.flow_identities,
                          "shard_size": args.flow_shard_size, "sizes": flow,
                          "ratio_largest_over_smallest": round(flow[-1]["flow_peak_rss_mib"] /
                                                               flow[0]["flow_peak_rss_mib"], 3) if flow else None,
                          "ratio_before_catalog_refresh": round(
                              flow[-1]["flow_peak_rss_before_catalog_refresh_mib"] /
                              flow[0]["flow_peak_rss_before_catalog_refresh_mib"], 3) if flow else None},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
