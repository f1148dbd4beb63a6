"""`fiqa train-attributes`: train the occlusion / expression / lighting CNN on WIDER FACE.

WIDER annotation files -> face crops (aligned when the detector finds the
landmarks inside the box, else square box crops) written once as crop packs
plus `samples` / `faces` / `factors` rows (dataset "wider_face/<split>", the
ground-truth labels under labeller "wider_face_gt") in a data workspace of
their own (default <workspace>/wider_face, so they never mix with the dataset
being labelled) -> training -> evaluation on the val split -> checkpoint in
<workspace>/checkpoints/, report (markdown + confusion-matrix PNGs) in
<workspace>/reports/<run_id>/ and as Prefect artifacts.
Re-running with the same --run-id skips committed crop shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest import ShardWriter, Workspace, catalog, crops, runs
from flows import runtime

log = logging.getLogger(__name__)

DATASET = "wider_face"
GT_LABELLER = "wider_face_gt"
GT_LABELLER_VERSION = "1"
PACK_KIND = "attributes"
BOX_CROPPER, BOX_CROPPER_VERSION = "wider_box", "1"  # the faces-row "detector" of runs without a detector
DETECTOR_CHOICES = ("auto", "none", "mtcnn", "scrfd")
REPORT_NAME = "attributes_report.md"
DATA_WORKSPACE = "wider_face"  # default data workspace, inside the main workspace

_detectors: dict[tuple[str, str], Any] = {}
_detector_lock = threading.Lock()


def _detector(kind: str, device: str) -> Any:
    """One detector per process and kind (tasks on a thread runner share it)."""
    if kind == "none":
        return None
    with _detector_lock:
        if (kind, device) not in _detectors:
            from models.detectors import make_detector

            _detectors[(kind, device)] = make_detector(kind, device=device)
        return _detectors[(kind, device)]


def resolve_detector(kind: str, device: str) -> tuple[str, str]:
    """Check the detector choice before any work; 'auto' falls back to box crops when no weights are present."""
    if kind not in DETECTOR_CHOICES:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTOR_CHOICES}")
    if kind == "none":
        return "none", "none: every crop is a square box crop"
    from models.weights import MissingWeightsError

    try:
        det = _detector(kind, device)
    except (MissingWeightsError, FileNotFoundError, RuntimeError) as e:
        if kind != "auto":
            raise ValueError(f"detector {kind!r} is not usable: {e}") from e
        note = f"no detector weights ({e}); every crop is a square box crop"
        log.warning("train-attributes: %s", note)
        return "none", note
    return kind, f"{det.name} {det.version}"


def resolve_splits(
    wider_root: str | None,
    train_annotations: str | None = None,
    train_images: str | None = None,
    val_annotations: str | None = None,
    val_images: str | None = None,
) -> dict[str, tuple[Path, Path]]:
    """(annotation file, images folder) per split, from the release layout and/or explicit paths; checked now."""
    from pipeline.wider import SPLITS, split_layout

    given = {"train": (train_annotations, train_images), "val": (val_annotations, val_images)}
    out: dict[str, tuple[Path, Path]] = {}
    for split in SPLITS:
        gt, images = given[split]
        if wider_root is not None:
            default_gt, default_images = split_layout(wider_root, split)
            gt, images = gt or default_gt, images or default_images
        if gt is None or images is None:
            raise ValueError(f"the {split} split needs --wider-root or both --{split}-annotations and --{split}-images")
        gt, images = Path(gt).expanduser().resolve(), Path(images).expanduser().resolve()
        if not gt.is_file():
            raise FileNotFoundError(f"WIDER FACE {split} annotation file not found: {gt}")
        if not images.is_dir():
            raise NotADirectoryError(f"WIDER FACE {split} images folder not found: {images}")
        out[split] = (gt, images)
    return out


def _face_key(rel: str, box: tuple[int, int, int, int], seen: dict[str, int]) -> str:
    """Stable key of a face within the dataset: image path and box (a repeated box gets a ~n suffix)."""
    key = f"{rel}#{box[0]},{box[1]},{box[2]},{box[3]}"
    n = seen.get(key, 0)
    seen[key] = n + 1
    return key if n == 0 else f"{key}~{n}"


def _read_image(path: Path) -> tuple[Any, str | None, str | None]:
    """(DecodedImage or None, status, error) for one source image."""
    from pipeline import images

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, images.MISSING, f"image file {path} does not exist"
    except OSError as e:
        return None, images.UNREADABLE, f"cannot read {path}: {e}"
    dec = images.decode(data)
    return dec, dec.status, dec.error if dec.status != images.OK else None


def extract_shard(
    ws_root: str,
    run_id: str,
    shard: str,
    items: list[tuple[str, Any]],
    *,
    images_dirs: dict[str, str],
    detector: str = "none",
    device: str = "cpu",
    margin: float = 0.15,
) -> dict[str, int]:
    """Crop every kept face of a shard of (split, WiderImage) items; write the pack, rows and commit mark."""
    from models.attributes import HEADS
    from pipeline import images as img
    from pipeline.align import DETECT
    from pipeline.attributes import ALIGNED, training_crop, wider_targets
    from pipeline.factors import binary_class
    from pipeline.ids import sample_id
    from pipeline.records import factor_row

    ws = Workspace(ws_root)
    det = _detector(detector, device)
    samples, faces, factors, packed = [], [], [], []
    counts = {"images": 0, "faces": 0, "crops": 0, "aligned": 0, "box": 0, "failed": 0}
    for split, rec in items:
        counts["images"] += 1
        path = Path(images_dirs[split]) / rec.path
        decoded, status, error = (None, None, None) if not rec.faces else _read_image(path)
        seen: dict[str, int] = {}
        for face in rec.faces:
            counts["faces"] += 1
            key = _face_key(rec.path, face.box, seen)
            dataset = f"{DATASET}/{split}"
            sid = sample_id(dataset, key)
            crop = None
            if status == img.OK:
                try:
                    crop = training_crop(decoded.rgb, face.box, detector=det, margin=margin)
                except (ValueError, np.linalg.LinAlgError) as e:
                    status_f, error_f = "error", f"crop failed for box {face.box}: {e}"
                else:
                    status_f, error_f = "ok", None
            else:
                status_f, error_f = status, error
            samples.append({
                "sample_id": sid, "dataset": dataset, "source_kind": "wider", "source": f"{path}#{key.split('#')[1]}",
                "identity": -1, "width": getattr(decoded, "width", None), "height": getattr(decoded, "height", None),
                "channels": 3 if status == img.OK else None, "format": getattr(decoded, "format", None),
                "status": status, "error": error,
            })
            x, y, w, h = face.box
            row = {"sample_id": sid, "n_faces": 1, "box": [x, y, x + w - 1, y + h - 1], "status": status_f,
                   "error": error_f, "detector": det.name if det is not None else BOX_CROPPER,
                   "detector_version": det.version if det is not None else BOX_CROPPER_VERSION}
            if crop is not None:
                row.update(transform=crop.transform.reshape(-1).tolist(), crop_index=len(packed),
                           aligned_mode=DETECT if crop.method == ALIGNED else "box", score=crop.score,
                           landmarks=None if crop.landmarks is None else crop.landmarks.reshape(-1).tolist())
                packed.append(crop.crop)
                counts["crops"] += 1
                counts["aligned" if crop.method == ALIGNED else "box"] += 1
            else:
                counts["failed"] += 1
            faces.append(row)
            target = wider_targets(face)
            for h_i, factor in enumerate(HEADS):
                value = float(target[h_i])
                factors.append(factor_row(sid, factor, labeller=GT_LABELLER, labeller_version=GT_LABELLER_VERSION,
                                          value=value, decision=binary_class(factor, value),
                                          details={"split": split, "wider": face.attributes()}))
    if packed:
        rel = crops.write_pack(ws, run_id, shard, np.stack(packed), kind=PACK_KIND)
        for row in faces:
            if row.get("crop_index") is not None:
                row["crop_file"] = rel
    ShardWriter(ws, "samples", run_id).write(shard, samples)
    ShardWriter(ws, "faces", run_id).write(shard, faces)
    ShardWriter(ws, "factors", run_id).write(shard, factors)
    runs.mark_shard_done(ws, run_id, shard, counts)
    return counts


CROPS_SQL = """
SELECT s.dataset, s.source, fc.crop_file, fc.crop_index, fc.aligned_mode,
       max(fx.value) FILTER (WHERE fx.factor = 'occlusion') AS occlusion,
       max(fx.value) FILTER (WHERE fx.factor = 'expression') AS expression,
       max(fx.value) FILTER (WHERE fx.factor = 'lighting') AS lighting
FROM faces_history fc
JOIN samples_history s ON s.sample_id = fc.sample_id AND s.run_id = fc.run_id
JOIN factors_history fx ON fx.sample_id = fc.sample_id AND fx.run_id = fc.run_id AND fx.labeller = $labeller
WHERE fc.run_id = $run AND fc.status = 'ok' AND fc.crop_file IS NOT NULL
GROUP BY ALL
ORDER BY s.dataset, fc.crop_file, fc.crop_index
"""


COUNTS_SQL = """
SELECT s.dataset,
       count(*) FILTER (WHERE fc.status = 'ok' AND fc.crop_file IS NOT NULL) AS crops,
       count(*) FILTER (WHERE fc.aligned_mode = 'detect' AND fc.crop_file IS NOT NULL) AS aligned,
       count(*) FILTER (WHERE fc.aligned_mode = 'box' AND fc.crop_file IS NOT NULL) AS box,
       count(*) FILTER (WHERE fc.status <> 'ok') AS failed
FROM faces_history fc JOIN samples_history s ON s.sample_id = fc.sample_id AND s.run_id = fc.run_id
WHERE fc.run_id = $run
GROUP BY s.dataset
"""


def crop_counts(ws: Workspace, run_id: str) -> dict[str, dict[str, int]]:
    """Per split: crops written (aligned / box) and faces that failed, read from the run's manifests."""
    con = catalog.connect(ws)
    try:
        rows = con.sql(COUNTS_SQL, params={"run": run_id}).to_arrow_table().to_pylist()
    finally:
        con.close()
    return {r.pop("dataset").split("/", 1)[1]: r for r in rows}


def load_crops(ws: Workspace, run_id: str) -> dict[str, dict[str, Any]]:
    """Per split: crop files, indices, targets (HEADS order) and source images of a run's crops."""
    from models.attributes import HEADS

    con = catalog.connect(ws)
    try:
        tbl = con.sql(CROPS_SQL, params={"run": run_id, "labeller": GT_LABELLER}).to_arrow_table().to_pydict()
    finally:
        con.close()
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "val"):
        rows = [i for i, d in enumerate(tbl["dataset"]) if d == f"{DATASET}/{split}"]
        out[split] = {
            "files": [tbl["crop_file"][i] for i in rows],
            "indices": [tbl["crop_index"][i] for i in rows],
            "images": [tbl["source"][i].rsplit("#", 1)[0] for i in rows],
            "targets": np.array([[tbl[h][i] for h in HEADS] for i in rows], dtype=np.float32).reshape(-1, len(HEADS)),
        }
    return out


def split_calibration(images: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out for threshold calibration, whole source images at a time."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    unique = sorted(set(images))
    rng = np.random.default_rng(seed)
    n_cal = int(round(fraction * len(unique)))
    held = set(rng.permutation(len(unique))[:n_cal].tolist())
    held_names = {unique[i] for i in held}
    return np.array([im in held_names for im in images], dtype=bool)


def train_and_evaluate(
    ws_root: str, data_root: str, run_id: str, net_config: str, train_config: dict[str, Any], *,
    calibration_fraction: float, device: str, torch_threads: int | None = None,
) -> dict[str, Any]:
    """Train on the run's train crops (in the data workspace), choose thresholds on the held-out slice,
    evaluate on val, save the checkpoint in the main workspace."""
    import torch

    from models.attributes import load_config, model_id, save_checkpoint
    from models.attributes_train import LabelledCrops, Subset, TrainConfig, evaluate, fit, predict
    from models.train import PackedCrops

    if torch_threads:
        torch.set_num_threads(torch_threads)
    ws, data_ws = Workspace(ws_root), Workspace(data_root)
    mcfg = load_config(net_config)
    tcfg = TrainConfig.from_dict(train_config)
    data = load_crops(data_ws, run_id)
    tr, va = data["train"], data["val"]
    if not tr["files"]:
        raise ValueError(f"run {run_id}: no usable train crops (check the images folder and the parse report)")
    if not va["files"]:
        raise ValueError(f"run {run_id}: no usable val crops")
    train_all = LabelledCrops(PackedCrops(data_ws.root, tr["files"], tr["indices"]), tr["targets"])
    held = split_calibration(tr["images"], calibration_fraction, tcfg.seed)
    train_src = Subset(train_all, np.flatnonzero(~held))
    calib_src = Subset(train_all, np.flatnonzero(held)) if held.any() else None
    val_src = LabelledCrops(PackedCrops(data_ws.root, va["files"], va["indices"]), va["targets"])
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    result = fit(mcfg, train_src, tcfg, calibration=calib_src, device=dev)
    probs = predict(result.model, val_src, tcfg.batch_size, dev)
    metrics = evaluate(probs, val_src.targets, result.thresholds)
    ckpt_path = ws.checkpoints / f"attributes-{run_id}.pt"
    info = {**result.info, "history": result.history, "run_id": run_id, "val_samples": len(val_src)}
    save_checkpoint(ckpt_path, result.model, thresholds=result.thresholds, metrics=metrics, train=info,
                    version=run_id)
    return {"checkpoint": str(ckpt_path), "model_id": model_id(result.model), "metrics": metrics,
            "thresholds": result.thresholds, "train_info": info}


def write_report(ws: Workspace, run_id: str, trained: dict[str, Any], data: dict[str, Any],
                 notes: dict[str, Any] | None = None) -> dict[str, Path]:
    """Report markdown, metrics JSON and one confusion-matrix PNG per head under reports/<run_id>/."""
    from pipeline.attributes_report import plot_confusion, report_markdown

    out_dir = ws.reports / run_id
    pngs = {h: plot_confusion(m["confusion"], h, out_dir / f"confusion_{h}.png", threshold=m["threshold"])
            for h, m in trained["metrics"].items()}
    text = report_markdown(run_id=run_id, model_id=trained["model_id"], checkpoint=trained["checkpoint"],
                           metrics=trained["metrics"], train_info=trained["train_info"], data=data,
                           images={h: p.name for h, p in pngs.items()}, notes=notes)
    report = out_dir / REPORT_NAME
    report.write_text(text)
    metrics_json = out_dir / "attributes_metrics.json"
    metrics_json.write_text(json.dumps({"run_id": run_id, "model_id": trained["model_id"],
                                        "checkpoint": trained["checkpoint"], "metrics": trained["metrics"],
                                        "data": data}, indent=2, default=float))
    return {"report": report, "metrics": metrics_json, **{f"confusion_{h}": p for h, p in pngs.items()}}


def _publish(files: dict[str, Path], trained: dict[str, Any]) -> None:
    """The report as Prefect artifacts: markdown, a metrics table and the confusion-matrix images."""
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    from pipeline.attributes_report import metrics_table

    create_markdown_artifact(files["report"].read_text(), key="attributes-report",
                             description="attribute CNN training report")
    create_table_artifact(metrics_table(trained["metrics"]), key="attributes-metrics",
                          description="validation metrics per attribute")
    for name, path in files.items():
        if name.startswith("confusion_"):
            create_image_artifact(path.resolve().as_uri(), key=f"attributes-{name.replace('_', '-')}",
                                  description=f"validation confusion matrix: {name.removeprefix('confusion_')}")


def _impl(params: dict[str, Any], extract_task: Any, train_task: Any) -> dict[str, Any]:
    from pipeline.wider import ParseReport, parse

    splits = resolve_splits(params["wider_root"], params["train_annotations"], params["train_images"],
                            params["val_annotations"], params["val_images"])
    from models.attributes import load_config
    from models.attributes_train import TrainConfig

    load_config(params["net_config"])  # a bad configuration fails before any work starts
    TrainConfig.from_dict(params["train_config"])
    det_kind, det_note = resolve_detector(params["detector"], params["crop_device"])
    ws = Workspace(params["workspace"])
    data_ws = Workspace(params["data_workspace"] or ws.root / DATA_WORKSPACE)
    record = {k: v for k, v in params.items() if k != "workspace"}
    with runtime.tracked_run(ws, "train_attributes", record, params["run_id"]) as state:
        rid = state["run_id"]
        parsed: dict[str, list[Any]] = {}
        data: dict[str, dict[str, Any]] = {}
        for split, (gt, _) in splits.items():
            rep = ParseReport()
            recs = []
            for rec in parse(gt, min_size=params["min_size"], report=rep):
                recs.append(rec)
                if params["max_images"] and len(recs) >= params["max_images"]:
                    break
            parsed[split] = recs
            data[split] = rep.as_dict()
        shards = []
        for split in splits:
            shards += [[(split, r) for r in chunk] for chunk in runtime.chunks(parsed[split], params["shard_images"])]
        outcomes = runtime.run_shards(
            extract_task, shards, ws=data_ws, run_id=rid, desc="wider crops", progress=params["progress"],
            images_dirs={s: str(p[1]) for s, p in splits.items()}, detector=det_kind,
            device=params["crop_device"], margin=params["margin"])
        runtime.check_shard_failures(outcomes, rid)
        per_split = crop_counts(data_ws, rid)
        for split in splits:
            data[split].update(per_split.get(split, {}))
        trained = train_task(str(ws.root), str(data_ws.root), rid, params["net_config"], params["train_config"],
                             calibration_fraction=params["calibration_fraction"], device=params["device"],
                             torch_threads=params["torch_threads"])
        files = write_report(ws, rid, trained, data, notes={"landmark detector": det_note,
                                                            "crops and manifests": str(data_ws.root)})
        _publish(files, trained)
        summary = {h: {k: m[k] for k in ("balanced_accuracy", "auroc", "threshold")}
                   for h, m in trained["metrics"].items()}
        state["counts"] = {**runtime.summarize(outcomes), "train_crops": data["train"].get("crops", 0),
                           "val_crops": data["val"].get("crops", 0)}
        state["metrics"] = {"checkpoint": trained["checkpoint"], "model_id": trained["model_id"], "val": summary,
                            "detector": det_note}
        catalog.refresh(data_ws)
        return {"run_id": rid, "checkpoint": trained["checkpoint"], "model_id": trained["model_id"],
                "data_workspace": str(data_ws.root),
                "report": str(files["report"]), "metrics": summary, "data": data, "detector": det_note}


def _flow() -> Any:
    from prefect import flow, task

    extract_task = task(name="wider-crops", retries=0)(extract_shard)
    train_task = task(name="train-attributes-model")(train_and_evaluate)

    @flow(name="train_attributes", log_prints=True)
    def train_attributes_flow(
        wider_root: str | None = None,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        workspace: str | None = None,
        data_workspace: str | None = None,
        run_id: str | None = None,
        net_config: str = "mobilefacenet",
        train_config: dict[str, Any] | None = None,
        min_size: int = 20,
        margin: float = 0.15,
        detector: str = "auto",
        shard_images: int = 500,
        max_images: int | None = None,
        calibration_fraction: float = 0.1,
        device: str = "auto",
        crop_device: str = "cpu",
        torch_threads: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """WIDER FACE -> crops -> attribute CNN -> val evaluation -> checkpoint and report."""
        params = dict(locals())
        params["train_config"] = dict(train_config or {})
        return _impl(params, extract_task, train_task)

    return train_attributes_flow


def train_attributes_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `train_attributes` Prefect flow (parameters as `_flow`'s flow function)."""
    runner = kwargs.pop("task_runner", None)
    fl = _flow()
    if runner is not None:
        fl = fl.with_options(task_runner=runner)
    return fl(**kwargs)


TRAIN_OPTIONS: tuple[tuple[str, type], ...] = (
    ("epochs", int), ("batch-size", int), ("lr", float), ("weight-decay", float), ("warmup-epochs", float),
    ("imbalance", str), ("num-workers", int), ("seed", int),
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    runtime.add_common_args(p)
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
    t.add_argument("--model-config", default="mobilefacenet",
                   help="bundled config (mobilefacenet, resnet18, tiny) or a JSON file (see models/configs)")
    for name, typ in TRAIN_OPTIONS:
        t.add_argument(f"--{name}", type=typ, default=None)
    t.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    t.add_argument("--calibration-fraction", type=float, default=0.1,
                   help="fraction of train images held out to choose the decision thresholds")
    t.add_argument("--device", default="auto", help="training device: auto, cpu, cuda, cuda:1 ...")
    t.add_argument("--torch-threads", type=int, default=None, help="CPU threads for torch")
    t.add_argument("--config-json", default=None, help="JSON object of training-setting overrides")


def train_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    for name, _ in TRAIN_OPTIONS:
        key = name.replace("-", "_")
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    if args.no_amp:
        cfg["amp"] = False
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    wider_root = args.wider_root
    if args.synthetic is not None:
        from pipeline.wider_synthetic import SyntheticSpec, make_dataset

        wider_root = str(make_dataset(Workspace(args.workspace).root / "synthetic_wider",
                                      SyntheticSpec(images=args.synthetic)))
    out = train_attributes_flow(
        task_runner=runtime.make_task_runner(args.runner, args.workers, args.address),
        wider_root=wider_root, train_annotations=args.train_annotations, train_images=args.train_images,
        val_annotations=args.val_annotations, val_images=args.val_images, workspace=args.workspace,
        data_workspace=args.data_workspace,
        run_id=args.run_id, net_config=args.model_config, train_config=train_config_from_args(args),
        min_size=args.min_size, margin=args.margin, detector=args.detector, shard_images=args.shard_images,
        max_images=args.max_images, calibration_fraction=args.calibration_fraction, device=args.device,
        crop_device=args.crop_device, torch_threads=args.torch_threads)
    print(json.dumps(out, indent=2, default=str))
    return 0


main = runtime.main_for("flows.train_attributes")

if __name__ == "__main__":
    raise SystemExit(main())
