"""One torch device resolver for every model, stage and flow: "auto" means CUDA when torch sees one."""

from __future__ import annotations

from typing import Any


def resolve_device(device: Any = "auto") -> Any:
    """A torch.device from "auto"/None (CUDA when present), "cpu", "cuda", "cuda:N" or a torch.device."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return dev
