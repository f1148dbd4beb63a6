"""WIDER FACE crops for the attribute CNN: detector and split resolution, crop shards, crops read back.

Each shard of (split, WiderImage) items becomes a crop pack plus `samples` / `faces` / `factors`
rows (:func:`pipeline.labellers.attributes.wider_rows`: aligned crops where the detector finds
the landmarks inside the box, else square box crops) in a data workspace of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest import ShardWriter, Workspace, catalog, crops
from pipeline.labellers.attributes import WIDER_DATASET, WIDER_GT_LABELLER, wider_rows
from pipeline.process_lock import ProcessLock

log = logging.getLogger(__name__)

PACK_KIND = "attributes"
DETECTOR_CHOICES = ("auto", "none", "mtcnn", "scrfd")

_detectors: dict[tuple[str, str], Any] = {}
_detector_lock = ProcessLock()


def shared_detector(kind: str, device: str) -> Any:
    """One detector per process, kind and device (tasks on a thread runner share it); None for 'none'."""
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
        det = shared_detector(kind, device)
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
    from pipeline.readers.wider import SPLITS, split_layout

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


def parse_splits(splits: dict[str, tuple[Path, Path]], min_size: int,
                 max_images: int | None = None) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """WIDER records per split (at most max_images) and each split's parse report."""
    from pipeline.readers.wider import ParseReport, parse

    parsed: dict[str, list[Any]] = {}
    data: dict[str, dict[str, Any]] = {}
    for split, (gt, _) in splits.items():
        rep = ParseReport()
        recs = []
        for rec in parse(gt, min_size=min_size, report=rep):
            recs.append(rec)
            if max_images and len(recs) >= max_images:
                break
        parsed[split] = recs
        data[split] = rep.as_dict()
    return parsed, data


def write_crop_shard(ws: Workspace, run_id: str, shard: str, items: list[tuple[str, Any]], *,
                     images_dirs: dict[str, str], detector: str = "none", device: str = "cpu",
                     margin: float = 0.15) -> dict[str, int]:
    """Crop every kept face of a shard of (split, WiderImage) items; write the pack and the rows."""
    out = wider_rows(items, images_dirs, detector=shared_detector(detector, device), margin=margin)
    if out.crops:
        rel = crops.write_pack(ws, run_id, shard, np.stack(out.crops), kind=PACK_KIND)
        for row in out.faces:
            if row.get("crop_index") is not None:
                row["crop_file"] = rel
    ShardWriter(ws, "samples", run_id).write(shard, out.samples)
    ShardWriter(ws, "faces", run_id).write(shard, out.faces)
    ShardWriter(ws, "factors", run_id).write(shard, out.factors)
    return out.counts


def crop_counts(ws: Workspace, run_id: str) -> dict[str, dict[str, int]]:
    """Per split: crops written (aligned / box) and faces that failed, read from the run's manifests."""
    con = catalog.connect(ws)
    try:
        rows = con.sql(catalog.bundled_sql("flows/wider_crop_counts"), params={"run": run_id}
                       ).to_arrow_table().to_pylist()
    finally:
        con.close()
    return {r.pop("dataset").split("/", 1)[1]: r for r in rows}


def load_crops(ws: Workspace, run_id: str) -> dict[str, dict[str, Any]]:
    """Per split: crop files, indices, targets (HEADS order) and source images of a run's crops."""
    from models.attributes import HEADS

    con = catalog.connect(ws)
    try:
        tbl = con.sql(catalog.bundled_sql("flows/wider_crops"), params={"run": run_id, "labeller": WIDER_GT_LABELLER}
                      ).to_arrow_table().to_pydict()
    finally:
        con.close()
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "val"):
        rows = [i for i, d in enumerate(tbl["dataset"]) if d == f"{WIDER_DATASET}/{split}"]
        out[split] = {
            "files": [tbl["crop_file"][i] for i in rows],
            "indices": [tbl["crop_index"][i] for i in rows],
            "images": [tbl["source"][i].rsplit("#", 1)[0] for i in rows],
            "targets": np.array([[tbl[h][i] for h in HEADS] for i in rows], dtype=np.float32).reshape(-1, len(HEADS)),
        }
    return out
