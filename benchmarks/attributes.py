"""Per-core throughput of the attribute stage (images/s), each fast path against its eager-PyTorch / per-crop peer.

Prints one JSON object. On 112x112 aligned crops (random pixels; already
aligned, so lighting uses the template landmarks, as `fiqa label --aligned`)
it times, with one torch thread by default (`--threads`):

(a) `combined`: the label flow's default `attributes` stage (occlusion +
    expression + lighting, built by `pipeline.labellers.registry.get_stage`), against the
    same three labellers in plain eager PyTorch with lighting measured crop by
    crop (peer `eager_per_crop`);
(b) `occlusion`, `expression`, `lighting`: each part alone, the default
    engine against eager torch (and the other engines), lighting batched
    against crop by crop; expression also against itself without its exposure
    lift (`no_exposure_lift`; random crops are mid-grey, so none is lifted and
    the ratio is the cost of measuring each crop's face level);
(c) `mobilefacenet`: the `--attributes-checkpoint` path, `AttributeStage` on a
    saved MobileFaceNet checkpoint (random weights: throughput does not depend
    on them), the default engine against eager torch in the same chunks and
    against one eager 256-crop forward (`eager_batch256`).

Every rate is images per second of wall time and per second of this process's
CPU time (`per_cpu_s`, robust to other load on the machine); every ratio is
`per_cpu_s` of the path over its peer, measured in this run. Rows of each fast
path are compared with its peer's: `max_value_difference` is the largest
|value| difference over all rows.

    python benchmarks/attributes.py                     # CPU, one thread
    python benchmarks/attributes.py --device cuda       # GPU: eager torch on the device (lighting on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.attributes import AttributeNet, load_config, save_checkpoint
from models.fast_forward import ONNX, TORCH, TORCHSCRIPT
from pipeline.labellers.attributes import AttributeStage
from pipeline.labellers.base import FaceCrop
from pipeline.labellers.expression import ExpressionStage
from pipeline.labellers.lighting import LightingStage
from pipeline.labellers.occlusion import OcclusionStage
from pipeline.labellers.registry import LabelOptions, StageGroup, get_stage

Stage = Callable[[list[FaceCrop]], list[dict[str, Any]]]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(stage: Stage, batch: list[FaceCrop], batch_size: int, repeats: int, device: str
          ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Best of `repeats` passes over `batch` in calls of `batch_size` (after one warm-up call), and the rows."""
    stage(batch[:batch_size])
    best_wall = best_cpu = float("inf")
    rows: list[dict[str, Any]] = []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        rows = []
        for i in range(0, len(batch), batch_size):
            rows += stage(batch[i:i + batch_size])
        _sync(device)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return {"images_per_s": round(len(batch) / best_wall, 1), "images_per_cpu_s": round(len(batch) / best_cpu, 1)}, rows


def _max_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    if [(r["sample_id"], r["factor"]) for r in a] != [(r["sample_id"], r["factor"]) for r in b]:
        raise AssertionError("the two paths returned different rows")
    return max(abs(x["value"] - y["value"]) for x, y in zip(a, b, strict=True))


def compare(paths: dict[str, Stage], batch: list[FaceCrop], batch_size: int, repeats: int, device: str,
            built_s: dict[str, float] | None = None) -> dict[str, Any]:
    """Rates of every path; the first is the default, each other one is its peer (ratios: default / peer)."""
    out: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, stage in paths.items():
        out[name], rows[name] = timed(stage, batch, batch_size, repeats, device)
        if built_s and name in built_s:
            out[name]["build_s"] = round(built_s[name], 2)
    default, *peers = paths
    for peer in peers:
        out[f"speedup_vs_{peer}"] = round(out[default]["images_per_cpu_s"] / out[peer]["images_per_cpu_s"], 2)
        out[f"max_value_difference_vs_{peer}"] = _max_difference(rows[default], rows[peer])
    out["peers_of"] = default
    return out


def _build(factory: Callable[[], Any], built_s: dict[str, float], name: str) -> Any:
    t0 = time.perf_counter()
    stage = factory()
    built_s[name] = time.perf_counter() - t0
    return stage


class PerCrop:
    """The lighting stage called one crop at a time (each crop measured on its own)."""

    def __init__(self, stage: LightingStage) -> None:
        self.stage, self.name, self.version = stage, stage.name, stage.version

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        return [self.stage.label(face) for face in batch]


def bench_attributes(batch: list[FaceCrop], device: str, batch_size: int, repeats: int) -> dict[str, Any]:
    """(a) and (b): the default stage and each of its parts against eager torch / per-crop peers."""
    on_cpu = device == "cpu"
    built: dict[str, float] = {}
    combined = _build(lambda: get_stage("attributes", LabelOptions(device=device)), built, "default")
    occ = {"default": combined.stages[0]}
    expr = {"default": combined.stages[1]}
    light = combined.stages[2]
    if on_cpu:
        occ["eager_torch"] = _build(lambda: OcclusionStage(device=device, backend=TORCH), built, "occ_torch")
        expr["eager_torch"] = _build(lambda: ExpressionStage(device=device, backend=TORCH), built, "expr_torch")
        occ["torchscript"] = _build(lambda: OcclusionStage(device=device, backend=TORCHSCRIPT), built, "occ_ts")
        expr["torchscript"] = _build(lambda: ExpressionStage(device=device, backend=TORCHSCRIPT), built, "expr_ts")
        # the default without its exposure lift (pipeline.labellers.expression.exposure_lifted): what the lift costs
        d = expr["default"]
        expr["no_exposure_lift"] = _build(lambda: ExpressionStage(
            device=device, batch_size=d.batch_size, forward_batch=d.forward_batch, backend=d.backend,
            threshold=d.threshold, exposure_floor=None), built, "expr_no_lift")
    peer = StageGroup("attributes", [occ.get("eager_torch", occ["default"]), expr.get("eager_torch", expr["default"]),
                                     PerCrop(light)])
    return {
        "combined": {
            "stages": [s.name for s in combined.stages],
            "backends": {s.name: getattr(s, "backend", "numpy") for s in combined.stages},
            **compare({"default": combined, "eager_per_crop": peer}, batch, batch_size, repeats, device),
        },
        "occlusion": {"backend": occ["default"].backend, **compare(occ, batch, batch_size, repeats, device)},
        "expression": {"backend": expr["default"].backend, **compare(expr, batch, batch_size, repeats, device)},
        "lighting": compare({"batched": light, "per_crop": PerCrop(light)}, batch, batch_size, repeats, device),
        "build_seconds": {k: round(v, 2) for k, v in built.items()},
    }


def bench_checkpoint(config: str, batch: list[FaceCrop], device: str, batch_size: int, repeats: int,
                     tmp: Path) -> dict[str, Any]:
    """(c): AttributeStage on a saved checkpoint of `config`: default engine, eager torch, one 256-crop forward."""
    torch.manual_seed(0)
    net = AttributeNet(load_config(config)).eval()
    ckpt = tmp / f"{config}.pt"
    save_checkpoint(ckpt, net, version="benchmark")
    built: dict[str, float] = {}
    paths: dict[str, Stage] = {"default": _build(lambda: AttributeStage(ckpt, device=device, batch_size=batch_size),
                                                 built, "default")}
    default = paths["default"]
    if device == "cpu":
        paths["eager_torch"] = _build(lambda: AttributeStage(ckpt, device=device, backend=TORCH,
                                                             batch_size=batch_size), built, "eager_torch")
        paths["onnx"] = _build(lambda: AttributeStage(ckpt, device=device, backend=ONNX, batch_size=batch_size),
                               built, "onnx")
    eager_whole = AttributeStage(ckpt, device=device, backend=TORCH, batch_size=batch_size,
                                 forward_batch=batch_size)  # the whole call's batch in one forward
    paths["eager_batch256" if batch_size == 256 else f"eager_batch{batch_size}"] = eager_whole
    out = compare(paths, batch, batch_size, repeats, device, built)
    return {"config": config, "backend": default.backend, "forward_batch": default.forward_batch, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--images", type=int, default=512, help="crops per timed pass (default 512)")
    p.add_argument("--batch-size", type=int, default=256, help="crops per stage call, as the label flow (256)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes; the best is reported (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch (and onnxruntime) CPU threads (default 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=["attributes", "mobilefacenet"], help="parts to skip")
    p.add_argument("--peer-config", default=None, help="also time this attribute-net config (e.g. resnet18)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    crops = np.random.default_rng(0).integers(0, 256, (args.images, 112, 112, 3), dtype=np.uint8)
    batch = [FaceCrop(f"s{i}", c) for i, c in enumerate(crops)]
    out: dict[str, Any] = {
        "benchmark": "attribute stage throughput per core",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(args.device),
        "images": args.images,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if "attributes" not in args.skip:
        out.update(bench_attributes(batch, args.device, args.batch_size, args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        if "mobilefacenet" not in args.skip:
            out["mobilefacenet"] = bench_checkpoint("mobilefacenet", batch, args.device, args.batch_size,
                                                    args.repeats, Path(tmp))
        if args.peer_config:
            out[args.peer_config] = bench_checkpoint(args.peer_config, batch, args.device, args.batch_size,
                                                     args.repeats, Path(tmp))
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
