"""Packed crop files: aligned 112x112 RGB crops stored N at a time as uint8 .npy arrays.

A pack is memory-mappable, so training data loaders read single crops without
decoding; `faces` rows point at (crop_file, crop_index).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_manifest.workspace import Workspace
from data_manifest.writer import atomic_write, check_name, shard_name

CROP_SIZE = 112


def write_pack(ws: Workspace, run_id: str, shard: str | int, crops: np.ndarray, *, kind: str = "faces") -> str:
    """Atomically write a (N, H, W, 3) uint8 pack; returns its path relative to the workspace root."""
    arr = np.asarray(crops)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"write_pack: expected (N, H, W, 3) uint8 crops, got {arr.dtype} {arr.shape}")
    rel = (Path("crops") / check_name(kind, "pack kind") / check_name(run_id, "run id")
           / f"part-{shard_name(shard)}.npy")

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)

    atomic_write(ws.root / rel, _save)
    return rel.as_posix()


class PackReader:
    """Reads crops from packs through a small cache of memory maps (safe to use per worker); in a store's
    workspace, a pack missing from the cache is pulled from the store first."""

    def __init__(self, ws: Workspace | str | Path, max_open: int = 64) -> None:
        self.ws = ws if isinstance(ws, Workspace) else None
        self.root = ws.root if isinstance(ws, Workspace) else Path(ws)
        self.max_open = max_open
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def _map(self, rel: str) -> np.ndarray:
        m = self._maps.get(rel)
        if m is None:
            path = (self.root / rel).resolve()
            if not path.is_relative_to(self.root):
                raise ValueError(f"crop file {rel!r} lies outside the workspace {self.root}")
            if not path.exists() and self.ws is not None:
                self.ws.local(rel)  # a store's workspace: a pack committed by another machine, pulled now
            if not path.exists():
                raise FileNotFoundError(f"crop pack {path} is missing (was the align run deleted?)")
            m = np.load(path, mmap_mode="r", allow_pickle=False)
            self._maps[rel] = m
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(rel)
        return m

    def read(self, rel: str, indices: int | np.ndarray | list[int]) -> np.ndarray:
        """One crop (H, W, 3) for an int index, else a (len(indices), H, W, 3) copy."""
        m = self._map(rel)
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= len(m)):
            raise IndexError(f"crop index {indices} out of range for {rel} ({len(m)} crops)")
        return np.array(m[idx])


def read_crops(ws: Workspace, rel: str, indices: int | np.ndarray | list[int]) -> np.ndarray:
    """Read crops from one pack (convenience wrapper around PackReader)."""
    return PackReader(ws).read(rel, indices)
