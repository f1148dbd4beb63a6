"""`fiqa demo` (what `make demo` runs): the whole pipeline on a dataset built from package-shipped faces.

Builds the demo dataset (pipeline/synthetic/demo_data.py), runs ingest -> label -> anchors -> train (tiny
config, CPU) -> score -> evaluate, and prints a summary: counts, factor distributions, each label against
its known degradation, anchors and scores by degradation level, the EDC table (pipeline/demo/). Nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

from data_manifest import Workspace, catalog
from flows import command
from pipeline.demo.checks import correlations, demo_rows, label_validity, labellers
from pipeline.demo.edc_inputs import comparisons, quality_files
from pipeline.demo.summary import print_summary
from pipeline.progress import timed_step
from pipeline.synthetic.demo_data import DATASET, IN_DEMO, build_or_read


def run_demo(workspace: str | None = None, quick: bool = False, train_steps_epochs: int | None = None,
             attributes_checkpoint: str | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline on the demo dataset; returns the summary.

    `attributes_checkpoint`: label occlusion/expression/lighting with this WIDER-trained attribute CNN
    instead of the real-face labellers.
    """
    from flows.anchors import anchors_flow
    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from flows.label import label
    from flows.score import score_flow
    from flows.train import train_flow

    ws = Workspace(workspace)
    timings: dict[str, float] = {}
    step = functools.partial(timed_step, timings=timings, prefix="[demo] ")
    data_root = ws.root / "demo_data"
    t0 = time.perf_counter()
    with step("build demo dataset"):
        variants = build_or_read(data_root, quick)
    with step("ingest"):
        ingest(path=str(data_root), dataset=DATASET, workspace=ws.location, shard_size=32, progress=False)
    options = {"detector": "mtcnn", "pose_backend": "dlib", "attributes_checkpoint": attributes_checkpoint}
    with step("label align,blur,pose,attributes"):
        label(stages=["align", "blur", "pose", "attributes"], where=IN_DEMO, options=options,
              workspace=ws.location, shard_size=32, progress=False)
    with step("anchors (dlib ResNet)"):
        anchors = anchors_flow(workspace=ws.location, fr_model="dlib", where=IN_DEMO, shard_size=64, progress=False)
    epochs = train_steps_epochs or (2 if quick else 8)
    with step("train CLIB-FIQA (tiny, CPU)"):
        trained = train_flow(workspace=ws.location, model_config="clib-tiny", where=IN_DEMO,
                             train_config={"stage1_epochs": epochs, "stage2_epochs": epochs, "batch_size": 32,
                                           "lr": 1e-3, "num_workers": 0, "device": "cpu"})
    with step("score"):
        score_flow(workspace=ws.location, checkpoint=str(trained["checkpoint"]), where=IN_DEMO, device="cpu")
    reports = ws.reports / "demo"
    reports.mkdir(parents=True, exist_ok=True)
    with step("evaluate (EDC)"):
        model_id = catalog.query(ws, "SELECT model_id FROM embeddings WHERE status = 'ok' LIMIT 1").column(0)[0].as_py()
        pairs = comparisons(ws, model_id, reports / "demo_pairs.parquet")
        ev = evaluate(benchmarks=[f"demo={pairs}"], qualities=quality_files(ws, reports), workspace=ws.location,
                      fmrs=[1e-2], starting_errors=[0.1], protocols=["edc"], output=str(reports / "evaluation"))
    timings["total"] = round(time.perf_counter() - t0, 1)
    rows = demo_rows(ws, data_root)
    summary = {
        "workspace": ws.location,
        "variants": len(variants),
        "timings_s": timings,
        "anchor_run": anchors.get("run_id"),
        "checkpoint": str(trained["checkpoint"]),
        "evaluation": {"output": ev["output"], "plots": ev["plots"], "rows": ev["rows"]},
        "labellers": labellers(ws),
        "label_validity": label_validity(rows),
        "correlations": correlations(rows),
    }
    from data_manifest.gallery import write_gallery
    from flows.gallery import publish_gallery

    summary["gallery"] = str(write_gallery(ws))  # after "total": the page shows the finished run
    publish_gallery(Path(summary["gallery"]))
    (reports / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    ws.push()  # a workspace on object storage: the reports and the gallery committed with the runs' files
    return summary


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=None, help="workspace directory (default: $FIQA_WORKSPACE or ./workspace)")
    p.add_argument("--quick", action="store_true", help="fewer identities, levels and epochs")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training stage (default 8, quick 2)")
    p.add_argument("--attributes-checkpoint", default=None,
                   help="label occlusion/expression/lighting with this WIDER-trained attribute CNN "
                        "(default: the real-face labellers)")


def run_cli(args: argparse.Namespace) -> int:
    from prefect import flow

    demo = flow(name="demo", log_prints=False)(run_demo)
    summary = demo(workspace=args.workspace, quick=args.quick, train_steps_epochs=args.epochs,
                   attributes_checkpoint=args.attributes_checkpoint)
    print_summary(Workspace(args.workspace), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(command.main_for("flows.demo")())
