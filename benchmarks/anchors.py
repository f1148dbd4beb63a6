"""Benchmark: throughput of the nearest-negative search vs this machine's float32 GEMM, projected to MS1MV2.

Prints one JSON object: samples/s of `NearestNegativeSearch` at 10k centers x 512 dims, the
same work expressed in GFLOP/s, the peer figure (the bare float32 GEMMs of the same tiles,
timed alternately with the search in the same run: the physical limit of a matmul-bound
search), their ratio, a 2048^3 GEMM for reference, the projected wall time
for MS1MV2 (5.8M samples x 85,742 centers), and the peak-RSS growth of the search when the
number of samples grows 5x (each size in its own subprocess).

    python benchmarks/anchors.py [--samples 8192] [--centers 10000] [--dim 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--centers", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--block", type=int, default=16384)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rss-samples", type=int, default=8192, help="small size of the 5x RSS comparison")
    args = p.parse_args(argv)

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
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
