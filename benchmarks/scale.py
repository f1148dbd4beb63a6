"""SQL inspection at MS1MV2 and WebFace42M scale: the bundled questions on snapshots, and refresh cost.

Builds a synthetic workspace of N samples with the project's own writers and
run registry (an ingest run: samples; two label runs: faces + blur/pose/
occlusion, then expression/lighting, so 5 factor rows per sample; an anchors
run; ids, strings and constant columns are built vectorised, 42M samples in
about 5 min here), builds the snapshots, then, each in a fresh child process
that reports its own peak RSS:

- `queries`: the bundled `factor_distribution.sql`, `factor_crosstab.sql` and
  `joint_factors.sql`, a two-factor filter count on `labels` and point lookups,
  through `catalog.query` (the `fiqa sql` path) on the snapshots. Two peers:
  `previous_sql`, the bundled questions as they were written before the kept
  class counts (scanning `factors` / `labels`), same snapshots, same process,
  with a check that both give the same answer; `peer_history_window`, the
  questions on the latest views computed from the history (the window over
  every shard and the factor pivot: what every query cost before snapshots),
  run only up to `--peer-max-samples` (7.7 GB and 15-34 s a question at 5.8M);
- `refresh`: a relabel run of R random samples (5 factors each) is written and
  the catalog refreshed (its new shards folded into the snapshots); the peer is
  `fiqa compact`, rebuilding every snapshot from all shards;
- the queries again, on the snapshots with that relabel folded in.

With `--compact-once` the snapshots are first built by `fiqa compact`'s own
path (every snapshot rebuilt from all shards), timed as the compact, and not
rebuilt again at the end (at 42M a rebuild is the longest step).
`--webface42m` is `--samples 42000000 --relabel 1000000 --compact-once`.

Optionally (`--label-images N`) it adds the label-pass throughput, 1 -> 2 worker
scaling and MS1MV2 projection of `benchmarks/label.py --scaling-only`. Prints
one JSON object.

    python -m benchmarks.scale                       # 1M samples
    python -m benchmarks.scale --samples 5822653     # MS1MV2 size
    python -m benchmarks.scale --webface42m --workspace /big/disk/ws42   # 42M: ~9 GB of shards + the catalog
    python -m benchmarks.scale --samples 200000 --skip-peer   # a quick check

`--workspace DIR` keeps the workspace; `--reuse` then skips writing it again
when DIR already holds one built for the same size (its `scale-build.json`),
and `--queries-only` times only the questions on the snapshots it has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MS1MV2_SAMPLES = 5_822_653
MS1MV2_IDENTITIES = 85_742
WEBFACE42M_SAMPLES = 42_000_000
PEER_MAX_SAMPLES = 6_000_000  # the history-window peer needs 7.7 GB and 15-34 s a question at 5.8M
BUILD_MARKER = "scale-build.json"
TWO_FACTOR = "SELECT count(*) AS n FROM labels WHERE blur_class = 'hazy' AND pose_class = 'frontal'"
LOOKUP_LABELS = "SELECT * FROM labels WHERE sample_id = ?"
LOOKUP_FACTORS = "SELECT * FROM factors WHERE sample_id = ?"
# The bundled questions as written before the kept class counts: scans of `factors` / `labels` (the peer).
PREVIOUS_SQL = {
    "factor_distribution": """WITH counts AS MATERIALIZED (
    SELECT factor, class_index, class_name, count(*) AS n FROM factors WHERE status = 'ok'
    GROUP BY factor, class_index, class_name)
SELECT factor, class_index, class_name, n, round(n / sum(n) OVER (PARTITION BY factor), 4) AS fraction
FROM counts ORDER BY factor, class_index""",
    "factor_crosstab": """SELECT blur_class, pose_class, count(*) AS n,
       count(*) FILTER (WHERE occlusion_class = 'obstructed') AS obstructed,
       count(*) FILTER (WHERE expression_class = 'exaggerated expression') AS exaggerated,
       count(*) FILTER (WHERE lighting_class = 'extreme lighting') AS extreme_lighting
FROM labels WHERE blur_class IS NOT NULL AND pose_class IS NOT NULL GROUP BY ALL ORDER BY blur_class, pose_class""",
    "joint_factors": """SELECT blur_class, occlusion_class, pose_class, expression_class, lighting_class, count(*) AS n
FROM labels WHERE blur_class IS NOT NULL GROUP BY ALL
ORDER BY n DESC, blur_class, occlusion_class, pose_class, expression_class, lighting_class""",
}


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_SALTS = (np.uint64(0x5851F42D4C957F2D), np.uint64(0x14057B7EF767814F))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps): a fixed, well-spread hash of each value."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _ids(index: np.ndarray) -> pa.StringArray:
    """Sample ids of synthetic records `index`: 32 lowercase hex digits each, like `pipeline.ids.sample_id`,
    a fixed function of the index, spread uniformly (so a shard's ids are in random order), computed
    vectorised (42M ids in seconds, not the minutes of 42M blake2b calls from Python)."""
    i = np.asarray(index, np.uint64)
    words = np.stack([_mix(i ^ _SALTS[0]), _mix(i ^ _SALTS[1])], axis=1).astype(">u8")
    raw = words.view(np.uint8).reshape(len(i), 16)
    hexed = np.empty((len(i), 32), np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 15]
    offsets = np.arange(0, 32 * (len(i) + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(i), pa.py_buffer(offsets), pa.py_buffer(hexed.tobytes()))


def _const(value: object, n: int, typ: pa.DataType | None = None) -> pa.Array:
    return pa.repeat(pa.scalar(value, typ or pa.string()), n)


def _factor_table(ids: pa.Array, factors: tuple[str, ...], rng: np.random.Generator, version: str) -> pa.Table:
    """Long factor rows for `ids`: per factor a value, its class and labeller columns."""
    from data_manifest.vocabulary import FACTOR_CLASSES

    parts = []
    n = len(ids)
    for f in factors:
        classes = FACTOR_CLASSES[f]
        idx = rng.integers(0, len(classes), n).astype(np.int8)
        value = rng.random(n)
        details = pc.binary_join_element_wise('{"score": ', pc.cast(pa.array(rng.random(n).round(4)), pa.string()),
                                              "}", "")
        parts.append(pa.table({
            "sample_id": ids, "factor": _const(f, n), "value": value,
            "class_index": idx, "class_name": pc.take(pa.array(classes), pa.array(idx)),
            "labeller": _const(f"synthetic-{f}", n), "labeller_version": _const(version, n),
            "thresholds": _const('{"lo": 0.018, "hi": 0.083}', n),
            "details": details, "status": _const("ok", n), "error": pa.nulls(n, pa.string())}))
    return pa.concat_tables(parts)


def build(ws_root: Path, n: int, shard: int, seed: int = 0) -> dict:
    """Write the synthetic workspace run by run, shard by shard (nothing of size N is held in memory)."""
    from data_manifest import ShardWriter, Workspace, runs

    ws = Workspace(ws_root)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    plan = {"ingest": ("samples",), "label": ("faces", "factors"), "label2": ("factors",), "anchors": ("anchors",)}
    for flow, tables in plan.items():
        rid = runs.start_run(ws, "label" if flow == "label2" else flow, {"synthetic": True})
        writers = {t: ShardWriter(ws, t, rid) for t in tables}
        for k, start in enumerate(range(0, n, shard)):
            stop = min(n, start + shard)
            index = np.arange(start, stop)
            ids = _ids(index)
            m = stop - start
            ident = pa.array(index * MS1MV2_IDENTITIES // max(n, 1), pa.int64())
            if flow == "ingest":
                writers["samples"].write(k, pa.table({
                    "sample_id": ids, "dataset": _const("ms1m-synthetic", m), "source_kind": _const("recordio", m),
                    "source": pc.binary_join_element_wise("/data/ms1m/train.rec#", pc.cast(pa.array(index),
                                                                                             pa.string()), ""),
                    "identity": ident, "width": _const(112, m, pa.int32()), "height": _const(112, m, pa.int32()),
                    "status": _const("ok", m)}))
            elif flow == "label":
                writers["faces"].write(k, pa.table({
                    "sample_id": ids, "detector": _const("none", m), "n_faces": _const(1, m, pa.int32()),
                    "crop_file": _const(f"crops/run=label/pack-{k:05d}.npy", m),
                    "crop_index": pa.array(np.arange(m, dtype=np.int32)),
                    "aligned_mode": _const("already_aligned", m), "status": _const("ok", m)}))
                writers["factors"].write(k, _factor_table(ids, ("blur", "pose", "occlusion"), rng, "1"))
            elif flow == "label2":
                writers["factors"].write(k, _factor_table(ids, ("expression", "lighting"), rng, "1"))
            else:
                raw = rng.random(m).astype(np.float32)
                writers["anchors"].write(k, pa.table({
                    "sample_id": ids, "model_id": _const("r100-synthetic", m), "identity": ident,
                    "raw": raw, "anchor": (0.1 + 0.8 * raw).astype(np.float32), "status": _const("ok", m)}))
        runs.finish_run(ws, rid, runs.COMPLETED)
    out = {"seconds": round(time.perf_counter() - t0, 1), "samples": n, "shard_size": shard, "seed": seed}
    (ws_root / BUILD_MARKER).write_text(json.dumps(out) + "\n")
    return out


def relabel(ws_root: Path, n: int, count: int, seed: int = 1) -> tuple[str, list[str]]:
    """A completed relabel run of `count` random samples, all five factors (a new labeller version)."""
    from data_manifest import ShardWriter, Workspace, runs
    from data_manifest.vocabulary import FACTORS

    ws = Workspace(ws_root)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(count, n), replace=False))
    ids = _ids(picked)
    rid = runs.start_run(ws, "relabel", {"synthetic": True, "samples": len(picked)})
    w = ShardWriter(ws, "factors", rid)
    for k, start in enumerate(range(0, len(ids), 100_000)):
        w.write(k, _factor_table(ids[start:start + 100_000], FACTORS, rng, "2"))
    runs.finish_run(ws, rid, runs.COMPLETED)
    return rid, ids[:3].to_pylist()


# ---------------------------------------------------------------- child processes


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _digest(tbl: pa.Table) -> str:
    return hashlib.sha256(json.dumps(tbl.to_pylist(), default=str).encode()).hexdigest()[:16]


def child_queries(ws_root: Path, mode: str, lookup_id: str, repeats: int) -> dict:
    """Seconds of each question (first call, best of `repeats`), answered the way `mode` says."""
    from data_manifest import Workspace, catalog

    ws = Workspace(ws_root, create=False)
    questions = {name: (catalog.bundled_sql(name), None) for name in PREVIOUS_SQL}
    questions |= {"two_factor_count": (TWO_FACTOR, None), "lookup_labels": (LOOKUP_LABELS, [lookup_id]),
                  "lookup_factors": (LOOKUP_FACTORS, [lookup_id])}
    if mode == "snapshot":  # the peer in the same process: the questions as they were written before
        questions |= {f"previous_sql_{name}": (sql, None) for name, sql in PREVIOUS_SQL.items()}

    def history_query(sql: str, params: list | None) -> pa.Table:  # the latest views computed from the shards
        with catalog.history_connection(ws) as con:
            return con.sql(sql, params=params).to_arrow_table()

    run = (lambda s, p: catalog.query(ws, s, p)) if mode == "snapshot" else history_query
    out: dict = {}
    for name, (sql, params) in questions.items():
        times, res = [], None
        for _ in range(1 + repeats):
            t0 = time.perf_counter()
            res = run(sql, params)
            times.append(time.perf_counter() - t0)
        out[name] = {"first_s": round(times[0], 3), "best_s": round(min(times[1:] or times), 3),
                     "rows": res.num_rows, "answer": _digest(res)}
    for name in PREVIOUS_SQL:
        if f"previous_sql_{name}" in out:
            prev = out[f"previous_sql_{name}"]
            prev["same_answer"] = prev["answer"] == out[name]["answer"]
            prev["ratio_previous_over_now"] = round(prev["best_s"] / max(out[name]["best_s"], 1e-6), 1)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def child_refresh(ws_root: Path, rebuild: bool) -> dict:
    from data_manifest import Workspace, catalog, snapshots

    ws = Workspace(ws_root, create=False)
    folds: list[snapshots.FoldReport] = []
    t0 = time.perf_counter()
    ok = catalog.refresh(ws, rebuild=rebuild, folds=folds)
    out = {"seconds": round(time.perf_counter() - t0, 2), "ok": ok, "peak_rss_mb": _peak_rss_mb()}
    if folds:
        out["snapshots"] = folds[-1].as_dict()
    return out


def _child(*args: str, timeout: float = 4 * 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _worst(queries: dict) -> float:
    """The slowest question (best of its repeats), the previous formulations left out."""
    return max(v["best_s"] for k, v in queries.items() if isinstance(v, dict) and not k.startswith("previous_sql"))


def _dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--relabel", type=int, default=100_000, help="samples in the relabel run whose refresh is timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-peer", action="store_true", help="skip the history-window peer (slow at MS1MV2 size)")
    p.add_argument("--peer-max-samples", type=int, default=PEER_MAX_SAMPLES,
                   help="run the history-window peer only up to this many samples (default %(default)s)")
    p.add_argument("--compact-once", action="store_true",
                   help="build the snapshots with `fiqa compact`'s path, timed as the compact; no rebuild at the end")
    p.add_argument("--webface42m", action="store_true",
                   help=f"WebFace42M size: --samples {WEBFACE42M_SAMPLES} --relabel 1000000 --compact-once")
    p.add_argument("--workspace", type=Path, default=None, help="build here and keep it (default: a temp dir)")
    p.add_argument("--reuse", action="store_true",
                   help="with --workspace: skip writing it when it already holds one built for this size")
    p.add_argument("--queries-only", action="store_true",
                   help="with --workspace: only time the questions on the snapshots it already has (no build, "
                        "no relabel, no compact)")
    p.add_argument("--label-images", type=int, default=0,
                   help="also measure the label pass on this many crops (benchmarks/label.py scaling) and project "
                        "the MS1MV2 label pass")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.webface42m:
        args.samples, args.relabel, args.compact_once = WEBFACE42M_SAMPLES, 1_000_000, True

    if args.child:
        kind, ws_root, *rest = args.child
        if kind == "queries":
            out = child_queries(Path(ws_root), rest[0], rest[1], int(rest[2]))
        elif kind == "refresh":
            out = child_refresh(Path(ws_root), rest[0] == "rebuild")
        else:
            raise SystemExit(f"unknown child {kind}")
        print(json.dumps(out))
        return 0

    if args.queries_only:
        if args.workspace is None:
            raise SystemExit("--queries-only needs --workspace")
        from data_manifest import Workspace, catalog

        ws = Workspace(args.workspace, create=False)
        lookup_id = catalog.query(ws, "SELECT sample_id FROM samples LIMIT 1").column(0)[0].as_py()
        rows = catalog.query(ws, "SELECT count(*) AS samples FROM samples").to_pylist()[0]
        out = _child("queries", str(args.workspace), "snapshot", lookup_id, str(args.repeats))
        print(json.dumps({**rows, "queries": out, "worst_s": _worst(out),
                          "same_answers": all(out[f"previous_sql_{k}"]["same_answer"] for k in PREVIOUS_SQL)},
                         indent=2))
        return 0

    keep = args.workspace is not None
    root = args.workspace or Path(tempfile.mkdtemp(prefix="fiqa-scale-"))
    try:
        report: dict = {"samples": args.samples, "factor_rows": 5 * args.samples, "shard_size": args.shard_size,
                        "relabel": args.relabel,
                        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
        marker = root / BUILD_MARKER
        built = json.loads(marker.read_text()) if args.reuse and marker.is_file() else None
        if built and (built["samples"], built["shard_size"]) == (args.samples, args.shard_size) \
                and not (root / "catalog.duckdb").exists():
            report["build"] = {**built, "reused": True}
        else:
            if root.exists() and any(root.iterdir()):
                raise SystemExit(f"{root} is not empty (use --reuse on a workspace this benchmark wrote, "
                                 "before its snapshots were built)")
            report["build"] = build(root, args.samples, args.shard_size)
        if args.compact_once:
            report["compact"] = _child("refresh", str(root), "rebuild")
        else:
            report["snapshot_build"] = _child("refresh", str(root), "fold")
        from data_manifest import Workspace, catalog

        lookup = catalog.query(Workspace(root, create=False), "SELECT sample_id FROM samples LIMIT 1").column(0)[0]
        lookup_id = lookup.as_py()
        report["queries"] = _child("queries", str(root), "snapshot", lookup_id, str(args.repeats))
        if args.skip_peer or args.samples > args.peer_max_samples:
            report["peer_history_window"] = {"skipped": "--skip-peer" if args.skip_peer else (
                f"over --peer-max-samples {args.peer_max_samples}: it needs 7.7 GB and 15-34 s a question "
                "at 5.8M samples, growing with N")}
        else:
            peer = report["peer_history_window"] = _child("queries", str(root), "history", lookup_id, "0")
            report["speedup_vs_history"] = {k: round(v["first_s"] / max(report["queries"][k]["best_s"], 1e-6), 1)
                                            for k, v in peer.items() if isinstance(v, dict)}
        rid, ids = relabel(root, args.samples, args.relabel)
        report["refresh_after_relabel"] = {"samples": args.relabel, "run_id": rid,
                                           **_child("refresh", str(root), "fold")}
        report["queries_after_relabel"] = _child("queries", str(root), "snapshot", ids[0], str(args.repeats))
        if not args.compact_once:
            report["compact"] = _child("refresh", str(root), "rebuild")
        report["refresh_vs_compact"] = round(report["refresh_after_relabel"]["seconds"]
                                             / max(report["compact"]["seconds"], 1e-6), 3)
        report["disk_mb"] = {"manifests": _dir_mb(root / "manifests"),
                             "catalog_duckdb": round((root / "catalog.duckdb").stat().st_size / 1e6, 1)}
        for key in ("queries", "queries_after_relabel"):
            report[f"worst_{key}_s"] = _worst(report[key])
            report[f"same_answers_{key}"] = all(report[key][f"previous_sql_{k}"]["same_answer"] for k in PREVIOUS_SQL)
        if args.label_images:  # benchmarks/label.py's scaling part, its own JSON, as it prints it
            res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "label.py"), "--scaling-only",
                                  "--scaling-images", str(args.label_images)], capture_output=True, text=True,
                                 cwd=ROOT, check=True)
            report["label_pass"] = json.loads(res.stdout)
        print(json.dumps(report, indent=2))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
