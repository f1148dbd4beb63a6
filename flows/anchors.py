"""`fiqa anchors`: embed aligned faces with a recognition model and compute CR-FIQA-style quality anchors.

Four resumable stages in one run, each committing per shard:
embed (crops -> `embeddings` table) -> centers (streaming per-identity sums over the embedding
shards, or a classifier head) -> search (nearest negative center per sample, raw ratio) ->
normalise (global min/max -> `anchors` table). The min/max, model id, center source and status
counts are recorded in the run's metrics. Every selected sample gets an anchors row.
With `reuse_embeddings`, a first pass copies the stored embeddings of the same model into the run's
scratch folder shard by shard and only the samples without one are embedded. Centers and the
search always use the selection's current identity, never the one stored with an embedding.
"""

from __future__ import annotations

import argparse
import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_manifest import ShardWriter, Workspace, catalog, runs
from data_manifest.writer import atomic_write
from flows import runtime
from pipeline import anchors as A

DEFAULT_FR_MODEL = "insightface"
SELECT_SQL = """
SELECT s.sample_id, s.identity, fc.crop_file, fc.crop_index, fc.status AS face_status, fc.error AS face_error
FROM samples s LEFT JOIN faces fc USING (sample_id)
"""
_LOCK = threading.Lock()
NO_EMBEDDING = "no_embedding"
REUSE_STAGE = "reuse"
# Latest ok embedding of the model per selected sample (from earlier runs), grouped by selection shard.
REUSE_SQL = """
SELECT s.shard, e.sample_id, e.embedding
FROM embeddings e JOIN _anchors_selection s ON e.sample_id = s.sample_id
WHERE e.model_id = ? AND e.status = 'ok' AND e.embedding IS NOT NULL AND e.run_id <> ?
ORDER BY s.shard, e.sample_id
"""
_REUSED_SCHEMA = pa.schema([("sample_id", pa.string()), ("embedding", pa.list_(pa.float32()))])


def selection_sql(where: str | None = None, query: str | None = None) -> str:
    """SQL giving (sample_id, identity, crop_file, crop_index, face_status, face_error) of the labelled set."""
    return catalog.selection_sql(SELECT_SQL, where, query)


@lru_cache(maxsize=2)
def _recognizer(spec: str, device: str, batch_size: int) -> Any:
    from models.recognition import build_recognizer

    return build_recognizer(spec, device=device, batch_size=batch_size)


def embed_rows(ws: Workspace, items: list[dict[str, Any]], spec: str, *, device: str,
               batch_size: int) -> list[dict[str, Any]]:
    """Embed one shard of selected samples: one `embeddings` row per sample (null embedding + reason if none)."""
    from data_manifest.crops import PackReader

    rec = _recognizer(spec, device, batch_size)
    reader = PackReader(ws)
    rows: list[dict[str, Any]] = []
    good, crops = [], []
    for it in items:
        base = {"sample_id": it["sample_id"], "model_id": rec.model_id, "identity": it.get("identity")}
        if it.get("crop_file") is None or it.get("crop_index") is None:
            reason = it.get("face_error") or f"no aligned crop (face status: {it.get('face_status') or 'not aligned'})"
            rows.append({**base, "embedding": None, "status": "skipped", "error": reason})
            continue
        try:
            crop = reader.read(it["crop_file"], int(it["crop_index"]))
            crops.append(crop)
            good.append(base)
        except (OSError, ValueError, IndexError) as e:
            rows.append({**base, "embedding": None, "status": "error", "error": f"cannot read crop: {e}"})
    if good:
        try:
            with _LOCK:  # one model per process; concurrent shards take turns on it
                emb = rec.embed(np.stack(crops))
        except ValueError as e:
            rows += [{**b, "embedding": None, "status": "error", "error": f"cannot embed: {e}"} for b in good]
        else:
            rows += [{**b, "embedding": emb[i].tolist(), "status": "ok", "error": None} for i, b in enumerate(good)]
    return rows


def _vectors(col: pa.ChunkedArray | pa.Array, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 rows of a list<float32> column (NaN where null) and the non-null mask."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    ok = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    emb = np.full((len(col), max(dim, 1)), np.nan, dtype=np.float32)
    if ok.any():
        good = col.filter(pa.array(ok))
        lengths = pc.list_value_length(good).to_numpy(zero_copy_only=False)
        if (lengths != dim).any():
            raise ValueError(f"{where}: embeddings of length {sorted(set(lengths.tolist()) - {dim})} where the "
                             f"recogniser gives {dim}")
        emb[ok] = good.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(int(ok.sum()), dim)
    return emb, ok


def _reused_path(ws: Workspace, run_id: str, shard: str) -> Path:
    return ws.runs_dir / run_id / "reused_embeddings" / f"part-{shard}.parquet"


def _shard_embeddings(ws: Workspace, run_id: str, shard: str, sel: pa.Table,
                      dim: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """One selection shard in selection order: (sample_id, current identity, error), (n, D) vectors, ok mask.

    Vectors come from this run's `embeddings` shard and, with reuse, from the staged stored ones; the
    identity is the selection's (latest `samples.identity`), not the one stored with an embedding.
    """
    ids, vecs, oks, errors = [], [], [], []
    emb_path = ShardWriter(ws, "embeddings", run_id).path(shard)
    if emb_path.exists():
        t = pq.read_table(emb_path, columns=["sample_id", "embedding", "error"])
        e, ok = _vectors(t.column("embedding"), dim, str(emb_path))
        ids.append(t.column("sample_id").combine_chunks())
        vecs.append(e)
        oks.append(ok)
        errors += t.column("error").to_pylist()
    reused = _reused_path(ws, run_id, shard)
    if reused.exists():
        t = pq.read_table(reused)
        e, ok = _vectors(t.column("embedding"), dim, str(reused))
        ids.append(t.column("sample_id").combine_chunks())
        vecs.append(e)
        oks.append(ok)
        errors += [None] * t.num_rows
    n = sel.num_rows
    emb = np.full((n, max(dim, 1)), np.nan, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    err: list[str | None] = ["no embedding row for this sample in the run (its shard files are missing)"] * n
    if ids:
        pos = pc.index_in(sel.column("sample_id"), value_set=pa.concat_arrays(ids)).to_numpy(zero_copy_only=False)
        found = ~np.isnan(pos.astype(np.float64))
        src = pos[found].astype(np.int64)
        all_emb, all_ok = np.concatenate(vecs), np.concatenate(oks)
        emb[found], ok[found] = all_emb[src], all_ok[src]
        for j, k in zip(np.flatnonzero(found).tolist(), src.tolist(), strict=True):
            err[j] = None if all_ok[k] else errors[k]
    tbl = pa.table({"sample_id": sel.column("sample_id"), "identity": pa.array(_identities(sel), pa.int64()),
                    "error": pa.array(err, pa.string())})
    return tbl, emb, ok


def _stage_reused(ws: Workspace, run_id: str, model_id: str, selected: pa.Table, shard_size: int) -> int:
    """Copy the latest ok stored embeddings of the model for the selection into per-shard scratch files.

    One streamed catalog query, grouped by selection shard, so memory holds one batch; returns the count.
    """
    shard_of = pa.array(np.arange(selected.num_rows, dtype=np.int64) // shard_size)
    sel = pa.table({"sample_id": selected.column("sample_id"), "shard": shard_of}).group_by(
        ["sample_id", "shard"]).aggregate([])
    folder = _reused_path(ws, run_id, "x").parent
    for stale in folder.glob("part-*.parquet"):  # an interrupted staging pass is redone from scratch
        stale.unlink()
    total, current, parts = 0, None, []

    def flush() -> None:
        if current is not None and parts:
            t = pa.Table.from_batches(parts).select(["sample_id", "embedding"]).cast(_REUSED_SCHEMA)
            atomic_write(_reused_path(ws, run_id, runtime.shard_name(current)), lambda tmp: pq.write_table(t, tmp))

    con = catalog.connect(ws)
    try:
        con.register("_anchors_selection", sel)
        reader = con.sql(REUSE_SQL, params=[model_id, run_id]).to_arrow_reader(65536)
        for batch in reader:
            shard = batch.column("shard").to_numpy(zero_copy_only=False)
            cuts = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(shard)]
            for a, b in zip(cuts[:-1], cuts[1:], strict=False):
                if b <= a:
                    continue
                if int(shard[a]) != current:
                    flush()
                    current, parts = int(shard[a]), []
                parts.append(batch.slice(a, b - a))
                total += b - a
        flush()
    finally:
        con.close()
    return total


def _identities(tbl: pa.Table) -> np.ndarray:
    ids = tbl.column("identity").to_numpy(zero_copy_only=False)
    return np.where(np.isnan(ids.astype(np.float64)), -1, ids).astype(np.int64)


class _Labels:
    """Identity -> dense row of the centers matrix (mean centers) or identity itself (head rows)."""

    def __init__(self, identities: np.ndarray | None) -> None:
        self.ids = identities  # sorted unique identities, or None when identity == head row

    def dense(self, ident: np.ndarray) -> np.ndarray:
        if self.ids is None:
            return ident
        if len(self.ids) == 0:
            return np.full(len(ident), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ident), 0, len(self.ids) - 1)
        return np.where((ident >= 0) & (self.ids[pos] == ident), pos, -1)

    def identity(self, dense: np.ndarray) -> np.ndarray:
        if self.ids is None:
            return dense
        return np.where(dense >= 0, self.ids[np.clip(dense, 0, None)], -1)


_STATS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("identity", pa.int64()), ("ccs", pa.float32()), ("nnccs", pa.float32()),
    ("nearest_negative", pa.int64()), ("raw", pa.float64()), ("status", pa.string()), ("error", pa.string()),
])


def _stats_path(ws: Workspace, run_id: str, shard: str) -> Path:
    return ws.runs_dir / run_id / "anchor_stats" / f"part-{shard}.parquet"


def _check_config(fr_model: str, head: str | None, mode: str, device: str, batch_size: int) -> str | None:
    """Fail on a bad configuration before any work (or Prefect) starts; returns the head's absolute path."""
    if mode not in A.MODES:
        raise ValueError(f"unknown anchor mode {mode!r}; use one of {A.MODES}")
    head_path = str(Path(head).resolve()) if head else None
    if head_path and not Path(head_path).is_file():
        raise FileNotFoundError(f"head checkpoint {head_path} does not exist")
    _recognizer(fr_model, device, batch_size)  # builds (and caches) the model: a bad spec fails here
    return head_path


def _anchors_impl(workspace: str | None, fr_model: str, head: str | None, mode: str, nnccs_floor: float,
                  where: str | None, query: str | None, device: str, batch_size: int, shard_size: int,
                  chunk_size: int, center_block: int, run_id: str | None, runner: str,
                  workers: int | None, progress: bool | None, reuse_embeddings: bool = False) -> dict[str, Any]:
    from prefect import task

    ws = Workspace(workspace)
    head_path = _check_config(fr_model, head, mode, device, batch_size)
    rec = _recognizer(fr_model, device, batch_size)
    model_id = rec.model_id
    sql = selection_sql(where, query)
    try:
        selected = catalog.query(ws, sql)
    except Exception as e:
        raise ValueError(f"selection query failed: {e}\nSQL: {sql}") from e
    missing = {"sample_id", "identity", "crop_file", "crop_index"} - set(selected.column_names)
    if missing:
        raise ValueError(f"the selection query must return {sorted(missing)} too")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    n = selected.num_rows
    shards = [selected.slice(s, shard_size) for s in range(0, n, shard_size)]
    dim = rec.embedding_dim

    @task(name="anchors-embed-shard")
    def embed_shard(ws_root: str, rid: str, _pos: str, items: list[tuple[str, pa.Table]]) -> dict[str, int]:
        w = Workspace(ws_root)
        shard, tbl = items[0]
        rows = embed_rows(w, tbl.to_pylist(), fr_model, device=device, batch_size=batch_size)
        ShardWriter(w, "embeddings", rid).write(shard, rows)
        counts = {"embedded": sum(r["status"] == "ok" for r in rows), "not_embedded": sum(r["status"] != "ok"
                                                                                            for r in rows)}
        runs.mark_shard_done(w, rid, f"embed-{shard}", counts)
        return counts

    params = {"fr_model": fr_model, "model_id": model_id, "head": head_path, "mode": mode,
              "nnccs_floor": nnccs_floor, "query": sql, "shard_size": shard_size, "chunk_size": chunk_size,
              "center_block": center_block, "reuse_embeddings": bool(reuse_embeddings)}
    first = (runs.run_info(ws, run_id) or {}).get("parameters", params) if run_id else params
    first = {"reuse_embeddings": False, **first}  # runs recorded before the option existed did not reuse
    for k in ("model_id", "head", "mode", "nnccs_floor", "shard_size", "query", "reuse_embeddings"):
        if first.get(k) != params[k]:
            raise ValueError(f"run {run_id} was started with {k}={first.get(k)!r}; resuming with "
                             f"{params[k]!r} would mix results: start a new run instead")
    with runtime.tracked_run(ws, "anchors", params, run_id) as state:
        rid = state["run_id"]
        # 0. reuse: stage the stored embeddings of this model (once per run; redone if interrupted)
        if reuse_embeddings and n and not runs.shard_done(ws, rid, REUSE_STAGE):
            staged = _stage_reused(ws, rid, model_id, selected, shard_size)
            runs.mark_shard_done(ws, rid, REUSE_STAGE, {"reused": staged})
        # 1. embed the samples without a staged embedding (skipping committed shards)
        # (run_shards names shards by position, so each item carries its real shard name)
        pending = []
        for i, s in enumerate(shards):
            shard = runtime.shard_name(i)
            if runs.shard_done(ws, rid, f"embed-{shard}"):
                continue
            reused = _reused_path(ws, rid, shard)
            if reused.exists():
                s = s.filter(pc.invert(pc.is_in(s.column("sample_id"),
                                                value_set=pq.read_table(reused, columns=["sample_id"])
                                                .column("sample_id").combine_chunks())))
            if s.num_rows:
                pending.append([(shard, s)])
            else:
                runs.mark_shard_done(ws, rid, f"embed-{shard}", {"embedded": 0, "not_embedded": 0})
        if pending:
            outcomes = runtime.run_shards(embed_shard, pending, ws=ws, run_id=rid, desc="anchors: embed",
                                          progress=progress)
            runtime.check_shard_failures(outcomes, rid)
        # 2. centers: streamed over the embedding shards (current identities), or a classifier head
        if head_path is None:
            ident = np.unique(_identities(selected.select(["identity"])))
            labels = _Labels(ident[ident >= 0])
            acc = A.CenterAccumulator(max(dim, 1), len(labels.ids))
            for i, sel in enumerate(shards):
                tbl, emb, ok = _shard_embeddings(ws, rid, runtime.shard_name(i), sel, dim)
                acc.update(emb[ok], labels.dense(_identities(tbl))[ok])
            centers, counts, source = acc.centers(), acc.counts, A.CENTER_MEAN
        else:
            labels = _Labels(None)
            centers, counts, source = A.centers_from_head(head_path, rec.embedding_dim), None, A.CENTER_HEAD
        search = A.NearestNegativeSearch(centers, chunk_size=chunk_size, center_block=center_block, device=device)

        # 3. search: ccs, nnccs, nearest negative and raw per shard, persisted for the normalisation pass
        bar = runtime.Progress(len(shards), "anchors: search", progress)
        rng = A.RangeAccumulator()
        for i, sel in enumerate(shards):
            shard = runtime.shard_name(i)
            out = _stats_path(ws, rid, shard)
            if not (runs.shard_done(ws, rid, f"search-{shard}") and out.exists()):
                tbl, emb, ok = _shard_embeddings(ws, rid, shard, sel, dim)
                _search_shard(search, tbl, emb, ok, labels, counts, mode, nnccs_floor, out)
                runs.mark_shard_done(ws, rid, f"search-{shard}")
            st = pq.read_table(out, columns=["raw", "status"])
            rng.update(st.column("raw").to_numpy(zero_copy_only=False),
                       np.asarray(st.column("status").to_pylist()) == A.OK)
            bar.update()
        bar.close()
        lo, hi = rng.range() if rng.count else (float("nan"), float("nan"))

        # 4. normalise with the global min/max and write the anchors table
        writer = ShardWriter(ws, "anchors", rid)
        totals: dict[str, int] = {}
        reused_n = computed_n = 0
        for i in range(len(shards)):
            shard = runtime.shard_name(i)
            if _reused_path(ws, rid, shard).exists():
                reused_n += pq.read_metadata(_reused_path(ws, rid, shard)).num_rows
            emb_path = ShardWriter(ws, "embeddings", rid).path(shard)
            if emb_path.exists():
                computed_n += int(pc.sum(pc.equal(pq.read_table(emb_path, columns=["status"]).column("status"),
                                                  A.OK)).as_py() or 0)
            st = pq.read_table(_stats_path(ws, rid, shard))
            for s in st.column("status").to_pylist():
                totals[s] = totals.get(s, 0) + 1
            if runs.shard_done(ws, rid, f"anchors-{shard}"):
                continue
            writer.write(shard, _anchor_rows(st, lo, hi, model_id, source))
            runs.mark_shard_done(ws, rid, f"anchors-{shard}", {"anchors": st.num_rows})
        state["metrics"] = {"norm_min": lo, "norm_max": hi, "model_id": model_id, "center_source": source,
                            "mode": mode, "nnccs_floor": nnccs_floor, "range_rows": rng.count,
                            "status_counts": totals, "num_centers": int(len(centers))}
        state["counts"] = {"selected": n, "shards": len(shards), "embeddings_reused": reused_n,
                           "embeddings_computed": computed_n, **totals}
        return {"run_id": rid, **state["counts"], "metrics": state["metrics"]}


def _search_shard(search: A.NearestNegativeSearch, tbl: pa.Table, emb: np.ndarray | None, ok: np.ndarray | None,
                  labels: _Labels, counts: np.ndarray | None, mode: str, nnccs_floor: float, out: Path) -> None:
    """Nearest-negative search for one embeddings shard; writes the per-row stats file atomically."""
    n = tbl.num_rows
    ident = _identities(tbl)
    errors = tbl.column("error").to_pylist() if "error" in tbl.column_names else [None] * n
    if emb is None:
        emb, ok = np.zeros((n, search.dim), np.float32), np.zeros(n, dtype=bool)
    dense = labels.dense(ident)
    beyond = dense >= search.num_centers  # head centers: an identity without a classifier row
    with _LOCK:
        stats = A.anchor_stats(search, np.where(ok[:, None], emb, 0.0), np.where(beyond, -1, dense),
                               class_counts=counts, mode=mode, nnccs_floor=nnccs_floor)
    status = stats.status.astype(object)
    status[beyond & ok] = A.NO_CENTER
    status[~ok] = NO_EMBEDDING
    nn = labels.identity(stats.nearest_negative)
    err = [errors[i] if not ok[i] else None for i in range(n)]
    table = pa.table({
        "sample_id": tbl.column("sample_id"), "identity": pa.array(ident, pa.int64()),
        "ccs": pa.array(stats.ccs, pa.float32(), mask=~np.isfinite(stats.ccs)),
        "nnccs": pa.array(stats.nnccs, pa.float32(), mask=~np.isfinite(stats.nnccs)),
        "nearest_negative": pa.array(nn, pa.int64(), mask=nn < 0),
        "raw": pa.array(stats.raw, pa.float64(), mask=~np.isfinite(stats.raw)),
        "status": pa.array(status.astype(str)), "error": pa.array(err, pa.string()),
    }, schema=_STATS_SCHEMA)
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))


def _anchor_rows(st: pa.Table, lo: float, hi: float, model_id: str, source: str) -> list[dict[str, Any]]:
    raw = np.array([np.nan if v is None else v for v in st.column("raw").to_pylist()], dtype=np.float64)
    anchor = A.anchor_values(raw, np.asarray(st.column("status").to_pylist(), dtype=object), lo, hi)
    rows = []
    for i, r in enumerate(st.to_pylist()):
        ident = r["identity"]
        rows.append({
            "sample_id": r["sample_id"], "model_id": model_id, "identity": None if ident < 0 else ident,
            "ccs": r["ccs"], "nnccs": r["nnccs"], "nearest_negative": r["nearest_negative"], "raw": r["raw"],
            "anchor": None if not np.isfinite(anchor[i]) else float(anchor[i]),
            "norm_min": lo if np.isfinite(lo) else None, "norm_max": hi if np.isfinite(hi) else None,
            "center_source": source, "status": r["status"], "error": r["error"],
        })
    return rows


def anchors_flow(workspace: str | None = None, fr_model: str = DEFAULT_FR_MODEL, head: str | None = None,
                 mode: str = "ratio", nnccs_floor: float = A.DEFAULT_NNCCS_FLOOR, where: str | None = None,
                 query: str | None = None, device: str = "auto", batch_size: int = 64, shard_size: int = 8192,
                 chunk_size: int = A.DEFAULT_CHUNK, center_block: int = A.DEFAULT_CENTER_BLOCK,
                 run_id: str | None = None, runner: str = "threads", workers: int | None = 1,
                 progress: bool | None = None, reuse_embeddings: bool = False,
                 address: str | None = None) -> dict[str, Any]:
    """Run the `anchors` Prefect flow; returns the run id, status counts and the recorded metrics."""
    from prefect import flow

    _check_config(fr_model, head, mode, device, batch_size)
    task_runner = runtime.make_task_runner(runner, workers, address)
    f = flow(name="anchors")(_anchors_impl).with_options(task_runner=task_runner)
    return f(workspace, fr_model, head, mode, nnccs_floor, where, query, device, batch_size, shard_size,
             chunk_size, center_block, run_id, runner, workers, progress, reuse_embeddings)


def configure_parser(p: argparse.ArgumentParser) -> None:
    runtime.add_common_args(p)
    p.add_argument("--fr-model", default=DEFAULT_FR_MODEL,
                   help="recogniser spec: dlib | insightface[:PACK_OR_ONNX] | onnx:PATH?size=112&bgr=0&mean=127.5"
                        "&std=127.5 | iresnet50:PATH.pth | iresnet100:PATH.pth (default: insightface buffalo_l)")
    p.add_argument("--head", default=None,
                   help="classifier head checkpoint for classification-space centers (row k = identity k); "
                        "default: normalised mean embedding per identity")
    p.add_argument("--mode", choices=A.MODES, default="ratio",
                   help="raw = ccs/nnccs (ratio, the paper) or ccs/(nnccs+1+eps) (shifted, CR-FIQA Eq. 3)")
    p.add_argument("--nnccs-floor", type=float, default=A.DEFAULT_NNCCS_FLOOR,
                   help="ratio mode: rows with nnccs at or below this are 'clamped' (see docs/anchors.md)")
    p.add_argument("--where", default=None, help="SQL filter over the labels view, e.g. \"dataset = 'ms1mv2'\"")
    p.add_argument("--query", default=None,
                   help="SQL returning sample_id, identity, crop_file, crop_index (face_status, face_error optional)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (recogniser and search)")
    p.add_argument("--batch-size", type=int, default=64, help="recogniser batch size")
    p.add_argument("--shard-size", type=int, default=8192, help="samples per shard")
    p.add_argument("--chunk-size", type=int, default=A.DEFAULT_CHUNK, help="samples per search tile")
    p.add_argument("--center-block", type=int, default=A.DEFAULT_CENTER_BLOCK, help="centers per search tile")
    p.add_argument("--reuse-embeddings", action="store_true",
                   help="reuse the latest ok embeddings of this model stored by earlier runs; embed only the "
                        "selected samples without one (centers still use the current identities)")


def run_cli(args: argparse.Namespace) -> int:
    out = anchors_flow(workspace=args.workspace, fr_model=args.fr_model, head=args.head, mode=args.mode,
                       nnccs_floor=args.nnccs_floor, where=args.where, query=args.query, device=args.device,
                       batch_size=args.batch_size, shard_size=args.shard_size, chunk_size=args.chunk_size,
                       center_block=args.center_block, run_id=args.run_id, runner=args.runner,
                       workers=args.workers or 1, reuse_embeddings=args.reuse_embeddings,
                       address=args.address)
    print(json.dumps(out, indent=2, default=str))
    return 0


main = runtime.main_for("flows.anchors")

if __name__ == "__main__":
    raise SystemExit(main())
