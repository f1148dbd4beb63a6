"""Fast CPU forwards of the small labelling networks: onnxruntime or frozen TorchScript, checked against eager torch.

Per core, the occlusion CNN and the FER mini-Xception run 1.6-2.5x faster in
onnxruntime than in eager PyTorch, and the MobileFaceNet attribute CNN 1.7x
faster as frozen TorchScript (conv-BN folded, oneDNN layouts;
onnxruntime is slower there: its PReLU is not fused). Each stage picks the
engine that measured fastest for its network (`benchmarks/attributes.py`).

Nothing is written to disk: the module is traced when the stage is built
(ONNX bytes in memory, or a frozen TorchScript module), onnxruntime gets as
many intra-op threads as torch uses (one torch thread per worker means one
onnxruntime thread too), and a fixed probe batch is run through both the
engine and the eager module; a larger difference than `atol` raises, so a fast
path never silently changes a label.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from models.onnx_session import providers

AUTO, TORCH, ONNX, TORCHSCRIPT = "auto", "torch", "onnx", "torchscript"
BACKENDS = (AUTO, TORCH, ONNX, TORCHSCRIPT)
OPSET = 17
PROBE_BATCH = 4  # probe inputs compared between the engine and eager torch when the engine is built


class EngineMismatchError(RuntimeError):
    """An engine's outputs differ from the eager torch module's by more than the tolerance."""


def resolve_backend(backend: str, device: str, cpu_default: str) -> str:
    """TORCH, ONNX or TORCHSCRIPT: `auto` is `cpu_default` on CPU and eager torch on any other device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    on_cpu = str(device).startswith("cpu")
    if backend in (ONNX, TORCHSCRIPT) and not on_cpu:
        raise ValueError(f"the {backend} backend runs on CPU only, got device {device!r} (use backend 'torch')")
    return (cpu_default if on_cpu else TORCH) if backend == AUTO else backend


def export_onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes of an eval-mode CPU float module traced on `example`, with a dynamic batch axis (axis 0)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
        torch.onnx.export(module, (example,), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    return buf.getvalue()


class FastForward:
    """`module(x)` for float32 numpy input (N, *input_shape) -> numpy output, by onnxruntime or TorchScript (CPU)."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int], engine: str, *, threads: int | None = None,
                 atol: float = 1e-5, seed: int = 0) -> None:
        """`engine`: ONNX or TORCHSCRIPT; `threads`: onnxruntime intra-op threads (default: torch's);
        `atol`: largest |engine - eager torch| accepted on a probe batch (inputs uniform in [-1, 1])."""
        if engine not in (ONNX, TORCHSCRIPT):
            raise ValueError(f"engine must be {ONNX!r} or {TORCHSCRIPT!r}, got {engine!r}")
        module = module.eval()
        self.engine = engine
        self.input_shape = tuple(int(s) for s in input_shape)
        self.threads = int(threads or torch.get_num_threads())
        probe = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (PROBE_BATCH, *self.input_shape))
                                 .astype(np.float32))
        self._run: Callable[[np.ndarray], np.ndarray] = (
            self._onnx(module, probe) if engine == ONNX else self._torchscript(module, probe))
        with torch.inference_mode():
            expected = module(probe).float().numpy()
        self.max_probe_diff = float(np.abs(self(probe.numpy()) - expected).max())
        if not self.max_probe_diff <= atol:
            raise EngineMismatchError(f"{engine} differs from eager torch by {self.max_probe_diff:.3g} (> {atol}) "
                                      f"on the probe batch of {type(module).__name__}")

    def _onnx(self, module: nn.Module, probe: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(export_onnx_bytes(module, probe[:1]), options, providers=providers("cpu"))
        return lambda x: session.run(None, {"x": x})[0]

    @staticmethod
    def _torchscript(module: nn.Module, probe: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notices
            traced = torch.jit.trace(module, probe, check_trace=False)  # checked below against eager torch
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out: Any = frozen(torch.from_numpy(x)).float().numpy()
            return out

        return run

    def __call__(self, x: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if arr.shape[1:] != self.input_shape:
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {arr.shape}")
        return self._run(arr)


def batched(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """`forward` over a non-empty `x` in chunks of `batch_size` along axis 0, concatenated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("batched() needs at least one input")
    return np.concatenate([forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
