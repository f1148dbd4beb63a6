"""Generated hostile SQL through the read-only query path: nothing may change, inside or outside the workspace.

Builds a small workspace beside an outside folder (a secret file, a Parquet file, a symlink from the
workspace to it), generates --statements statements from the grammar of
`fuzz_statements` below (writes, reconfiguration, SQL-running and file-reading
functions drawn from every function of the installed DuckDB, in every wrapping a query allows, mutated),
runs each through `catalog.query` (half of them with --allow-external-read), and compares the SHA-256 of
every file in both folders before and after. Prints one JSON object: the counts of refused / errored /
run statements, whether anything changed, and the rate against a peer in the same run: the same number
of plain `SELECT 1` queries through the same path (the per-query cost of a fresh connection).

    python -m benchmarks.sql_fuzz [--statements 5000] [--seed 0]    (from the repository root)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_manifest import ShardWriter, Workspace, catalog, sql_functions


def _sample_rows(n: int) -> list[dict]:
    return [{"sample_id": f"s{i}", "dataset": "d", "source_kind": "folder", "source": f"/x/s{i}.png",
             "status": "ok"} for i in range(n)]


def workspace_beside_outside(tmp_path: Path, n: int) -> tuple[Workspace, Path, Path]:
    """A workspace with n samples in one shard, an outside folder with a secret, and a symlink from one to the other."""
    ws = Workspace(tmp_path / "ws")
    shard = ShardWriter(ws, "samples", "r1").write(0, _sample_rows(n))
    catalog.refresh(ws)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    os.symlink(outside, ws.root / "link_out")
    return ws, outside, shard


def fuzz_statements(n: int, values: dict, seed: int = 0) -> list[str]:
    """`n` statements from a small grammar of hostile SQL: payloads that write, reconfigure, run SQL or read
    outside, in every wrapping a query allows (CTE, subquery, EXPLAIN, query(), set operations, scripts),
    then mutated (case, comments, whitespace, quoting)."""
    rng = np.random.default_rng(seed)
    names = sorted(sql_functions.duckdb_function_names())
    targets = [values[k] for k in ("shard", "catalog", "out", "secret", "link", "dotdot", "pattern")]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def payload() -> str:
        t = pick(targets)
        return pick([
            f"COPY (SELECT 1) TO '{t}'", f"COPY samples TO '{t}' (FORMAT parquet, USE_TMP_FILE false)",
            f"ATTACH '{t}' AS x", "SET enable_external_access = true", f"EXPORT DATABASE '{values['outdir']}'",
            f"SELECT * FROM {pick(names)}('{t}')", f"SELECT {pick(names)}('{t}')",
            f"SELECT * FROM read_text('{t}')", f"SELECT * FROM '{t}'", f"SELECT * FROM glob('{t}')",
            f"SELECT * FROM json_execute_serialized_sql(json_serialize_sql('COPY (SELECT 1) TO ''{t}'''))",
            f"INSERT INTO samples_history SELECT * FROM read_parquet('{t}')", f"LOAD '{t}'", "INSTALL httpfs",
            f"SELECT * FROM query_table('{t}')", f"SELECT * FROM read_parquet(['{t}', '{pick(targets)}'])",
            f"SELECT * FROM read_csv('{t}', header = (SELECT true))", f"CREATE TABLE t AS SELECT '{t}'",
            f"SELECT * FROM read_text('{values['outdir']}' || '/secret.txt')",
        ])

    def wrap(p: str, depth: int = 0) -> str:
        if depth > 2:
            return p
        inner = wrap(p, depth + 1) if rng.random() < 0.3 else p
        quoted = inner.replace("'", "''")
        return pick([
            inner, f"WITH c AS ({inner}) SELECT * FROM c", f"SELECT * FROM ({inner}) t",
            f"SELECT (SELECT count(*) FROM ({inner}) q)", f"EXPLAIN {inner}", f"EXPLAIN ANALYZE {inner}",
            f"SELECT * FROM query('{quoted}')", f"SELECT 1 UNION ALL ({inner})", f"SELECT 1; {inner}",
            f"SELECT * FROM samples WHERE sample_id IN (SELECT * FROM ({inner}) z)",
            f"PREPARE p AS {inner}; EXECUTE p", f"/* x */ {inner} -- y",
        ])

    def mutate(s: str) -> str:
        r = rng.random()
        if r < 0.15:
            return s.upper()
        if r < 0.3:
            return s.replace(" ", "\n\t ")
        if r < 0.4:
            return s.replace("SELECT", "SELECT /* c */", 1)
        if r < 0.5:
            return s + ";"
        return s

    return [mutate(wrap(payload())) for _ in range(n)]


def fuzz_setting(tmp_path: Path) -> tuple[Workspace, Path, dict]:
    ws, outside, shard = workspace_beside_outside(tmp_path, 5)
    pq.write_table(pa.table({"a": [1]}), outside / "t.parquet")
    values = {"shard": str(shard), "catalog": str(ws.catalog_path), "out": str(outside / "pwned.sh"),
              "secret": str(outside / "secret.txt"), "link": f"{ws.root}/link_out/secret.txt",
              "dotdot": f"{ws.root}/link_out/../outside/t.parquet", "pattern": f"{outside}/*",
              "outdir": str(outside)}
    return ws, outside, values


def run_fuzz(ws: Workspace, statements: list[str]) -> dict[str, int]:
    """Each statement through catalog.query, half with --allow-external-read: what happened, counted."""
    counts = {"refused": 0, "error": 0, "ran": 0}
    for i, s in enumerate(statements):
        try:
            catalog.query(ws, s, allow_external_read=bool(i % 2), timeout_s=20)
            counts["ran"] += 1
        except catalog.ReadOnlyError:
            counts["refused"] += 1
        except (ValueError, duckdb.Error):
            counts["error"] += 1
    return counts


def file_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under the roots."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "link:" + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--statements", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-queries", type=int, default=200, help="plain queries timed for the per-query peer cost")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ws, outside, values = fuzz_setting(Path(tmp))
        before = file_hashes(ws.root, outside)
        statements = fuzz_statements(args.statements, values, args.seed)
        t0 = time.perf_counter()
        counts = run_fuzz(ws, statements)
        fuzz_s = time.perf_counter() - t0
        after = file_hashes(ws.root, outside)
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
