"""`fiqa train-attributes`: train the occlusion / expression / lighting CNN on WIDER FACE.

WIDER annotations -> crop shards with ground-truth rows in a data workspace of their own (default
<workspace>/wider_face) -> training and validation (pipeline.attribute_training) -> checkpoint, report
and Prefect artifacts. The same --run-id skips committed crop shards. See docs/attributes.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import Workspace, catalog, commits
from data_manifest.writer import shard_name
from flows import command, runners, runtime
from flows.bookkeeping import publish_artifacts
from pipeline.attribute_training.crops import (
    DETECTOR_CHOICES,
    crop_counts,
    parse_splits,
    resolve_detector,
    resolve_splits,
    write_crop_shard,
)
from pipeline.attribute_training.report import metrics_table, write_report
from pipeline.attribute_training.train import train_and_evaluate

DATA_WORKSPACE = "wider_face"  # default data workspace, inside the main workspace
DEFAULT_MODEL_CONFIG = "mobilefacenet"
TRAIN_OPTIONS: tuple[tuple[str, type], ...] = (
    ("epochs", int), ("batch-size", int), ("lr", float), ("weight-decay", float), ("warmup-epochs", float),
    ("imbalance", str), ("num-workers", int), ("seed", int),
)


@dataclass(frozen=True)
class TrainAttributesOptions(command.RunOptions):
    """Everything one `train-attributes` run needs, validated once here (paths checked when the run starts)."""

    wider_root: str | None = None  # the WIDER FACE release layout
    train_annotations: str | None = None  # explicit paths override the root
    train_images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    data_workspace: str | None = None  # default: <workspace>/wider_face
    model_config: str = DEFAULT_MODEL_CONFIG  # bundled attribute-net config or a JSON file
    train_config: dict[str, Any] = field(default_factory=dict)  # models.attributes_train.TrainConfig overrides
    min_size: int = 20  # skip faces whose shorter box side is below this (pixels)
    margin: float = 0.15  # box-crop margin per side
    detector: str = "auto"  # landmark detector for aligned crops
    shard_images: int = 500  # images per crop shard
    max_images: int | None = None  # at most this many images per split
    calibration_fraction: float = 0.1  # train images held out to choose the thresholds
    device: str = "auto"  # training device
    crop_device: str = "cpu"  # detector device while cropping
    torch_threads: int | None = None

    AT_LEAST_ONE = ("shard_images", "min_size", "max_images")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.detector not in DETECTOR_CHOICES:
            raise ValueError(f"unknown detector {self.detector!r}; choose one of {DETECTOR_CHOICES}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ValueError(f"calibration fraction must be in [0, 1), got {self.calibration_fraction}")
        if not 0.0 <= self.margin < 2.0:
            raise ValueError(f"margin must be in [0, 2), got {self.margin}")
        object.__setattr__(self, "train_config", dict(self.train_config or {}))

    def check(self) -> None:
        """Fail on a bad model or training config before any work (or Prefect) starts."""
        from models.attributes import load_config
        from models.attributes_train import TrainConfig

        load_config(self.model_config)
        TrainConfig.from_dict(self.train_config)


@task(name="wider-crops", cache_policy=NO_CACHE)
@commits.receipted
def extract_shard(ws_root: str, run_id: str, shard: str, items: list[tuple[str, Any]], **kwargs: Any
                  ) -> dict[str, int]:
    """One shard of WIDER crops and rows (:func:`pipeline.attribute_training.crops.write_crop_shard`) as a task."""
    return write_crop_shard(Workspace(ws_root), run_id, shard, items, **kwargs)


@task(name="train-attributes-model", cache_policy=NO_CACHE)
def train_task(ws_root: str, data_root: str, run_id: str, model_config: str, train_config: dict[str, Any],
               **kwargs: Any) -> dict[str, Any]:
    """Training and validation (:func:`pipeline.attribute_training.train.train_and_evaluate`) as a task."""
    return train_and_evaluate(Workspace(ws_root), Workspace(data_root), run_id, model_config, train_config, **kwargs)


@flow(name="train_attributes", log_prints=True)
def train_attributes_run(opts: TrainAttributesOptions) -> dict[str, Any]:
    """Read WIDER, shard, crop (tasks), train, evaluate on val, write the checkpoint and report."""
    splits = resolve_splits(opts.wider_root, opts.train_annotations, opts.train_images, opts.val_annotations,
                            opts.val_images)
    det_kind, det_note = resolve_detector(opts.detector, opts.crop_device)
    ws = Workspace(opts.workspace)
    # beside the workspace: a folder of it, or on object storage a prefix of it (the crop tasks' workers open it)
    data_ws = Workspace(opts.data_workspace or (f"{ws.location}/{DATA_WORKSPACE}" if ws.store else
                                                ws.root / DATA_WORKSPACE))
    params = {**opts.recorded(), "splits": {s: [str(a), str(b)] for s, (a, b) in splits.items()}}
    decisive = {k: params[k] for k in ("splits", "min_size", "margin", "detector", "shard_images", "max_images")}
    with runtime.tracked_run(ws, "train_attributes", params, opts.run_id, decisive=decisive) as state:
        rid = state["run_id"]
        parsed, data = parse_splits(splits, opts.min_size, opts.max_images)
        shards = {shard_name(i, split): [(split, r) for r in chunk]
                  for split in splits for i, chunk in enumerate(runtime.chunks(parsed[split], opts.shard_images))}
        outcomes = runtime.run_shards(extract_shard, shards, ws=data_ws, run_id=rid, desc="wider crops",
                                      progress=opts.progress, images_dirs={s: str(p[1]) for s, p in splits.items()},
                                      detector=det_kind, device=opts.crop_device, margin=opts.margin)
        runtime.check_shard_failures(outcomes, rid)
        per_split = crop_counts(data_ws, rid)
        for split in splits:
            data[split].update(per_split.get(split, {}))
        trained = train_task(ws.location, data_ws.location, rid, opts.model_config, opts.train_config,
                             calibration_fraction=opts.calibration_fraction, device=opts.device,
                             torch_threads=opts.torch_threads)
        files = write_report(ws.reports / rid, rid, trained, data,
                             notes={"landmark detector": det_note, "crops and manifests": data_ws.location})
        publish_artifacts("attribute CNN training report", markdown={"attributes-report": files["report"].read_text()},
                          tables={"attributes-metrics": metrics_table(trained["metrics"])},
                          images={f"attributes-{n}": p for n, p in files.items() if n.startswith("confusion_")})
        summary = {h: {k: m[k] for k in ("balanced_accuracy", "auroc", "threshold")}
                   for h, m in trained["metrics"].items()}
        state["counts"] = {**runtime.summarize(outcomes), "train_crops": data["train"].get("crops", 0),
                           "val_crops": data["val"].get("crops", 0)}
        state["metrics"] = {"checkpoint": trained["checkpoint"], "model_id": trained["model_id"], "val": summary,
                            "detector": det_note}
        catalog.refresh(data_ws)
        return {"run_id": rid, "checkpoint": trained["checkpoint"], "model_id": trained["model_id"],
                "data_workspace": data_ws.location,
                "report": str(files["report"]), "metrics": summary, "data": data, "detector": det_note}


def run(opts: TrainAttributesOptions) -> dict[str, Any]:
    """Check the model and training configs (before Prefect starts), then run the flow on its task runner."""
    opts.check()
    return runners.with_runner(train_attributes_run, opts)(opts)


def train_attributes_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `train_attributes` flow from keyword options (the fields of TrainAttributesOptions)."""
    return run(TrainAttributesOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    command.add_common_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--wider-root", default=None,
                   help="WIDER FACE root with WIDER_train/, WIDER_val/ and wider_face_split/ (the release layout)")
    for split in ("train", "val"):
        g.add_argument(f"--{split}-annotations", default=None,
                       help=f"wider_face_{split}_bbx_gt.txt (overrides the root)")
        g.add_argument(f"--{split}-images", default=None, help=f"the {split} images/ folder (overrides the root)")
    g.add_argument("--data-workspace", default=None,
                   help="workspace for the WIDER crops and their manifests (default: <workspace>/wider_face)")
    g.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="tiny mode: generate a synthetic WIDER-format dataset of N images per split under "
                        "<workspace>/synthetic_wider and train on it")
    g.add_argument("--min-size", type=int, default=20, help="skip faces whose shorter box side is below this (pixels)")
    g.add_argument("--max-images", type=int, default=None, help="use at most this many images per split")
    g.add_argument("--margin", type=float, default=0.15, help="box-crop margin per side, fraction of the box side")
    g.add_argument("--detector", choices=DETECTOR_CHOICES, default="auto",
                   help="landmark detector for aligned crops (auto: SCRFD pack, else MTCNN, else box crops only)")
    g.add_argument("--crop-device", default="cpu", help="device of the detector while cropping")
    g.add_argument("--shard-images", type=int, default=500, help="images per crop shard")
    t = p.add_argument_group("training")
    t.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG,
                   help="bundled config (mobilefacenet, resnet18, tiny) or a JSON file (see models/configs)")
    command.add_config_options(t, TRAIN_OPTIONS)
    t.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    t.add_argument("--calibration-fraction", type=float, default=0.1,
                   help="fraction of train images held out to choose the decision thresholds")
    t.add_argument("--device", default="auto", help="training device: auto, cpu, cuda, cuda:1 ...")
    t.add_argument("--torch-threads", type=int, default=None, help="CPU threads for torch")
    t.add_argument("--config-json", default=None, help="JSON object of training-setting overrides")


def train_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig overrides from --config-json and the training options."""
    cfg = command.config_overrides(args, TRAIN_OPTIONS)
    if args.no_amp:
        cfg["amp"] = False
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    wider_root = args.wider_root
    if args.synthetic is not None:
        from pipeline.synthetic.wider_synthetic import SyntheticSpec, make_dataset

        wider_root = str(make_dataset(Workspace(args.workspace).root / "synthetic_wider",
                                      SyntheticSpec(images=args.synthetic)))
    opts = command.options_from_args(TrainAttributesOptions, args, wider_root=wider_root,
                                     train_config=train_config_from_args(args))
    print(json.dumps(run(opts), indent=2, default=str))
    return 0


main = command.main_for("flows.train_attributes")

if __name__ == "__main__":
    raise SystemExit(main())
