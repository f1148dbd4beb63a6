"""Labelling throughput of the attribute stage (images/s at batch 256), MobileFaceNet vs a ResNet-18 peer.

Prints one JSON object. Each network is saved as a checkpoint (random
weights: throughput does not depend on them) and run through
`pipeline.attributes.AttributeStage` on 112x112 crops, as the `label` flow
does (on CPU the stage forwards in chunks of CPU_FORWARD_BATCH); a plain
forward of the whole 256-crop batch at once is timed alongside, so the gain of
chunking and the stage's own overhead (row building) show as a ratio.

    python benchmarks/attributes.py                  # CPU
    python benchmarks/attributes.py --device cuda    # GPU, when one is present
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.attributes import AttributeNet, count_parameters, load_config, predict_proba, save_checkpoint
from pipeline.attributes import AttributeStage
from pipeline.records import FaceCrop


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(config: str, crops: np.ndarray, device: str, batch_size: int, repeats: int, tmp: Path) -> dict:
    """Images/s of the stage and of the raw forward for one bundled config."""
    torch.manual_seed(0)
    net = AttributeNet(load_config(config)).eval()
    ckpt = tmp / f"{config}.pt"
    save_checkpoint(ckpt, net, version="benchmark")
    stage = AttributeStage(ckpt, device=device, batch_size=batch_size)
    batch = [FaceCrop(f"s{i}", c) for i, c in enumerate(crops)]
    stage(batch[:batch_size])  # warm-up (allocator, cuDNN autotuning)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        rows = []
        for i in range(0, len(batch), batch_size):
            rows += stage(batch[i : i + batch_size])
    _sync(device)
    stage_s, stage_cpu = (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats
    model = stage.checkpoint.model
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        predict_proba(model, crops, batch_size=batch_size, device=device)
    _sync(device)
    raw_s, raw_cpu = (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats
    return {
        "config": config,
        "parameters": count_parameters(net),
        "images": len(crops),
        "rows": len(rows),
        "stage_images_per_s": len(crops) / stage_s,
        "plain_forward_images_per_s": len(crops) / raw_s,
        "stage_images_per_cpu_s": len(crops) / stage_cpu,  # per second of this process's CPU time (load-robust)
        "plain_forward_images_per_cpu_s": len(crops) / raw_cpu,
        "forward_batch": stage.forward_batch,
        "stage_speedup_over_plain_forward": raw_s / stage_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=1, help="batches of crops per timed pass")
    p.add_argument("--repeats", type=int, default=1, help="timed passes (after one warm-up batch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peer", default="resnet18", help="config to compare against (default: resnet18)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    crops = np.random.default_rng(0).integers(0, 256, (args.batch_size * args.batches, 112, 112, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        ours = bench("mobilefacenet", crops, args.device, args.batch_size, args.repeats, Path(tmp))
        peer = bench(args.peer, crops, args.device, args.batch_size, args.repeats, Path(tmp))
    out = {
        "benchmark": "attribute labelling throughput",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(args.device),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mobilefacenet": ours,
        args.peer: peer,
        f"speedup_mobilefacenet_vs_{args.peer}": ours["stage_images_per_s"] / peer["stage_images_per_s"],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
