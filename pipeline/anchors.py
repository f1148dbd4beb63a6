"""CR-FIQA-style quality anchors from any face recognition model's embeddings.

For sample i with embedding e_i and identity y_i, given one center per identity:

- ccs   = cos(e_i, C_{y_i})                       (class-center similarity)
- nnccs = max_{k != y_i} cos(e_i, C_k)            (nearest negative class-center similarity)
- raw   = ccs / nnccs                             (``mode="ratio"``: the CLIB-FIQA paper's Sim/Sim)
        = ccs / (nnccs + 1 + eps)                 (``mode="shifted"``: CR-FIQA paper's Eq. 3 form)
- anchor = (raw - min) / (max - min), min/max over the valid rows of the labelled set.

Degenerate rows (documented in docs/anchors.md) never vanish; they get a status:

- ``ok``: anchor defined.
- ``clamped`` (ratio mode): nnccs <= ``nnccs_floor``. The ratio is meaningless there (its sign flips
  at 0 and it explodes near 0), so raw uses the floor as the denominator, the row is left out of the
  min/max, and its anchor is clipped into [0, 1] (1 when ccs > 0: the sample is closer to its own
  center than to every other one).
- ``single_sample``: mean centers and an identity with one sample: its center *is* the sample, so
  ccs == 1 by construction. raw is reported, the anchor is null and the row is left out of min/max.
- ``no_identity``: label < 0 (unknown identity). ``no_center``: the label's center is a zero row.
  ``no_negative``: no other valid center exists. ``invalid_embedding``: non-finite or zero
  embedding. These have null measures.

Centers come from :class:`CenterAccumulator` (streaming normalised means, never holding all
embeddings) or :func:`centers_from_head` (a classifier weight matrix: the paper's "classification
space center"). The nearest-negative search (:class:`NearestNegativeSearch`) runs in
(sample chunk x center block) tiles with torch on CPU or GPU, so its memory is bounded by
``chunk_size * center_block`` floats plus the centers, independent of the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.arrays import l2_normalize

OK = "ok"
CLAMPED = "clamped"
SINGLE_SAMPLE = "single_sample"
NO_IDENTITY = "no_identity"
NO_NEGATIVE = "no_negative"
NO_CENTER = "no_center"
INVALID_EMBEDDING = "invalid_embedding"

MODES = ("ratio", "shifted")
CENTER_MEAN = "mean"
CENTER_HEAD = "head"

DEFAULT_CHUNK = 2048  # samples per tile
DEFAULT_CENTER_BLOCK = 16384  # centers per tile: tile = 2048 x 16384 float32 = 128 MiB at most
DEFAULT_NNCCS_FLOOR = 0.05  # below this cosine the ratio ccs/nnccs is not a usable quality signal
SHIFT_EPS = 1e-9


def _as_2d_float(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    return arr


def _as_labels(x: Any, n: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"labels must be a 1-D array of length {n}, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers (identity index per sample), got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class CenterAccumulator:
    """Streaming per-identity embedding sums: update shard by shard, then read normalised means.

    Memory is (num_classes x dim) float64 whatever the number of samples; accumulators of
    separate workers combine with :meth:`merge`, and :meth:`save`/:meth:`load` make a pass resumable.
    """

    def __init__(self, dim: int, num_classes: int = 0) -> None:
        if dim <= 0:
            raise ValueError(f"CenterAccumulator: dim must be positive, got {dim}")
        self.dim = int(dim)
        self.sums = np.zeros((max(int(num_classes), 0), self.dim), dtype=np.float64)
        self.counts = np.zeros(len(self.sums), dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def _grow(self, n: int) -> None:
        if n <= self.num_classes:
            return
        new = max(n, int(self.num_classes * 1.5) + 1)
        sums = np.zeros((new, self.dim), dtype=np.float64)
        sums[: self.num_classes] = self.sums
        counts = np.zeros(new, dtype=np.int64)
        counts[: self.num_classes] = self.counts
        self.sums, self.counts = sums, counts

    def update(self, embeddings: Any, labels: Any) -> None:
        """Add one shard: embeddings are L2-normalised first; rows with label < 0 or bad values are skipped."""
        emb = _as_2d_float(embeddings, "embeddings")
        if emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {emb.shape[1]}, the accumulator has dim {self.dim}")
        lab = _as_labels(labels, len(emb))
        emb = l2_normalize(emb)
        keep = (lab >= 0) & np.isfinite(emb).all(axis=1) & (np.abs(emb).sum(axis=1) > 0)
        if not keep.any():
            return
        emb, lab = emb[keep], lab[keep]
        top = int(lab.max()) + 1
        size = self.num_classes
        if top > size:
            self._grow(top)
            size = top
        np.add.at(self.sums, lab, emb.astype(np.float64))
        self.counts += np.bincount(lab, minlength=self.num_classes)[: self.num_classes]

    def merge(self, other: CenterAccumulator) -> CenterAccumulator:
        """Add another accumulator's sums (same dim) into this one."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dim {self.dim} and {other.dim}")
        self._grow(other.num_classes)
        self.sums[: other.num_classes] += other.sums
        self.counts[: other.num_classes] += other.counts
        return self

    def centers(self) -> np.ndarray:
        """(num_classes, dim) float32 normalised mean embeddings; identities without samples are zero rows."""
        return l2_normalize(self.sums)

    def save(self, path: str | Path) -> None:
        """Write sums and counts to an .npz file (no pickles)."""
        np.savez(path, sums=self.sums, counts=self.counts)

    @classmethod
    def load(cls, path: str | Path) -> CenterAccumulator:
        """Read an accumulator written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            sums, counts = z["sums"], z["counts"]
        acc = cls(sums.shape[1], 0)
        acc.sums, acc.counts = sums.astype(np.float64), counts.astype(np.int64)
        return acc


_HEAD_KEYS = ("weight", "kernel", "fc.weight", "classifier.weight", "head.weight")


def _find_head_tensor(obj: Any, path: str) -> tuple[str, Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return "tensor", obj
    if not isinstance(obj, dict):
        raise ValueError(f"head checkpoint {path}: expected a tensor or a state dict, got {type(obj).__name__}")
    for nest in ("state_dict", "model", "header", "state_dict_softmax_fc"):
        if isinstance(obj.get(nest), dict):
            obj = obj[nest]
            break
    flat = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in _HEAD_KEYS:
        if key in flat and flat[key].ndim == 2:
            return key, flat[key]
    mats = [(k, v) for k, v in flat.items() if v.ndim == 2]
    if len(mats) == 1:
        return mats[0]
    raise ValueError(
        f"head checkpoint {path}: cannot tell which tensor is the classifier weight; 2-D tensors: "
        f"{[(k, tuple(v.shape)) for k, v in mats]}; expected one named {list(_HEAD_KEYS)}"
    )


def centers_from_head(path: str | Path, dim: int) -> np.ndarray:
    """Class centers (C, dim) from a classifier head checkpoint: the classification-space centers.

    Accepts a .npy (C, D) matrix, or a torch file (loaded with ``weights_only=True``) holding a
    tensor or a state dict with an arcface_torch-style ``weight`` (C, D) or a CR-FIQA-style
    ``kernel`` (D, C); the orientation is taken from ``dim`` (the embedding size).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"head checkpoint {p} does not exist")
    if p.suffix == ".npy":
        w = np.load(p, allow_pickle=False)
        key = "npy"
    else:
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a bad file
            raise ValueError(f"head checkpoint {p} could not be loaded as a torch file: {e}") from e
        key, t = _find_head_tensor(obj, str(p))
        w = t.detach().float().cpu().numpy()
    if w.ndim != 2:
        raise ValueError(f"head checkpoint {p}: weight {key!r} has shape {w.shape}, expected 2-D")
    if key == "kernel" and w.shape[0] == dim:
        w = w.T
    elif w.shape[1] != dim and w.shape[0] == dim:
        w = w.T
    if w.shape[1] != dim:
        raise ValueError(f"head checkpoint {p}: weight {key!r} has shape {w.shape}; neither axis equals dim {dim}")
    return l2_normalize(w)


class NearestNegativeSearch:
    """ccs, nnccs and the nearest negative center per sample, in bounded-memory tiles.

    Centers stay on the device; each call takes one chunk of samples (any size: it is tiled again
    into ``chunk_size`` rows) and never materialises more than ``chunk_size x center_block`` scores.
    Zero rows of ``centers`` (identities without samples) are never chosen as negatives.
    """

    def __init__(self, centers: Any, *, chunk_size: int = DEFAULT_CHUNK,
                 center_block: int = DEFAULT_CENTER_BLOCK, device: Any = "cpu") -> None:
        import torch

        c = _as_2d_float(centers, "centers")
        if chunk_size <= 0 or center_block <= 0:
            raise ValueError(f"chunk_size and center_block must be positive, got {chunk_size}, {center_block}")
        from models.devices import resolve_device

        self.device = resolve_device(device)
        self.chunk_size = int(chunk_size)
        self.center_block = int(center_block)
        norms = np.linalg.norm(c, axis=1)
        self.valid = np.isfinite(norms) & (norms > 0)
        self.centers = torch.from_numpy(l2_normalize(np.where(self.valid[:, None], c, 0.0))).to(self.device)
        self._invalid = torch.from_numpy(~self.valid).to(self.device)
        self._any_invalid = bool((~self.valid).any())
        self.num_centers, self.dim = c.shape

    def search(self, embeddings: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (ccs, nnccs, nearest_negative) for a chunk; NaN / -1 where undefined."""
        import torch

        emb = _as_2d_float(embeddings, "embeddings")
        if emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {emb.shape[1]} but centers have dim {self.dim}")
        lab = _as_labels(labels, len(emb))
        if lab.size and lab.max() >= self.num_centers:
            raise ValueError(f"label {int(lab.max())} has no center (only {self.num_centers} centers)")
        n = len(emb)
        ccs = np.full(n, np.nan, dtype=np.float32)
        nnccs = np.full(n, np.nan, dtype=np.float32)
        nn = np.full(n, -1, dtype=np.int64)
        with torch.inference_mode():
            for s in range(0, n, self.chunk_size):
                e = torch.from_numpy(l2_normalize(emb[s : s + self.chunk_size])).to(self.device)
                y = torch.from_numpy(lab[s : s + self.chunk_size]).to(self.device)
                rows = torch.arange(len(e), device=self.device)
                known = y >= 0
                own = self.centers[y.clamp(min=0)]
                c_s = (e * own).sum(dim=1)
                best = torch.full((len(e),), -torch.inf, device=self.device)
                arg = torch.full((len(e),), -1, dtype=torch.int64, device=self.device)
                for b in range(0, self.num_centers, self.center_block):
                    block = self.centers[b : b + self.center_block]
                    sim = e @ block.T
                    if self._any_invalid:
                        sim[:, self._invalid[b : b + self.center_block]] = -torch.inf
                    inside = known & (y >= b) & (y < b + len(block))
                    sim[rows[inside], y[inside] - b] = -torch.inf
                    v, i = sim.max(dim=1)
                    better = v > best
                    best = torch.where(better, v, best)
                    arg = torch.where(better, i + b, arg)
                ccs[s : s + len(e)] = c_s.float().cpu().numpy()
                nnccs[s : s + len(e)] = best.float().cpu().numpy()
                nn[s : s + len(e)] = arg.cpu().numpy()
        nnccs[~np.isfinite(nnccs)] = np.nan
        return ccs, nnccs, nn


def raw_ratio(ccs: np.ndarray, nnccs: np.ndarray, *, mode: str = "ratio",
              nnccs_floor: float = DEFAULT_NNCCS_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """raw quality ratio and a mask of rows whose nnccs was clamped to the floor (ratio mode only)."""
    ccs = np.asarray(ccs, dtype=np.float64)
    nnccs = np.asarray(nnccs, dtype=np.float64)
    if mode == "ratio":
        if not nnccs_floor > 0:
            raise ValueError(f"nnccs_floor must be > 0 in ratio mode, got {nnccs_floor}")
        clamped = nnccs <= nnccs_floor
        return ccs / np.where(clamped, nnccs_floor, nnccs), clamped
    if mode == "shifted":
        return ccs / (nnccs + 1.0 + SHIFT_EPS), np.zeros(len(ccs), dtype=bool)
    raise ValueError(f"unknown anchor mode {mode!r}; use one of {MODES}")


@dataclass
class RangeAccumulator:
    """Running min/max of raw over the rows that define the normalisation (streamable)."""

    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0

    def update(self, raw: np.ndarray, use: np.ndarray) -> None:
        v = np.asarray(raw, dtype=np.float64)[np.asarray(use, dtype=bool)]
        v = v[np.isfinite(v)]
        if v.size:
            self.lo = min(self.lo, float(v.min()))
            self.hi = max(self.hi, float(v.max()))
            self.count += int(v.size)

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("no valid rows to take the min/max normalisation range from")
        return self.lo, self.hi


def normalize(raw: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max normalise into [0, 1] (values outside the range are clipped); hi == lo gives 0.5."""
    raw = np.asarray(raw, dtype=np.float64)
    if hi > lo:
        return np.clip((raw - lo) / (hi - lo), 0.0, 1.0)
    return np.where(np.isfinite(raw), 0.5, np.nan)


def row_status(labels: np.ndarray, emb_ok: np.ndarray, own_ok: np.ndarray, nnccs: np.ndarray,
               clamped: np.ndarray, singleton: np.ndarray) -> np.ndarray:
    """Status per row; the first failing check wins: embedding, identity, center, negative, singleton, clamp."""
    status = np.full(len(labels), OK, dtype=object)
    status[clamped] = CLAMPED
    status[singleton] = SINGLE_SAMPLE
    status[~np.isfinite(nnccs)] = NO_NEGATIVE
    status[~own_ok] = NO_CENTER
    status[labels < 0] = NO_IDENTITY
    status[~emb_ok] = INVALID_EMBEDDING
    return status


UNDEFINED = (NO_IDENTITY, NO_CENTER, NO_NEGATIVE, INVALID_EMBEDDING)


@dataclass
class AnchorStats:
    """Per-row measures of one chunk before normalisation (what the flow persists between passes)."""

    ccs: np.ndarray
    nnccs: np.ndarray
    nearest_negative: np.ndarray
    raw: np.ndarray
    status: np.ndarray

    @property
    def defines_range(self) -> np.ndarray:
        """Rows whose raw sets the min/max: status ok."""
        return self.status == OK


def anchor_stats(search: NearestNegativeSearch, embeddings: Any, labels: Any, *,
                 class_counts: np.ndarray | None = None, mode: str = "ratio",
                 nnccs_floor: float = DEFAULT_NNCCS_FLOOR) -> AnchorStats:
    """Nearest-negative search plus raw ratio and status for one chunk.

    ``class_counts`` (samples per identity) marks single-sample identities; pass None for head centers.
    """
    emb = _as_2d_float(embeddings, "embeddings")
    lab = _as_labels(labels, len(emb))
    norms = np.linalg.norm(emb, axis=1)
    emb_ok = np.isfinite(emb).all(axis=1) & (norms > 0)
    ccs, nnccs, nn = search.search(np.where(emb_ok[:, None], emb, 0.0).astype(np.float32), lab)
    known = lab >= 0
    own_ok = np.ones(len(lab), dtype=bool)
    own_ok[known] = search.valid[lab[known]]
    raw, clamped = raw_ratio(ccs, nnccs, mode=mode, nnccs_floor=nnccs_floor)
    singleton = np.zeros(len(lab), dtype=bool)
    if class_counts is not None:
        singleton[known] = np.asarray(class_counts)[lab[known]] == 1
    status = row_status(lab, emb_ok, own_ok, nnccs, clamped, singleton)
    undefined = np.isin(status, UNDEFINED)
    ccs = np.where(undefined, np.nan, ccs)
    nnccs = np.where(undefined, np.nan, nnccs)
    nn = np.where(undefined, -1, nn)
    raw = np.where(undefined, np.nan, raw)
    return AnchorStats(ccs.astype(np.float32), nnccs.astype(np.float32), nn.astype(np.int64), raw, status)


def anchor_values(raw: np.ndarray, status: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Anchors given the global range: NaN unless status is ok or clamped (or the range is undefined)."""
    raw = np.asarray(raw, dtype=np.float64)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return np.full(len(raw), np.nan)
    return np.where(np.isin(np.asarray(status), [OK, CLAMPED]), normalize(raw, lo, hi), np.nan)


def finalize(stats: AnchorStats, lo: float, hi: float) -> np.ndarray:
    """Anchors for one chunk of :class:`AnchorStats` given the global range."""
    return anchor_values(stats.raw, stats.status, lo, hi)


def _to_table(stats: AnchorStats, anchor: np.ndarray, lo: float, hi: float, meta: dict[str, str]) -> pa.Table:
    def col(x: np.ndarray, typ: pa.DataType) -> pa.Array:
        x = np.asarray(x)
        mask = ~np.isfinite(x) if np.issubdtype(x.dtype, np.floating) else x < 0
        return pa.array(x, type=typ, mask=mask)

    tbl = pa.table({
        "ccs": col(stats.ccs, pa.float32()),
        "nnccs": col(stats.nnccs, pa.float32()),
        "nearest_negative": col(stats.nearest_negative, pa.int64()),
        "raw": col(stats.raw, pa.float64()),
        "anchor": col(anchor, pa.float64()),
        "status": pa.array(stats.status.astype(str), type=pa.string()),
    })
    return tbl.replace_schema_metadata({"norm_min": repr(lo), "norm_max": repr(hi), **meta})


def compute_anchors(embeddings: Any, labels: Any, centers: Any | None = None, *,
                    chunk_size: int = DEFAULT_CHUNK, center_block: int = DEFAULT_CENTER_BLOCK,
                    mode: str = "ratio", nnccs_floor: float = DEFAULT_NNCCS_FLOOR,
                    norm_range: tuple[float, float] | None = None, device: Any = "cpu") -> pa.Table:
    """Quality anchors for an in-memory labelled set: :class:`StreamingAnchors` over one shard.

    Args:
        embeddings: (N, D) float array (normalised here).
        labels: (N,) integer identity per row, < 0 unknown; with ``centers`` row k is the center of label k.
        centers: optional (C, D) centers (e.g. :func:`centers_from_head`); default: normalised mean per
            label (any non-negative label values; ``nearest_negative`` reports label values).
        norm_range: reuse a recorded (min, max) instead of taking it from this set.

    Returns a pyarrow Table with columns ccs, nnccs, nearest_negative, raw, anchor, status (nulls where
    undefined); its schema metadata holds norm_min, norm_max, mode and center_source.
    """
    emb = _as_2d_float(embeddings, "embeddings")
    lab = _as_labels(labels, len(emb))
    if centers is not None:
        cen = _as_2d_float(centers, "centers")
        if lab.size and lab.max() >= len(cen):
            raise ValueError(f"label {int(lab.max())} has no center (only {len(cen)} centers)")
    acc = StreamingAnchors(emb.shape[1], identities=lab if centers is None else None,
                           head=None if centers is None else cen, mode=mode, nnccs_floor=nnccs_floor,
                           chunk_size=chunk_size, center_block=center_block, device=device)
    acc.add(emb, lab)
    stats = acc.search(emb, lab)
    if norm_range is None:
        acc.observe(stats.raw, stats.status)
        lo, hi = acc.norm_range()
    else:
        lo, hi = (float(v) for v in norm_range)
    anchor = finalize(stats, lo, hi)
    return _to_table(stats, anchor, lo, hi, {"mode": mode, "center_source": acc.source,
                                             "nnccs_floor": repr(nnccs_floor)})


NO_EMBEDDING = "no_embedding"


class IdentityIndex:
    """Identity value <-> center row: dense ranks of the sorted identities (mean centers) or the identity itself."""

    def __init__(self, identities: np.ndarray | None) -> None:
        self.ids = identities  # sorted unique identities >= 0, or None when identity == center row

    def dense(self, ident: np.ndarray) -> np.ndarray:
        """Center row per identity (-1 for unknown or absent identities)."""
        ident = np.asarray(ident, dtype=np.int64)
        if self.ids is None:
            return ident
        if len(self.ids) == 0:
            return np.full(len(ident), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ident), 0, len(self.ids) - 1)
        return np.where((ident >= 0) & (self.ids[pos] == ident), pos, -1)

    def identity(self, dense: np.ndarray) -> np.ndarray:
        """Identity value per center row (-1 stays -1)."""
        dense = np.asarray(dense, dtype=np.int64)
        if self.ids is None:
            return dense
        if len(self.ids) == 0:
            return np.full(len(dense), -1, dtype=np.int64)
        return np.where(dense >= 0, self.ids[np.clip(dense, 0, None)], -1)


class StreamingAnchors:
    """The four anchor steps shard by shard in bounded memory: centers, search, range, normalise.

    1. :meth:`add` every shard's embeddings (mean centers; a no-op with classifier-head centers);
    2. :meth:`search` each shard: ccs, nnccs, nearest negative (identity values), raw and status;
    3. :meth:`observe` each shard's raw/status to grow the global min/max, read by :meth:`norm_range`;
    4. :func:`anchor_values` with that range turns each shard's raw into anchors.
    Memory holds the centers and one shard whatever the number of shards; identities are any integers
    (< 0 unknown), mapped to center rows here. Rows flagged not ``ok`` get status ``no_embedding``.
    """

    def __init__(self, dim: int, *, identities: Any = None, head: Any = None, mode: str = "ratio",
                 nnccs_floor: float = DEFAULT_NNCCS_FLOOR, chunk_size: int = DEFAULT_CHUNK,
                 center_block: int = DEFAULT_CENTER_BLOCK, device: Any = "cpu") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown anchor mode {mode!r}; use one of {MODES}")
        if (identities is None) == (head is None):
            raise ValueError("give the selection's identities (mean centers) or head centers, exactly one")
        self.dim, self.mode, self.nnccs_floor = max(int(dim), 1), mode, nnccs_floor
        self._search_args = {"chunk_size": chunk_size, "center_block": center_block, "device": device}
        self._searcher: NearestNegativeSearch | None = None
        self._counts: np.ndarray | None = None  # samples per center row of restored mean centers (for_search)
        self.range = RangeAccumulator()
        if head is None:
            ids = np.unique(np.asarray(identities, dtype=np.int64))
            self.index = IdentityIndex(ids[ids >= 0])
            self._acc: CenterAccumulator | None = CenterAccumulator(self.dim, len(self.index.ids))
            self._head = None
            self.source = CENTER_MEAN
        else:
            self.index = IdentityIndex(None)
            self._acc = None
            self._head = _as_2d_float(head, "head centers")
            if self._head.shape[1] != self.dim:
                raise ValueError(f"head centers have dim {self._head.shape[1]}, embeddings have dim {self.dim}")
            self.source = CENTER_HEAD

    @staticmethod
    def _ok(embeddings: Any, ok: Any) -> tuple[np.ndarray, np.ndarray]:
        emb = _as_2d_float(embeddings, "embeddings")
        good = np.ones(len(emb), dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
        if good.shape != (len(emb),):
            raise ValueError(f"ok mask must have {len(emb)} entries, got shape {good.shape}")
        return emb, good

    def add(self, embeddings: Any, identities: Any, ok: Any = None) -> None:
        """Step 1: add one shard to the per-identity sums (rows with ``ok`` False are left out)."""
        if self._acc is None:
            return
        if self._searcher is not None:
            raise RuntimeError("the centers are final once the search has started")
        emb, good = self._ok(embeddings, ok)
        dense = self.index.dense(_as_labels(identities, len(emb)))
        self._acc.update(emb[good], dense[good])

    def add_sums(self, identities: Any, sums: Any, counts: Any) -> None:
        """Step 1 from shard tasks: one shard's per-identity sums (:func:`shard_sums`), added in shard order."""
        if self._acc is None:
            return
        if self._searcher is not None:
            raise RuntimeError("the centers are final once the search has started")
        dense = self.index.dense(_as_labels(identities, len(counts)))
        keep = dense >= 0  # an identity outside the selection has no center row
        self._acc.sums[dense[keep]] += np.asarray(sums, dtype=np.float64)[keep]
        self._acc.counts[dense[keep]] += np.asarray(counts, dtype=np.int64)[keep]

    def search_state(self) -> dict[str, np.ndarray]:
        """What a search in another process needs (:meth:`for_search`): the centers, samples per center row
        (mean centers) and the identity of each center row (mean centers), as plain arrays."""
        counts, ids = self.class_counts, self.index.ids
        return {"centers": self.centers(), "counts": np.zeros(0, np.int64) if counts is None else counts,
                "ids": np.zeros(0, np.int64) if ids is None else ids,
                "has": np.array([counts is not None, ids is not None])}

    @classmethod
    def for_search(cls, state: dict[str, np.ndarray], *, mode: str = "ratio",
                   nnccs_floor: float = DEFAULT_NNCCS_FLOOR, chunk_size: int = DEFAULT_CHUNK,
                   center_block: int = DEFAULT_CENTER_BLOCK, device: Any = "cpu") -> StreamingAnchors:
        """Steps 2-3 only, from a :meth:`search_state`: searches exactly as the instance that saved it."""
        centers = np.asarray(state["centers"], dtype=np.float32)
        obj = cls(centers.shape[1], head=centers, mode=mode, nnccs_floor=nnccs_floor, chunk_size=chunk_size,
                  center_block=center_block, device=device)
        has_counts, has_ids = (bool(x) for x in state["has"])
        obj._counts = np.asarray(state["counts"], dtype=np.int64) if has_counts else None
        obj.index = IdentityIndex(np.asarray(state["ids"], dtype=np.int64) if has_ids else None)
        obj.source = CENTER_MEAN if has_counts else CENTER_HEAD
        return obj

    @property
    def num_centers(self) -> int:
        """Identities with a center: those of the selection (mean centers) or the head's rows."""
        return len(self._acc.counts) if self._acc is not None else len(self._head)  # type: ignore[arg-type]

    @property
    def class_counts(self) -> np.ndarray | None:
        """Samples per center row (mean centers), None for head centers."""
        return self._counts if self._acc is None else self._acc.counts

    def centers(self) -> np.ndarray:
        """The (C, D) centers; one zero row (never a negative) when no identity has a sample."""
        if self._acc is None:
            return self._head  # type: ignore[return-value]
        cen = self._acc.centers()
        return cen if len(cen) else np.zeros((1, self.dim), dtype=np.float32)

    def search(self, embeddings: Any, identities: Any, ok: Any = None) -> AnchorStats:
        """Steps 2-3 for one shard: measures and status per row; ``nearest_negative`` holds identity values."""
        emb, good = self._ok(embeddings, ok)
        ident = _as_labels(identities, len(emb))
        if self._searcher is None:
            self._searcher = NearestNegativeSearch(self.centers(), **self._search_args)
        dense = self.index.dense(ident)
        beyond = dense >= self._searcher.num_centers  # head centers: an identity without a classifier row
        clean = np.where(good[:, None], emb, 0.0).astype(np.float32)  # non-finite rows are flagged invalid
        stats = anchor_stats(self._searcher, clean, np.where(beyond, -1, dense), class_counts=self.class_counts,
                             mode=self.mode, nnccs_floor=self.nnccs_floor)
        status = stats.status.astype(object)
        status[beyond & good] = NO_CENTER
        status[~good] = NO_EMBEDDING
        stats.status = status
        stats.nearest_negative = self.index.identity(stats.nearest_negative)
        return stats

    def observe(self, raw: Any, status: Any) -> None:
        """Step 3: grow the normalisation range with one shard's ``ok`` rows."""
        self.range.update(np.asarray(raw, dtype=np.float64), np.asarray(status, dtype=object) == OK)

    def norm_range(self) -> tuple[float, float]:
        """The global (min, max) of raw over the observed ``ok`` rows; NaN when there is none."""
        return self.range.range() if self.range.count else (float("nan"), float("nan"))


def shard_sums(embeddings: Any, identities: Any, ok: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's part of step 1, for :meth:`StreamingAnchors.add_sums`: its identities (sorted), their
    sums of L2-normalised embeddings (float64) and sample counts; rows with ``ok`` False are left out."""
    emb, good = StreamingAnchors._ok(embeddings, ok)
    lab = np.where(good, _as_labels(identities, len(emb)), -1)
    ids = np.unique(lab[lab >= 0])
    acc = CenterAccumulator(emb.shape[1], len(ids))
    acc.update(emb, np.where(lab >= 0, np.searchsorted(ids, lab), -1))
    return ids, acc.sums[: len(ids)], acc.counts[: len(ids)]


STATS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("identity", pa.int64()), ("ccs", pa.float32()), ("nnccs", pa.float32()),
    ("nearest_negative", pa.int64()), ("raw", pa.float64()), ("status", pa.string()), ("error", pa.string()),
])


def stats_table(sample_ids: Any, identities: np.ndarray, stats: AnchorStats, errors: list[str | None]) -> pa.Table:
    """One shard's per-row measures (what the flow persists between the search and normalisation passes)."""
    ident = np.asarray(identities, dtype=np.int64)
    nn = np.asarray(stats.nearest_negative, dtype=np.int64)
    err = [e if s == NO_EMBEDDING else None for e, s in zip(errors, stats.status, strict=True)]
    return pa.table({
        "sample_id": sample_ids, "identity": pa.array(ident, pa.int64()),
        "ccs": pa.array(stats.ccs, pa.float32(), mask=~np.isfinite(stats.ccs)),
        "nnccs": pa.array(stats.nnccs, pa.float32(), mask=~np.isfinite(stats.nnccs)),
        "nearest_negative": pa.array(nn, pa.int64(), mask=nn < 0),
        "raw": pa.array(stats.raw, pa.float64(), mask=~np.isfinite(stats.raw)),
        "status": pa.array(np.asarray(stats.status).astype(str)), "error": pa.array(err, pa.string()),
    }, schema=STATS_SCHEMA)


def anchor_table(stats: pa.Table, lo: float, hi: float, model_id: str, source: str) -> pa.Table:
    """Step 4 for one shard: its `anchors` rows, column-wise, from its persisted measures and the global range."""
    import pyarrow.compute as pc

    n = stats.num_rows
    raw = stats.column("raw").to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where null
    anchor = anchor_values(raw, stats.column("status").to_numpy(zero_copy_only=False), lo, hi)
    ident = stats.column("identity")

    def scalar(v: float) -> pa.Array:
        return pa.repeat(pa.scalar(v if np.isfinite(v) else None, pa.float64()), n)

    return pa.table({
        "sample_id": stats.column("sample_id"), "model_id": pa.repeat(pa.scalar(model_id, pa.string()), n),
        "identity": pc.if_else(pc.less(ident, 0), pa.scalar(None, pa.int64()), ident),
        "ccs": stats.column("ccs"), "nnccs": stats.column("nnccs"),
        "nearest_negative": stats.column("nearest_negative"), "raw": stats.column("raw"),
        "anchor": pa.array(anchor, pa.float64(), mask=~np.isfinite(anchor)),
        "norm_min": scalar(lo), "norm_max": scalar(hi), "center_source": pa.repeat(pa.scalar(source, pa.string()), n),
        "status": stats.column("status"), "error": stats.column("error"),
    })


def anchor_rows(stats: pa.Table, lo: float, hi: float, model_id: str, source: str) -> list[dict[str, Any]]:
    """:func:`anchor_table` as Python rows (for small shards and inspection)."""
    return anchor_table(stats, lo, hi, model_id, source).to_pylist()
