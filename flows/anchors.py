"""`fiqa anchors`: embed aligned faces with a recognition model and compute CR-FIQA-style quality anchors.

Select (SQL, frozen with the run) -> shard -> embed (a task per shard -> `embeddings` table) -> the
streaming anchor steps of :class:`pipeline.anchors.StreamingAnchors` over the embedding shards:
centers (per-identity sums, or a classifier head), search (nearest negative center, raw ratio,
persisted per shard), normalise (global min/max -> `anchors` table). The min/max, model id, center
source and status counts are recorded in the run's metrics. Every selected sample gets an anchors
row. With `reuse_embeddings`, the stored embeddings of the same model are first copied into the
run's scratch folder shard by shard and only the samples without one are embedded. Centers and the
search always use the selection's current identity, never the one stored with an embedding.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import ShardWriter, Workspace, catalog, runs
from data_manifest.writer import atomic_write, shard_name
from flows import runtime
from flows.arguments import add_sql_limits
from pipeline import anchors as A

DEFAULT_FR_MODEL = "dlib"  # installed with the project; insightface needs its model pack on disk
SELECT_SQL = runtime.flow_sql("anchors_selection")
REUSE_SQL = runtime.flow_sql("anchors_reuse")
REQUIRED = ("sample_id", "identity", "crop_file", "crop_index")
_LOCK = threading.Lock()
NO_EMBEDDING = A.NO_EMBEDDING
REUSE_STAGE = "reuse"
_REUSED_SCHEMA = pa.schema([("sample_id", pa.string()), ("embedding", pa.list_(pa.float32()))])


def selection_sql(where: str | None = None, query: str | None = None) -> str:
    """SQL giving (sample_id, identity, crop_file, crop_index, face_status, face_error) of the labelled set."""
    return catalog.selection_sql(SELECT_SQL, where, query)


@dataclass(frozen=True)
class AnchorsOptions(runtime.RunOptions):
    """Everything one `anchors` run needs, validated once here."""

    fr_model: str = DEFAULT_FR_MODEL  # recogniser spec (models.recognition.build_recognizer)
    head: str | None = None  # classifier head checkpoint (classification-space centers); None: mean centers
    mode: str = "ratio"  # ratio (the paper) or shifted (CR-FIQA Eq. 3)
    nnccs_floor: float = A.DEFAULT_NNCCS_FLOOR
    where: str | None = None  # SQL condition over the labels view
    query: str | None = None  # or a full selection query
    device: str = "auto"
    batch_size: int = 64  # recogniser batch
    shard_size: int = 8192  # samples per shard
    chunk_size: int = A.DEFAULT_CHUNK  # samples per search tile
    center_block: int = A.DEFAULT_CENTER_BLOCK  # centers per search tile
    reuse_embeddings: bool = False  # reuse stored embeddings of the same model
    workers: int | None = 1  # one recogniser per process: shards take turns on it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in A.MODES:
            raise ValueError(f"unknown anchor mode {self.mode!r}; use one of {A.MODES}")
        for name in ("batch_size", "shard_size", "chunk_size", "center_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.head:
            head = Path(self.head).expanduser().resolve()
            if not head.is_file():
                raise FileNotFoundError(f"head checkpoint {head} does not exist")
            object.__setattr__(self, "head", str(head))
        self.selection_sql()  # --where with --query, or an empty --where, fails here

    def selection_sql(self) -> str:
        return selection_sql(self.where, self.query)


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


@task(name="anchors-embed-shard", cache_policy=NO_CACHE)
def embed_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, selection: str, fr_model: str,
                device: str, batch_size: int) -> dict[str, int]:
    """Embed one row group of the frozen selection (less any staged reused embeddings); write its `embeddings`."""
    ws = Workspace(ws_root)
    items = _still_to_embed(ws, run_id, shard, pq.ParquetFile(selection).read_row_group(row_group))
    rows = embed_rows(ws, items.to_pylist(), fr_model, device=device, batch_size=batch_size)
    ShardWriter(ws, "embeddings", run_id).write(shard, rows)
    return {"embedded": sum(r["status"] == "ok" for r in rows), "not_embedded": sum(r["status"] != "ok" for r in rows)}


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


def _stage_reused(ws: Workspace, run_id: str, model_id: str, selection: Path, shard_size: int) -> int:
    """Copy the latest ok stored embeddings of the model for the selection into per-shard scratch files.

    One streamed catalog query, grouped by selection shard, so memory holds one batch and the selection's
    sample ids; returns the count.
    """
    ids = pq.read_table(selection, columns=["sample_id"]).column("sample_id")
    shard_of = pa.array(np.arange(len(ids), dtype=np.int64) // shard_size)
    sel = pa.table({"sample_id": ids, "shard": shard_of}).group_by(["sample_id", "shard"]).aggregate([])
    folder = _reused_path(ws, run_id, "x").parent
    for stale in folder.glob("part-*.parquet"):  # an interrupted staging pass is redone from scratch
        stale.unlink()
    total, current, parts = 0, None, []

    def flush() -> None:
        if current is not None and parts:
            t = pa.Table.from_batches(parts).select(["sample_id", "embedding"]).cast(_REUSED_SCHEMA)
            atomic_write(_reused_path(ws, run_id, shard_name(current)), lambda tmp: pq.write_table(t, tmp))

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


def freeze_selection(ws: Workspace, run_id: str, sql: str, shard_size: int) -> Path:
    """The run's selection in runs/<run_id>/selection.parquet, one row group per shard, streamed from the query.

    Written once per run (a resume reads it back); a selection frozen in one row group by an earlier
    version is re-chunked in a streamed pass. Memory holds one shard of rows, whatever the selection size.
    """
    path = runtime.selection_path(ws, run_id)
    if path.exists():
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if all(n == shard_size for n in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= shard_size):
            return path
        batches = pq.ParquetFile(path).iter_batches(batch_size=shard_size)
        runtime.write_row_groups(path, pq.read_schema(path), batches, shard_size)
        return path
    return runtime.stream_selection(ws, path, sql, shard_size, what="the selection query", required=REQUIRED)


def selection_shards(path: Path) -> dict[str, int]:
    """Shard name -> row group of the frozen selection."""
    return {shard_name(i): i for i in range(pq.ParquetFile(path).num_row_groups)}


def _read_shard(path: Path, row_group: int) -> pa.Table:
    return pq.ParquetFile(path).read_row_group(row_group)


def _selected_identities(path: Path) -> np.ndarray:
    """The sorted distinct identities of the selection, one row group at a time (memory: the identities)."""
    f = pq.ParquetFile(path)
    seen = np.empty(0, dtype=np.int64)
    for i in range(f.num_row_groups):
        seen = np.union1d(seen, _identities(f.read_row_group(i, columns=["identity"])))
    return seen


def _identities(tbl: pa.Table) -> np.ndarray:
    ids = tbl.column("identity").to_numpy(zero_copy_only=False)
    return np.where(np.isnan(ids.astype(np.float64)), -1, ids).astype(np.int64)


def _stats_path(ws: Workspace, run_id: str, shard: str) -> Path:
    return ws.runs_dir / run_id / "anchor_stats" / f"part-{shard}.parquet"


def _still_to_embed(ws: Workspace, run_id: str, shard: str, sel: pa.Table) -> pa.Table:
    """The shard's samples without a staged reused embedding."""
    reused = _reused_path(ws, run_id, shard)
    if not reused.exists():
        return sel
    staged = pq.read_table(reused, columns=["sample_id"]).column("sample_id").combine_chunks()
    return sel.filter(pc.invert(pc.is_in(sel.column("sample_id"), value_set=staged)))


@flow(name="anchors")
def anchors_run(opts: AnchorsOptions) -> dict[str, Any]:
    """Select, shard, embed, then centers -> search -> normalise over the shards (see the module docstring)."""
    ws = Workspace(opts.workspace)
    rec = _recognizer(opts.fr_model, opts.device, opts.batch_size)
    model_id, dim = rec.model_id, rec.embedding_dim
    sql = opts.selection_sql()
    params = {"fr_model": opts.fr_model, "model_id": model_id, "head": opts.head, "mode": opts.mode,
              "nnccs_floor": opts.nnccs_floor, "query": sql, "shard_size": opts.shard_size,
              "reuse_embeddings": opts.reuse_embeddings}
    runtime.check_resume(ws, opts.run_id, params)
    with runtime.tracked_run(ws, "anchors", {**opts.recorded(), **params}, opts.run_id) as state:
        rid = state["run_id"]
        selection = freeze_selection(ws, rid, sql, opts.shard_size)
        shards = selection_shards(selection)
        # 0. reuse: stage the stored embeddings of this model (once per run; redone if interrupted)
        if opts.reuse_embeddings and shards and not runs.shard_done(ws, rid, REUSE_STAGE):
            staged = _stage_reused(ws, rid, model_id, selection, opts.shard_size)
            runs.mark_shard_done(ws, rid, REUSE_STAGE, {"reused": staged})
        # 1. embed the samples without a staged embedding (each task reads its own row group)
        outcomes = runtime.run_shards(embed_shard, shards, ws=ws, run_id=rid, stage="embed", desc="anchors: embed",
                                      progress=opts.progress, selection=str(selection), fr_model=opts.fr_model,
                                      device=opts.device, batch_size=opts.batch_size)
        runtime.check_shard_failures(outcomes, rid)
        # 2. centers: streamed over the embedding shards (current identities), or a classifier head
        steps = A.StreamingAnchors(
            dim, identities=None if opts.head else _selected_identities(selection),
            head=A.centers_from_head(opts.head, dim) if opts.head else None, mode=opts.mode,
            nnccs_floor=opts.nnccs_floor, chunk_size=opts.chunk_size, center_block=opts.center_block,
            device=opts.device)
        if not opts.head:
            for name, group in shards.items():
                tbl, emb, ok = _shard_embeddings(ws, rid, name, _read_shard(selection, group), dim)
                steps.add(emb, _identities(tbl), ok)
                del tbl, emb, ok
        # 3. search: ccs, nnccs, nearest negative and raw per shard, persisted for the normalisation pass
        bar = runtime.Progress(len(shards), "anchors: search", opts.progress)
        for name, group in shards.items():
            out = _stats_path(ws, rid, name)
            if not (runs.shard_done(ws, rid, f"search-{name}") and out.exists()):
                tbl, emb, ok = _shard_embeddings(ws, rid, name, _read_shard(selection, group), dim)
                with _LOCK:
                    stats = steps.search(emb, _identities(tbl), ok)
                table = A.stats_table(tbl.column("sample_id"), _identities(tbl), stats,
                                      tbl.column("error").to_pylist())
                atomic_write(out, lambda tmp, t=table: pq.write_table(t, tmp))
                runs.mark_shard_done(ws, rid, f"search-{name}")
                del tbl, emb, ok, stats, table
            st = pq.read_table(out, columns=["raw", "status"])
            steps.observe(st.column("raw").to_numpy(zero_copy_only=False),
                          st.column("status").to_numpy(zero_copy_only=False))
            bar.update()
        bar.close()
        lo, hi = steps.norm_range()
        # 4. normalise with the global min/max and write the anchors table
        writer = ShardWriter(ws, "anchors", rid)
        totals: dict[str, int] = {}
        reused_n = computed_n = selected_n = 0
        for name in shards:
            if _reused_path(ws, rid, name).exists():
                reused_n += pq.read_metadata(_reused_path(ws, rid, name)).num_rows
            emb_path = ShardWriter(ws, "embeddings", rid).path(name)
            if emb_path.exists():
                computed_n += int(pc.sum(pc.equal(pq.read_table(emb_path, columns=["status"]).column("status"),
                                                  A.OK)).as_py() or 0)
            st = pq.read_table(_stats_path(ws, rid, name))
            selected_n += st.num_rows
            for s in st.column("status").value_counts().to_pylist():
                totals[s["values"]] = totals.get(s["values"], 0) + s["counts"]
            if runs.shard_done(ws, rid, f"anchors-{name}"):
                continue
            writer.write(name, A.anchor_table(st, lo, hi, model_id, steps.source))
            runs.mark_shard_done(ws, rid, f"anchors-{name}", {"anchors": st.num_rows})
        state["metrics"] = {"norm_min": lo, "norm_max": hi, "model_id": model_id, "center_source": steps.source,
                            "mode": opts.mode, "nnccs_floor": opts.nnccs_floor, "range_rows": steps.range.count,
                            "status_counts": totals, "num_centers": steps.num_centers}
        state["counts"] = {"selected": selected_n, "shards": len(shards), "embeddings_reused": reused_n,
                           "embeddings_computed": computed_n, **totals}
        return {"run_id": rid, **state["counts"], "metrics": state["metrics"]}


def run(opts: AnchorsOptions) -> dict[str, Any]:
    """Build the recogniser (a bad spec fails before Prefect starts), then run the flow on its task runner."""
    _recognizer(opts.fr_model, opts.device, opts.batch_size)
    return runtime.with_runner(anchors_run, opts)(opts)


def anchors_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `anchors` flow from keyword options (the fields of AnchorsOptions)."""
    return run(AnchorsOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    runtime.add_common_args(p)
    p.add_argument("--fr-model", default=DEFAULT_FR_MODEL,
                   help="recogniser spec: dlib | insightface[:PACK_OR_ONNX] | onnx:PATH?size=112&bgr=0&mean=127.5"
                        "&std=127.5 | iresnet50:PATH.pth | iresnet100:PATH.pth (default: dlib, no download)")
    p.add_argument("--head", default=None,
                   help="classifier head checkpoint for classification-space centers (row k = identity k); "
                        "default: normalised mean embedding per identity")
    p.add_argument("--mode", choices=A.MODES, default="ratio",
                   help="raw = ccs/nnccs (ratio, the paper) or ccs/(nnccs+1+eps) (shifted, CR-FIQA Eq. 3)")
    p.add_argument("--nnccs-floor", type=float, default=A.DEFAULT_NNCCS_FLOOR,
                   help="ratio mode: rows with nnccs at or below this are 'clamped' (see docs/anchors.md)")
    p.add_argument("--where", default=None, help="SQL filter over the labels view, e.g. \"dataset = 'ms1mv2'\"")
    add_sql_limits(p)
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
    out = run(runtime.options_from_args(AnchorsOptions, args, workers=args.workers or 1))
    print(json.dumps(out, indent=2, default=str))
    return 0


main = runtime.main_for("flows.anchors")

if __name__ == "__main__":
    raise SystemExit(main())
