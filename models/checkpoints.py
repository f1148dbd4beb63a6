"""Checkpoint files: atomic writes, and loads that run no code (torch.load with weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from data_manifest.writer import atomic_write


def save(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint dict atomically (temp file + rename): readers never see a partial file."""
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike[str], fmt: str, what: str) -> dict[str, Any]:
    """Load a checkpoint dict of format `fmt`; a file that carries code, or another format, is refused."""
    p = Path(path)
    if p.is_dir():
        found = ", ".join(sorted(x.name for x in p.glob("*.pt"))[:5]) or "none"
        raise IsADirectoryError(f"{what} {p} is a directory, not a checkpoint file (.pt files in it: {found})")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for code-carrying or corrupt files
        raise ValueError(f"refusing checkpoint {p} ({what}): not a plain weights file ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise ValueError(f"{p} is not {article} {what} (format {found!r}, expected {fmt!r})")
    return ckpt
