"""onnxruntime sessions: execution providers for a device string, and one checked way to open a model.

Imports only onnxruntime (lazily), so the torch-free ONNX scorer can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("ONNX models need `pip install onnxruntime` (or onnxruntime-gpu)") from e
    return onnxruntime


def providers(device: str | None) -> list[Any]:
    """Execution providers for a device string: cpu, cuda[:N], or auto/None (CUDA first when available)."""
    available = _ort().get_available_providers()
    if device in (None, "auto"):
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ValueError(f"device {device!r} requested but onnxruntime has only {available} "
                             "(install onnxruntime-gpu)")
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    raise ValueError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N")


def open_session(path: str | os.PathLike[str], *, device: str | None = "cpu",
                 provider_list: list[Any] | None = None, what: str = "ONNX model") -> Any:
    """An InferenceSession on `path`; a missing or unloadable file raises an error naming it."""
    ort = _ort()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        return ort.InferenceSession(str(p), providers=provider_list or providers(device))
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ValueError(f"{what} {p} could not be loaded: {e}") from e
