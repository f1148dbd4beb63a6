"""`fiqa label`: align faces and label factors (blur, pose, attributes) over `samples`, shard by shard, resumably.

Stages come by name from the registry (`--stages align,blur,pose,attributes`); the selection (all samples,
or a SQL `--where` on the `labels` view) is frozen with the run, and `--run-id` resumes from the committed
shards without duplicating a row. Bad or faceless images become rows with a status and a reason.
See docs/labelling.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import Workspace, catalog, commits, runs, selection
from data_manifest.vocabulary import BLUR_THRESHOLDS, ordered_thresholds, parse_blur_thresholds
from flows import command, runners, runtime
from flows.arguments import add_sql_limits
from pipeline.labellers import batch
from pipeline.labellers.registry import (
    DEFAULT_STAGES,
    POSE_WITHHOLD,
    STAGES,
    LabelOptions,
    get_stage,
    options_from,
    parse_stages,
)

SELECT_SQL = catalog.bundled_sql("flows/label_selection")


def selection_sql(where: str | None) -> str:
    """The selection query; `where` is a SQL condition on the catalog's `labels` view columns."""
    return catalog.selection_sql(SELECT_SQL, where)


@task(name="label-shard", cache_policy=NO_CACHE)
@commits.receipted
def label_shard(ws_root: str, run_id: str, shard: str, row_group: int, *, pool: Any, selection_file: str,
                stages: list[str], options: LabelOptions) -> dict[str, Any]:
    """Label one row group of the frozen selection and write its rows, in the compute pool when there is one."""
    return runners.offload(pool, batch.label_selected, ws_root, run_id, shard, row_group,
                           selection_file=selection_file, stages=stages, options=options)


@dataclass(frozen=True)
class LabelRunOptions(command.RunOptions):
    """Everything one `label` / `relabel` run needs, validated once here."""

    stages: tuple[str, ...] = DEFAULT_STAGES  # registered stage names, in run order
    where: str | None = None  # SQL condition on the `labels` view; None: every sample
    shard_size: int = 1000  # samples per shard
    options: LabelOptions = field(default_factory=LabelOptions)  # labeller settings

    AT_LEAST_ONE = ("shard_size",)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "stages", tuple(parse_stages(self.stages)))
        object.__setattr__(self, "options", options_from(self.options))
        if self.where is not None and not self.where.strip():
            raise ValueError("--where is empty")

    def run_params(self) -> dict[str, Any]:
        """The parameters a label run records (and a resume must match)."""
        return {"stages": list(self.stages), "where": self.where, "shard_size": self.shard_size,
                "options": self.options.to_params()}

    def check(self) -> None:
        """Build every stage: a bad configuration (missing weights, checkpoint) fails before any work."""
        for name in self.stages:
            get_stage(name, self.options)


def run_label(opts: LabelRunOptions, flow_name: str = "label") -> dict[str, Any]:
    """The label run (inside the label or relabel flow): freeze the selection, label every shard, record timings."""
    ws = Workspace(opts.workspace)
    names, params = list(opts.stages), opts.run_params()
    t0 = time.perf_counter()
    with (runners.compute_pool(opts, warm_up(opts)) as pool,
          runtime.tracked_run(ws, flow_name, params, opts.run_id, decisive=params) as state):
        rid = state["run_id"]
        what = "the label selection" if opts.where is None else f"--where {opts.where!r}"
        frozen = selection.freeze_selection(ws, rid, selection_sql(opts.where), opts.shard_size, what=what,
                                            schema=batch.SELECTION_SCHEMA)
        outcomes = runtime.run_shards(label_shard, selection.selection_shards(frozen), ws=ws, run_id=rid,
                                      desc=f"{flow_name} {','.join(names)}", progress=opts.progress,
                                      pool=pool, selection_file=ws.share(frozen), stages=names,
                                      options=opts.options)
        summary = runtime.summarize(outcomes)
        totals = runs.shard_counts(ws, rid)
        state["metrics"] = batch.run_metrics(totals, time.perf_counter() - t0, summary)
        state["counts"] = totals
        runtime.check_shard_failures(outcomes, rid)
    return {"run_id": rid, "stages": names, "selected": selection.selected_rows(frozen),
            "shards": summary["shards"], "skipped_shards": summary["skipped_shards"], "counts": totals,
            **state["metrics"]}


@flow(name="label")
def label_run(opts: LabelRunOptions) -> dict[str, Any]:
    """Align and label the selected samples (see the module docstring)."""
    return run_label(opts, "label")


def warm_up(opts: LabelRunOptions) -> tuple[Any, tuple[Any, ...]]:
    """What each compute-pool worker runs when it starts: build the run's stages (load their models) once."""
    return batch.warm_stages, (list(opts.stages), opts.options)


def run(opts: LabelRunOptions, flow_obj: Any = label_run) -> dict[str, Any]:
    """Start the pool workers (`--runner processes`; they load the models meanwhile), build the stages once (in a
    pool worker, else here: a bad configuration fails before any flow run starts) while Prefect's temporary
    server starts, then run the flow on the task runner the options ask for."""
    with runners.prestarted(opts, warm_up(opts)) as pool:
        with runners.api_starting():  # Prefect's temporary server starts meanwhile
            runners.offload(pool, opts.check)  # in a pool worker (warm by then): no model loads in this process
        return runners.with_runner(flow_obj, opts, pooled=True)(opts)


def label(**kwargs: Any) -> dict[str, Any]:
    """Run the `label` flow from keyword options (the fields of LabelRunOptions; `options` may be a dict)."""
    return run(LabelRunOptions(**kwargs))


def _pair(text: str) -> tuple[float, float]:
    """`--pose-thresholds LOW,HIGH`: two ordered numbers (`vocabulary.ordered_thresholds`), as an argparse type."""
    try:
        return ordered_thresholds(text.split(","), "pose")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected two ordered numbers 'LOW,HIGH', got {text!r} ({e})") from None


def configure_parser(p: argparse.ArgumentParser, *, stages_default: str = ",".join(DEFAULT_STAGES),
                     where: bool = True) -> None:
    """Options of `fiqa label` (relabel adds its own required --where and another stages default)."""
    p.add_argument("--stages", default=stages_default,
                   help=f"comma-separated stages to run (registered: {', '.join(STAGES)}; default: %(default)s)")
    if where:
        p.add_argument("--where", default=None,
                       help="SQL condition on the catalog's `labels` view choosing the samples, e.g. "
                            "\"dataset = 'lfw'\"")
    add_sql_limits(p)
    p.add_argument("--detector", choices=("auto", "mtcnn", "scrfd", "none"), default="auto",
                   help="face detector (auto: SCRFD when the insightface pack is present, else MTCNN; "
                        "none: with --aligned, measure no 5 landmarks)")
    p.add_argument("--pack", default="buffalo_l", help="insightface model pack name or directory")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are already aligned 112x112 faces (MS1MV2-style): no detection for alignment")
    p.add_argument("--min-face-size", type=float, default=None,
                   help="MTCNN smallest face in pixels (default: 20; 40 with --aligned)")
    p.add_argument("--pose-backend", choices=("dlib", "insightface", "landmarks5", "auto"), default="dlib",
                   help="yaw estimator (default: dlib 68 landmarks + solvePnP, as the authors)")
    p.add_argument("--pose-thresholds", type=_pair, default=(10.0, 25.0), help="|yaw| degrees LOW,HIGH")
    p.add_argument("--pose-withhold", choices=POSE_WITHHOLD, default="obstructed",
                   help="pose classes the dlib backend withholds when unsure: obstructed (default: ambiguous yaws, "
                        "and a wider check on faces the occlusion labeller calls obstructed), ambiguous (the "
                        "first only) or none (every face gets a class, as the paper)")
    p.add_argument("--blur-thresholds", type=parse_blur_thresholds, default=BLUR_THRESHOLDS,
                   help="CPBD hazy-below,clear-above: 'calibrated' (default, fitted on real faces), 'paper' "
                        "(0.35,0.7) or LOW,HIGH")
    p.add_argument("--attributes-checkpoint", default=None,
                   help="the attributes stage runs this WIDER-trained attribute CNN instead of the real-face "
                        "labellers (occlusion, FER expression, analytic lighting)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_common_args(p)


def labeller_options(args: argparse.Namespace) -> LabelOptions:
    """The labeller settings (LabelOptions) from parsed CLI arguments."""
    mode = "already_aligned" if args.aligned else "detect"
    return LabelOptions(detector=args.detector, pack=args.pack, align_mode=mode,
                        min_face_size=args.min_face_size, pose_backend=args.pose_backend,
                        pose_thresholds=args.pose_thresholds, pose_withhold=args.pose_withhold,
                        blur_thresholds=args.blur_thresholds,
                        attributes_checkpoint=args.attributes_checkpoint, device=args.device)


def run_options(args: argparse.Namespace) -> LabelRunOptions:
    """The run's options from parsed CLI arguments (label and relabel)."""
    return command.options_from_args(LabelRunOptions, args, stages=args.stages, options=labeller_options(args),
                                     progress=False if args.no_progress else None)


def run_cli(args: argparse.Namespace) -> int:
    result = run(run_options(args))
    counts = result["counts"]
    totals = ("samples", "faces_rows", "factors_rows", "stages_built")
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                         if not k.startswith("seconds_") and k not in totals)
    print(f"run {result['run_id']}: {result['selected']} samples, stages {','.join(result['stages'])}; "
          f"{counts.get('faces_rows', 0)} faces rows, {counts.get('factors_rows', 0)} factors rows ({statuses}); "
          f"{result['skipped_shards']} of {result['shards']} shards already committed; "
          f"{result['images_per_s']} images/s")
    print(json.dumps({"stage_seconds": result["stage_seconds"], "stage_images_per_s": result["stage_images_per_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(command.main_for("flows.label")())
