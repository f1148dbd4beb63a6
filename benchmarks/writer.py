"""Benchmark: `ShardWriter.write` of an Arrow table (columnar checks and casts) vs the dict-row path.

The peer is what the writer did with an Arrow table before it took tables natively: `to_pylist()`,
per-row checks, `Table.from_pylist`, then the same Parquet write. Both write the same `samples`
table of N rows (the `samples` columns ingest fills) in the same run, alternately, best of a few
rounds. Prints one JSON object: rows/s of each path and their ratio.

    python benchmarks/writer.py [--rows 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_manifest import ShardWriter, Workspace  # noqa: E402


def samples_table(n: int) -> pa.Table:
    """n `samples` rows shaped like ingest output (ids, paths, identities, sizes, hashes), built column-wise."""
    idx = pa.array(np.arange(n, dtype=np.int64))
    text = pc.cast(idx, pa.string())
    rng = np.random.default_rng(0)
    return pa.table({
        "sample_id": pc.binary_join_element_wise("bench-", text, ""),
        "dataset": pa.repeat("bench", n), "source_kind": pa.repeat("recordio", n),
        "source": pc.binary_join_element_wise("/data/train.rec#", text, ""),
        "identity": pa.array(np.arange(n, dtype=np.int64) // 50),
        "width": pa.array(np.full(n, 112, dtype=np.int32)), "height": pa.array(np.full(n, 112, dtype=np.int32)),
        "channels": pa.array(np.full(n, 3, dtype=np.int8)), "format": pa.repeat("JPEG", n),
        "bytes": pa.array(rng.integers(3000, 6000, n)),
        "content_hash": pc.binary_join_element_wise(pa.repeat("0" * 48, n), pc.utf8_lpad(text, 16, "0"), ""),
        "status": pa.repeat("ok", n),
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    tbl = samples_table(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Workspace(tmp), "samples", "bench")
        best = {"arrow": float("inf"), "dict": float("inf")}
        for _ in range(args.rounds):
            t = time.perf_counter()
            writer.write(0, tbl)
            best["arrow"] = min(best["arrow"], time.perf_counter() - t)
            t = time.perf_counter()
            writer.write(1, tbl.to_pylist())  # the former handling of a table: Python dicts, then the row path
            best["dict"] = min(best["dict"], time.perf_counter() - t)
        same = writer.path(0).stat().st_size > 0 and writer.path(1).stat().st_size > 0
    arrow_rps, dict_rps = args.rows / best["arrow"], args.rows / best["dict"]
    print(json.dumps({
        "benchmark": "writer.shard_write", "table": "samples", "rows": args.rows, "rounds": args.rounds,
        "arrow_rows_per_s": round(arrow_rps), "arrow_seconds": round(best["arrow"], 3),
        "peer": "the dict-row path of the same table (to_pylist + per-row checks + from_pylist), same run",
        "dict_rows_per_s": round(dict_rps), "dict_seconds": round(best["dict"], 3),
        "ratio_arrow_over_dict": round(arrow_rps / dict_rps, 2), "both_written": same,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
