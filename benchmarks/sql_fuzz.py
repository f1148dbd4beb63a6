"""Generated hostile SQL through the read-only query path: nothing may change, inside or outside the workspace.

Builds a small workspace beside an outside folder (a secret file, a Parquet file, a symlink from the
workspace to it), generates --statements statements from the grammar of
`tests/test_sql_hardening.fuzz_statements` (writes, reconfiguration, SQL-running and file-reading
functions drawn from every function of the installed DuckDB, in every wrapping a query allows, mutated),
runs each through `catalog.query` (half of them with --allow-external-read), and compares the SHA-256 of
every file in both folders before and after. Prints one JSON object: the counts of refused / errored /
run statements, whether anything changed, and the rate against a peer in the same run: the same number
of plain `SELECT 1` queries through the same path (the per-query cost of a fresh connection).

    python -m benchmarks.sql_fuzz [--statements 5000] [--seed 0]    (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_manifest import catalog  # noqa: E402
from tests.test_sql_hardening import fuzz_setting, fuzz_statements, run_fuzz  # noqa: E402
from tests.test_sql_security import _hashes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--statements", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-queries", type=int, default=200, help="plain queries timed for the per-query peer cost")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ws, outside, values = fuzz_setting(Path(tmp))
        before = _hashes(ws.root, outside)
        statements = fuzz_statements(args.statements, values, args.seed)
        t0 = time.perf_counter()
        counts = run_fuzz(ws, statements)
        fuzz_s = time.perf_counter() - t0
        after = _hashes(ws.root, outside)
        t0 = time.perf_counter()
        for _ in range(args.peer_queries):
            catalog.query(ws, "SELECT 1")
        peer_s = (time.perf_counter() - t0) / args.peer_queries
    out = {"statements": len(statements), "distinct": len(set(statements)), **counts,
           "files_unchanged": before == after, "changed": sorted(set(before.items()) ^ set(after.items()))[:5],
           "seconds": round(fuzz_s, 2), "ms_per_statement": round(1000 * fuzz_s / len(statements), 2),
           "peer": "plain 'SELECT 1' through catalog.query", "peer_ms_per_query": round(1000 * peer_s, 2),
           "ratio_fuzz_to_peer": round(fuzz_s / len(statements) / peer_s, 3)}
    print(json.dumps(out))
    return 0 if before == after else 1


if __name__ == "__main__":
    raise SystemExit(main())
