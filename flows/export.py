"""`fiqa export --onnx model.onnx`: a checkpoint's whole scorer as one ONNX graph (runs no flow).

The graph takes uint8 RGB crops (B, H, W, 3) and returns score (B,), quality
(B, 5) and the 360 prompt probabilities (B, 360); `models.scorer_onnx.OnnxScorer`
runs it with onnxruntime alone. `--verify` compares it with the torch scorer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a CLIB-FIQA checkpoint (.pt)")
    p.add_argument("--onnx", required=True, type=Path, help="output ONNX file")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--verify", type=int, default=8, metavar="N",
                   help="score N random crops with torch and onnxruntime and report the largest difference (0: skip)")


def verify(checkpoint: str, onnx_path: Path, n: int, size: int = 112, seed: int = 0) -> float:
    """Largest |torch score - onnxruntime score| over n random crops."""
    from models.scorer import load
    from models.scorer_onnx import OnnxScorer

    crops = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    a = load(checkpoint, device="cpu").score(crops).score
    b = OnnxScorer(onnx_path).score(crops).score
    return float(np.abs(a - b).max())


def run_cli(args: argparse.Namespace) -> int:
    from models.scorer import export_onnx

    out = export_onnx(args.checkpoint, args.onnx, opset=args.opset)
    report = {"onnx": str(out), "bytes": out.stat().st_size}
    if args.verify > 0:
        report["max_abs_score_diff"] = verify(args.checkpoint, out, args.verify)
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.export", description=(__doc__ or "").strip())
    configure_parser(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
