"""Training throughput of CLIB-FIQA: cached prompt embeddings vs the text tower run every step.

Prints one JSON object. Each mode runs in its own process so peak memory is
per mode (CPU: peak RSS; GPU: peak allocated CUDA memory). The peer is the
official code's way: the 360 prompts through the text tower on every step
(with its token embedding trainable). Random init (no weights needed).

    python benchmarks/train_throughput.py                       # RN50-quickgelu, 224 px, CPU, batch 4
    python benchmarks/train_throughput.py --device cuda --batch-size 256 --loader packed --workers 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {
    "cached": {"text_mode": "cached"},
    "text_every_step": {"text_mode": "per_step", "official_trainable_text": True},
}


def _images(n: int, loader: str, tmp: str) -> Any:
    import numpy as np

    from models.train import ArrayImages, PackedCrops

    crops = np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    if loader == "memory":
        return ArrayImages(crops)
    from data_manifest import Workspace
    from data_manifest.crops import write_pack

    ws = Workspace(tmp)
    rel = write_pack(ws, "bench", 0, crops)
    return PackedCrops(ws.root, [rel] * n, list(range(n)))


def run_mode(mode: str, args: argparse.Namespace, queue: Any) -> None:
    import torch

    from models.clib import ClibConfig, ClibFiqa
    from models.losses import soft_quality_targets
    from models.train import TrainConfig, crop_loader, resolve_device, train_step

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = ClibConfig(model_name=args.model, pretrained=None, **MODES[mode])
    model = ClibFiqa.from_config(cfg).to(device)
    model.set_channels_last(True)
    tc = TrainConfig(batch_size=args.batch_size, num_workers=args.workers, device=str(device))
    groups = model.trainable_groups()
    opt = torch.optim.AdamW([{"params": groups["main"], "lr": tc.lr}, {"params": groups["mlp"], "lr": tc.mlp_lr}],
                            weight_decay=tc.weight_decay)
    n = args.batch_size * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        loader = crop_loader(_images(n, args.loader, tmp), args.batch_size, num_workers=args.workers,
                             pin_memory=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        t_prev = time.perf_counter()
        for step, (idx, imgs) in enumerate(loader):
            imgs = imgs.to(device, non_blocking=True)
            b = len(idx)
            target = soft_quality_targets(torch.rand(b, device=device))
            labels = torch.zeros(b, 5, dtype=torch.long, device=device)
            train_step(model, model, imgs, target, labels, tc, opt, groups, stage1=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if step >= args.warmup:
                times.append(now - t_prev)  # includes waiting for the loader
            t_prev = now
    total = sum(times)
    out = {"steps": len(times), "step_s": round(total / max(len(times), 1), 4),
           "images_per_s": round(args.batch_size * len(times) / total, 3) if total else None,
           "image_size": model.image_size,
           "trainable_params": sum(p.numel() for g in groups.values() for p in g if p.requires_grad)}
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put((mode, out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="RN50-quickgelu", help="open_clip architecture (random init)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--loader", choices=("memory", "packed"), default="memory",
                   help="crops from memory or from a packed crop file")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {}
    for mode in MODES:
        q = ctx.Queue()
        proc = ctx.Process(target=run_mode, args=(mode, args, q))
        proc.start()
        name, res = q.get()
        proc.join()
        results[name] = res
    a, b = results["cached"], results["text_every_step"]
    report = {"benchmark": "train_throughput", "model": args.model, "image_size": a["image_size"],
              "device": args.device, "batch_size": args.batch_size, "loader": args.loader, "workers": args.workers,
              "cached": a, "text_every_step": b,
              "speedup_cached_vs_text_every_step": round(a["images_per_s"] / b["images_per_s"], 3)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
