"""`fiqa anchors`: embed aligned faces with a recognition model and compute CR-FIQA-style quality anchors.

Select (SQL, frozen with the run) -> embed shard by shard (`embeddings`) -> the streaming steps of
pipeline.anchors: centres (per-shard sums on the runner's workers, merged here), nearest-negative search
(per shard on the workers), global min/max normalisation (`anchors`, here). Every
selected sample gets a row; `--reuse-embeddings` embeds only the samples without a stored embedding of
the same model. See docs/anchors.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import Workspace, catalog, commits, selection
from flows import command, runners, runtime
from flows.arguments import add_sql_limits
from pipeline import anchors as A
from pipeline import anchors_embed as E
from pipeline import anchors_passes as P
from pipeline.anchors_inputs import selected_identities
from pipeline.anchors_reuse import stage_reused

DEFAULT_FR_MODEL = "dlib"  # installed with the project; insightface needs its model pack on disk
SELECT_SQL = catalog.bundled_sql("flows/anchors_selection")
REQUIRED = ("sample_id", "identity", "crop_file", "crop_index")
REUSE_STAGE = "reuse"


def selection_sql(where: str | None = None, query: str | None = None) -> str:
    """SQL giving (sample_id, identity, crop_file, crop_index, face_status, face_error) of the labelled set."""
    return catalog.selection_sql(SELECT_SQL, where, query)


@dataclass(frozen=True)
class AnchorsOptions(command.RunOptions):
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

    AT_LEAST_ONE = ("batch_size", "shard_size", "chunk_size", "center_block")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in A.MODES:
            raise ValueError(f"unknown anchor mode {self.mode!r}; use one of {A.MODES}")
        if self.head:
            head = Path(self.head).expanduser().resolve()
            if not head.is_file():
                raise FileNotFoundError(f"head checkpoint {head} does not exist")
            object.__setattr__(self, "head", str(head))
        self.selection_sql()  # --where with --query, or an empty --where, fails here

    def selection_sql(self) -> str:
        return selection_sql(self.where, self.query)

    def check(self) -> None:
        """Build the recogniser: a bad spec fails before any work."""
        E.recognizer(self.fr_model, self.device, self.batch_size)


@task(name="anchors-embed-shard", cache_policy=NO_CACHE)
@commits.receipted
def embed_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, selection_file: str, fr_model: str,
                device: str, batch_size: int) -> dict[str, int]:
    """Embed one row group of the frozen selection (less any staged reused embeddings); write its `embeddings`."""
    return E.embed_shard(Workspace(ws_root), run_id, shard, selection.task_shard(ws_root, selection_file, row_group),
                         spec=fr_model, device=device, batch_size=batch_size)


@task(name="anchors-centers-shard", cache_policy=NO_CACHE)
@commits.receipted
def centers_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, selection_file: str,
                  dim: int) -> dict[str, int]:
    """Sum one row group's embeddings per identity (the centers' part of that shard)."""
    return P.center_sums(Workspace(ws_root), run_id, shard, selection.task_shard(ws_root, selection_file, row_group),
                         dim)


@task(name="anchors-search-shard", cache_policy=NO_CACHE)
@commits.receipted
def search_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, selection_file: str, state_file: str,
                 dim: int, **options: Any) -> dict[str, int]:
    """Search one row group's nearest negative centers against the merged centers; persist its stats."""
    ws = Workspace(ws_root)
    return P.search_shard(ws, run_id, shard, selection.task_shard(ws_root, selection_file, row_group), dim,
                          ws.local(state_file), **options)


@flow(name="anchors")
def anchors_run(opts: AnchorsOptions) -> dict[str, Any]:
    """Select, shard, embed, then centers -> search -> normalise over the shards (see the module docstring)."""
    ws = Workspace(opts.workspace)
    rec = E.recognizer(opts.fr_model, opts.device, opts.batch_size)
    model_id, dim = rec.model_id, rec.embedding_dim
    sql = opts.selection_sql()
    params = {"fr_model": opts.fr_model, "model_id": model_id, "head": opts.head, "mode": opts.mode,
              "nnccs_floor": opts.nnccs_floor, "query": sql, "shard_size": opts.shard_size,
              "reuse_embeddings": opts.reuse_embeddings}
    with runtime.tracked_run(ws, "anchors", {**opts.recorded(), **params}, opts.run_id, decisive=params) as state:
        rid = state["run_id"]
        frozen = selection.freeze_selection(ws, rid, sql, opts.shard_size, required=REQUIRED)
        shards = selection.selection_shards(frozen)
        names = list(shards)
        # 0. reuse: stage the stored embeddings of this model (once per run; redone if interrupted)
        if opts.reuse_embeddings and shards:
            runtime.run_steps(lambda *_: {"reused": stage_reused(ws, rid, model_id, frozen, opts.shard_size)},
                              {REUSE_STAGE: None}, ws=ws, run_id=rid)
        # 1. embed the samples without a staged embedding (each task reads its own row group)
        shared = {"ws": ws, "run_id": rid, "progress": opts.progress, "selection_file": ws.share(frozen)}
        outcomes = runtime.run_shards(embed_shard, shards, stage="embed", desc="anchors: embed",
                                      fr_model=opts.fr_model, device=opts.device, batch_size=opts.batch_size,
                                      **shared)
        runtime.check_shard_failures(outcomes, rid)
        # 2. centers: per-identity sums of each shard (current identities), merged here in shard order; or a
        #    classifier head
        steps = A.StreamingAnchors(
            dim, identities=None if opts.head else selected_identities(frozen),
            head=A.centers_from_head(opts.head, dim) if opts.head else None, mode=opts.mode,
            nnccs_floor=opts.nnccs_floor, chunk_size=opts.chunk_size, center_block=opts.center_block,
            device=opts.device)
        if not opts.head:
            outcomes = runtime.run_shards(centers_shard, shards, stage="centers", desc="anchors: centres", dim=dim,
                                          **shared)
            runtime.check_shard_failures(outcomes, rid)
            P.merge_centers(steps, ws, rid, names)
        # 3. search: ccs, nnccs, nearest negative and raw per shard, persisted for the normalisation pass
        searched = ws.share(P.save_state(steps, ws, rid))
        outcomes = runtime.run_shards(search_shard, shards, stage="search", desc="anchors: search", dim=dim,
                                      state_file=searched, mode=opts.mode, nnccs_floor=opts.nnccs_floor,
                                      chunk_size=opts.chunk_size, center_block=opts.center_block,
                                      device=opts.device, **shared)
        runtime.check_shard_failures(outcomes, rid)
        lo, hi = P.norm_range(steps, ws, rid, names)
        # 4. normalise with the global min/max and write the anchors table
        runtime.run_steps(lambda name, _: P.write_anchors(ws, rid, name, lo, hi, model_id, steps.source), shards,
                          ws=ws, run_id=rid, stage="anchors")
        tally = P.tally(ws, rid, names)
        totals = tally.pop("status_counts")
        state["metrics"] = {"norm_min": lo, "norm_max": hi, "model_id": model_id, "center_source": steps.source,
                            "mode": opts.mode, "nnccs_floor": opts.nnccs_floor, "range_rows": steps.range.count,
                            "status_counts": totals, "num_centers": steps.num_centers}
        state["counts"] = {"selected": tally["selected"], "shards": len(shards),
                           "embeddings_reused": tally["embeddings_reused"],
                           "embeddings_computed": tally["embeddings_computed"], **totals}
        return {"run_id": rid, **state["counts"], "metrics": state["metrics"]}


def run(opts: AnchorsOptions) -> dict[str, Any]:
    """Build the recogniser (a bad spec fails before Prefect starts), then run the flow on its task runner."""
    opts.check()
    return runners.with_runner(anchors_run, opts)(opts)


def anchors_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `anchors` flow from keyword options (the fields of AnchorsOptions)."""
    return run(AnchorsOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    command.add_common_args(p)
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
    out = run(command.options_from_args(AnchorsOptions, args, workers=args.workers or 1))
    print(json.dumps(out, indent=2, default=str))
    return 0


main = command.main_for("flows.anchors")

if __name__ == "__main__":
    raise SystemExit(main())
