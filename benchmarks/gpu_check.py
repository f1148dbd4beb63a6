"""GPU checks in one run (< 5 min on one GPU): training throughput, scorer torch-vs-ONNX agreement, anchors search.

Prints one JSON object with three parts, each measured or with the error that stopped it:

- `train`: CLIB-FIQA training steps of RN50 (QuickGELU) at 224 px, bf16 autocast, cached prompt embeddings,
  channels-last, batch 256 of 112x112 crops already on the device (the model resizes them): images/s.
  Random init: the step costs the same with the OpenAI weights, and the machine needs no download.
- `scorer`: the torch scorer on the device (float32, and with the bf16 image tower) against the exported
  ONNX graph in onnxruntime (CUDA provider when installed, else CPU), max |score| and |quality| differences.
  logit_scale is set to ln 100 so the logits have CLIP's size.
- `anchors`: the nearest-negative search on the device against the same search on the CPU (same nearest
  negatives, max |nnccs| difference) and its samples/s.

    python benchmarks/gpu_check.py                      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code path in seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL = {"model": "RN50-quickgelu", "batch_size": 256, "warmup": 3, "steps": 10, "score_images": 64,
        "anchor_samples": 65_536, "anchor_centers": 20_000, "anchor_dim": 512}
TINY = {"model": "TinyRN-test", "batch_size": 8, "warmup": 1, "steps": 2, "score_images": 8,
        "anchor_samples": 2_048, "anchor_centers": 500, "anchor_dim": 64}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, device: Any) -> Any:
    import torch

    from models.clib import ClibConfig, ClibFiqa

    torch.manual_seed(0)
    model = ClibFiqa.from_config(ClibConfig(model_name=name, pretrained=None))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # the OpenAI weights' temperature
    return model.to(device)


def check_train(s: dict[str, Any], device: Any) -> dict[str, Any]:
    """Images/s of full training steps (forward, Eq. 7 + MLP loss, backward, clipping, AdamW) with cached text."""
    import torch

    from models.losses import soft_quality_targets
    from models.train import TrainConfig, train_step

    model = _model(s["model"], device).train()
    model.set_channels_last(True)
    tc = TrainConfig(batch_size=s["batch_size"], device=str(device), bf16=True)
    groups = model.trainable_groups()
    opt = torch.optim.AdamW([{"params": groups["main"], "lr": tc.lr}, {"params": groups["mlp"], "lr": tc.mlp_lr}],
                            weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(0)
    b = s["batch_size"]
    imgs = torch.randint(0, 256, (b, 112, 112, 3), dtype=torch.uint8, generator=g).to(device)
    target = soft_quality_targets(torch.rand(b, generator=g)).to(device)
    labels = torch.zeros(b, 5, dtype=torch.long, device=device)
    autocast_on = device.type == "cuda"  # train_step's autocast: bf16 on GPU only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(s["warmup"]):
        parts = train_step(model, model, imgs, target, labels, tc, opt, groups, stage1=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        parts = train_step(model, model, imgs, target, labels, tc, opt, groups, stage1=True)
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"model": s["model"], "image_size": model.image_size, "batch_size": b, "bf16_autocast": autocast_on,
           "text": "cached", "steps": s["steps"], "step_s": round(dt / s["steps"], 4),
           "images_per_s": round(b * s["steps"] / dt, 1), "final_loss": round(float(parts["loss"]), 4)}
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def check_scorer(s: dict[str, Any], device: Any) -> dict[str, Any]:
    """Torch scorer on the device vs the ONNX graph: max differences, float32 and bf16 image tower."""
    import onnxruntime as ort
    import torch

    from models.scorer import Scorer, export_onnx
    from models.scorer_onnx import OnnxScorer

    model = _model(s["model"], torch.device("cpu")).eval()
    crops = np.random.default_rng(1).integers(0, 256, (s["score_images"], 112, 112, 3), dtype=np.uint8)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    if device.type != "cuda":
        providers = ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "clib.onnx")
        export_s = time.perf_counter() - t0
        onnx = OnnxScorer(path, providers=providers[:1])
        ref = onnx.score(crops)
        used = onnx.session.get_providers()[0]
    out: dict[str, Any] = {"model": s["model"], "images": len(crops), "onnx_provider": used,
                           "onnx_export_s": round(export_s, 2), "logit_scale": "ln 100"}
    if device.type == "cuda":
        out["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        out["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    for name, bf16 in (("float32", False), ("bf16_image_tower", True)):
        scorer = Scorer(model, device=str(device), bf16=bf16)
        with torch.autocast(device.type, dtype=torch.bfloat16):  # a caller's autocast must not change the scores
            res = scorer.score(crops)
        out[name] = {"max_abs_score_diff": float(np.abs(res.score - ref.score).max()),
                     "max_abs_quality_diff": float(np.abs(res.quality - ref.quality).max())}
    out["score_spread"] = float(ref.score.std())
    return out


def check_anchors(s: dict[str, Any], device: Any) -> dict[str, Any]:
    """Nearest-negative search on the device vs the CPU: agreement and samples/s."""
    from pipeline.anchors import NearestNegativeSearch

    rng = np.random.default_rng(2)
    n, c, d = s["anchor_samples"], s["anchor_centers"], s["anchor_dim"]
    centers = rng.normal(size=(c, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    emb = (centers[labels] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)  # samples near their own centre
    dev_search = NearestNegativeSearch(centers, device=str(device))
    dev_search.search(emb[:1024], labels[:1024])  # warm-up
    t0 = time.perf_counter()
    ccs, nnccs, nn = dev_search.search(emb, labels)
    dt = time.perf_counter() - t0
    k = min(n, 8_192)  # the CPU reference on a slice keeps the check short
    ccs_c, nnccs_c, nn_c = NearestNegativeSearch(centers, device="cpu").search(emb[:k], labels[:k])
    return {"samples": n, "centers": c, "dim": d, "device_s": round(dt, 3), "samples_per_s": round(n / dt, 1),
            "compared_with_cpu": k, "same_nearest_negative": float((nn[:k] == nn_c).mean()),
            "max_abs_ccs_diff": float(np.abs(ccs[:k] - ccs_c).max()),
            "max_abs_nnccs_diff": float(np.abs(nnccs[:k] - nnccs_c).max())}


def _run(name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # one failing part must not hide the others' figures
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (a CPU smoke run of the same code)")
    p.add_argument("--parts", default="train,scorer,anchors", help="comma-separated subset of train,scorer,anchors")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args(argv)

    import torch

    from models.train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU; use --device cpu --tiny for a smoke run")
    settings = TINY if args.tiny else FULL
    report: dict[str, Any] = {"benchmark": "gpu_check", "device": str(device), "tiny": args.tiny,
                              "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    checks = {"train": check_train, "scorer": check_scorer, "anchors": check_anchors}
    for part in [x.strip() for x in args.parts.split(",") if x.strip()]:
        if part not in checks:
            raise SystemExit(f"gpu_check: unknown part {part!r}; choose from {sorted(checks)}")
        report[part] = _run(part, checks[part], settings, device)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    return 1 if any("error" in report.get(k, {}) for k in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
