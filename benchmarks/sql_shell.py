"""Point lookups in the interactive SQL shell (one held connection) against a fresh `fiqa sql` process each.

Builds a synthetic workspace of N samples with benchmarks/scale.py's writers
(samples, faces, five factor rows per sample, anchors) and its snapshots, then:

- `shell`: one `data_manifest.shell.Shell` on one `catalog.Session`, fed
  `SELECT * FROM labels WHERE sample_id = '...';` for L random samples, each
  line timed from the line fed to its rendered table (the checks, the query,
  the table text); the time the session took to open is reported apart;
- `peer_fresh_process`: the same lookup as `python -m flows.cli sql --workspace W
  "SELECT ..."`, a fresh process per lookup (interpreter, imports, the catalog
  connection, the query), P times.

Both print the same table for the same sample (checked). Prints one JSON object;
`ratio` is the peer's median over the shell's.

    python benchmarks/sql_shell.py                      # 100k samples, 200 lookups, 5 peer processes
    python benchmarks/sql_shell.py --samples 1000000 --lookups 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOKUP = "SELECT * FROM labels WHERE sample_id = '{}'"


def _stats(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3)}


def shell_lookups(ws_root: Path, ids: list[str]) -> tuple[dict, dict[str, str]]:
    """Each lookup fed to one shell on one held session, timed; the table text of each sample."""
    from data_manifest import Workspace, catalog
    from data_manifest.shell import Shell
    from pipeline.reports.query_results import FORMATS, write_result

    t0 = time.perf_counter()
    session = catalog.Session(Workspace(ws_root, create=False))
    opened = time.perf_counter() - t0
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(session, lambda tbl, fmt: write_result(tbl, fmt, None, 50), [f for f in FORMATS if f != "parquet"],
                  stdin=io.StringIO(""), stdout=out, stderr=err, interactive=False)
    times, texts = [], {}
    try:
        for sid in ids:
            out.seek(0)
            out.truncate()
            t = time.perf_counter()
            shell.feed(LOOKUP.format(sid) + ";")
            times.append(time.perf_counter() - t)
            texts[sid] = out.getvalue()
    finally:
        session.close()
    if err.getvalue():
        raise RuntimeError(f"the shell reported an error: {err.getvalue()}")
    return {"session_open_s": round(opened, 3), "first_ms": round(times[0] * 1000, 3),
            **_stats(times[1:] or times)}, texts


def fresh_process_lookups(ws_root: Path, ids: list[str]) -> tuple[dict, dict[str, str]]:
    """Each lookup as its own `fiqa sql` process, timed wall-clock; the table text of each sample."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times, texts = [], {}
    for sid in ids:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "--workspace", str(ws_root),
                              LOOKUP.format(sid)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        times.append(time.perf_counter() - t)
        if res.returncode != 0:
            raise RuntimeError(f"fiqa sql failed: {res.stderr[-2000:]}")
        texts[sid] = res.stdout
    return _stats(times), texts


def run(samples: int, lookups: int, peers: int, shard: int, root: Path, seed: int = 0) -> dict:
    from benchmarks.scale import build
    from data_manifest import Workspace, catalog

    report: dict = {"samples": samples, "factor_rows": 5 * samples, "lookup": LOOKUP.format("<sample_id>"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    report["build"] = build(root, samples, shard, seed)
    t0 = time.perf_counter()
    catalog.refresh(Workspace(root, create=False))
    report["build"]["snapshots_s"] = round(time.perf_counter() - t0, 1)
    all_ids = catalog.query(Workspace(root, create=False), "SELECT sample_id FROM samples").column(0).to_pylist()
    rng = np.random.default_rng(seed)
    ids = [all_ids[i] for i in rng.choice(len(all_ids), size=min(lookups, len(all_ids)), replace=False)]
    report["shell"], shown = shell_lookups(root, ids)
    report["peer_fresh_process"], peer_shown = fresh_process_lookups(root, ids[:peers])
    same = all(shown[sid] == peer_shown[sid] and sid in shown[sid] for sid in peer_shown)
    if not same:
        raise RuntimeError("the shell and fiqa sql printed different tables for the same lookup")
    report["same_output"] = same
    report["ratio"] = round(report["peer_fresh_process"]["median_ms"] / report["shell"]["median_ms"], 1)
    report["shell_under_10ms"] = report["shell"]["median_ms"] < 10
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--lookups", type=int, default=200, help="lookups in the shell (the first is reported apart)")
    p.add_argument("--peers", type=int, default=5, help="lookups as fresh `fiqa sql` processes")
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--workspace", type=Path, default=None, help="build here and keep it (default: a temp dir)")
    args = p.parse_args(argv)
    keep = args.workspace is not None
    root = args.workspace or Path(tempfile.mkdtemp(prefix="fiqa-shell-bench-"))
    try:
        print(json.dumps(run(args.samples, args.lookups, args.peers, args.shard_size, root), indent=2))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
