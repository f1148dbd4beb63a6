"""CPBD sharpness (Narvekar & Karam, IEEE TIP 2011) and the blur label stage.

`cpbd` reproduces the reference CPBD code (the MATLAB release and its Python
port) step by step, vectorised with numpy/scipy:

1. Canny edge map (scikit-image's detector with its defaults, as the Python
   port uses it) selects edge blocks: a block is an edge block when more than
   0.2 % of its pixels are Canny edges.
2. A thinned vertical Sobel edge map (Octave-style automatic threshold, as the
   port) gives the pixels whose edge width is measured.
3. Marziliano edge widths along the row, for edges whose quantised gradient
   angle is 0 or +-180 degrees, up to 101 pixels each side.
4. Per edge block: just-noticeable-blur width 5 (contrast <= 50) or 3
   (contrast > 50); P_blur = 1 - exp(-(w / w_JNB) ** 3.6).
5. CPBD = fraction of edges with P_blur <= P_JNB = 0.63 (histogram bins 0..63).

The reference keeps only whole 64x64 blocks from the top-left corner. On a
112x112 aligned face that is one block (forehead and one eye), so the blur
labeller measures widths on the whole crop but pools them over an explicit
block grid centred on the face (`FACE_GRID`, see docs/blur.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from data_manifest.vocabulary import BLUR_THRESHOLDS, FactorClass, blur_class, ordered_thresholds
from pipeline.labellers.base import ERROR, OK, FaceCrop, factor_row

# Reference constants (CPBD_compute.m).
EDGE_BLOCK_FRACTION = 0.002  # a block is an edge block if its Canny edge count > fraction * block area
BETA = 3.6  # psychometric slope of P_blur
BLOCK_SIZE = 64  # reference block side in pixels
JNB_LOW_CONTRAST_MAX = 50  # block contrast <= 50 -> JNB width 5, otherwise 3
JNB_WIDTH_LOW_CONTRAST = 5.0
JNB_WIDTH_HIGH_CONTRAST = 3.0
P_JNB_BIN = 63  # CPBD sums the P_blur histogram bins 0..63 (P_blur <= 0.63)
MAX_MARGIN = 100  # the width search stops after 101 steps on each side
_ROW_END = 2  # step "sign" at a row's last column: equal to no sign and to neither neighbour

# scikit-image canny() defaults on a float64 image (the port passes 0..255 doubles).
_CANNY_SIGMA = 1.0
_CANNY_LOW = float(np.float32(0.1))  # the non-maximum suppression receives it as a C float
_CANNY_HIGH = 0.2
_CANNY_REACH = 6  # a Canny candidate depends on the input within this many pixels
_PROOF_ROW_STEP = 16  # rows apart of the Canny rows that try to prove edge blocks (see _measure_stack)
# scipy.ndimage.gaussian_filter's kernel for sigma 1, truncate 4 (radius 4), computed as scipy does.
_GAUSS_X = np.arange(-4, 5)
_GAUSS_W = np.exp(-0.5 / (_CANNY_SIGMA * _CANNY_SIGMA) * _GAUSS_X**2)
_GAUSS_W = _GAUSS_W / _GAUSS_W.sum()

# Octave/port Sobel: skimage HSOBEL_WEIGHTS normalised by its L1 norm, transposed (vertical edges).
_SOBEL_V = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8.0

# ITU-R BT.601 luma weights as MATLAB's rgb2gray applies them (CPBD_compute.m converts colour this way).
_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
# The same weights in fixed point (round(w * 2**22), summing to 2**22) for whole-number RGB.
_RGB2GRAY_BITS = 22
_RGB2GRAY_FIXED = np.rint(_RGB2GRAY * 2**_RGB2GRAY_BITS).astype(np.int32)

VERSION = "1.1"  # 1.1: pixelated crops measured at their blocks' resolution; no "clear" without fine detail
CLEAR_INDEX = 2  # blur classes: hazy 0, blurry 1, clear 2 (data_manifest.vocabulary.blur_class)
_CHUNK = 16  # images per vectorised pass: bounds the working arrays of `measure_many`


@dataclass(frozen=True)
class BlockGrid:
    """A grid of `rows` x `cols` equal blocks whose top-left block starts at (`top`, `left`)."""

    top: int
    left: int
    block_height: int
    block_width: int
    rows: int
    cols: int

    @classmethod
    def reference(cls, shape: tuple[int, ...], size: int = BLOCK_SIZE) -> BlockGrid:
        """The reference layout: whole `size` x `size` blocks from the top-left corner."""
        return cls(0, 0, size, size, shape[0] // size, shape[1] // size)

    @property
    def n_blocks(self) -> int:
        return self.rows * self.cols

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError when the grid does not fit inside an image of `shape`."""
        if min(self.top, self.left, self.rows, self.cols) < 0 or min(self.block_height, self.block_width) < 1:
            raise ValueError(f"invalid block grid {self}")
        bottom = self.top + self.rows * self.block_height
        right = self.left + self.cols * self.block_width
        if bottom > shape[0] or right > shape[1]:
            raise ValueError(f"block grid {self} reaches ({bottom}, {right}), outside the image of shape {shape}")

    def tiles(self, array: np.ndarray) -> np.ndarray:
        """A view of the grid's pixels of a (..., H, W) array shaped (..., rows, block_height, cols, block_width)."""
        bh, bw = self.block_height, self.block_width
        region = array[..., self.top : self.top + self.rows * bh, self.left : self.left + self.cols * bw]
        return region.reshape(array.shape[:-2] + (self.rows, bh, self.cols, bw))

    def blocks(self, array: np.ndarray) -> np.ndarray:
        """The grid's blocks of a 2-D array, shaped (n_blocks, block_height, block_width), row-major."""
        return self.tiles(array).swapaxes(1, 2).reshape(self.n_blocks, self.block_height, self.block_width)

    def counts(self, mask: np.ndarray) -> np.ndarray:
        """Number of True pixels of a (..., H, W) mask in each block: shape (..., n_blocks), row-major."""
        per_block = np.add.reduce(np.add.reduce(self.tiles(mask), axis=-1, dtype=np.intp), axis=-2)
        return per_block.reshape(mask.shape[:-2] + (self.n_blocks,))

    def contrast(self, img: np.ndarray) -> np.ndarray:
        """Integer contrast floor(max - min) of each block of a (..., H, W) image: shape (..., n_blocks)."""
        tiles = self.tiles(img)
        spread = tiles.max(axis=-1).max(axis=-2) - tiles.min(axis=-1).min(axis=-2)  # max >= min: no wrap-around
        if spread.dtype.kind == "f":
            spread = np.floor(spread)
        return spread.reshape(img.shape[:-2] + (self.n_blocks,))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# The blur labeller's face layout on 112x112 ArcFace-aligned crops: a 96x96 region
# (rows 16..111: brows to chin; cols 8..103: cheek to cheek) tiled by 2x2 blocks of
# 48 px, so the eyes, nose and mouth each fall in a block and every edge counts once.
FACE_GRID = BlockGrid(top=16, left=8, block_height=48, block_width=48, rows=2, cols=2)


@dataclass(frozen=True)
class CpbdResult:
    """CPBD with the block statistics behind it."""

    value: float
    n_blocks: int
    n_edge_blocks: int
    n_edges: int


def as_gray(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate a 2-D grayscale image with values in 0..255 and return it as float64."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D grayscale array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer or float intensities, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if arr.dtype == np.uint8:
        return out
    lo, hi = float(out.min()), float(out.max())  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if lo < 0.0 or hi > 255.0:
        raise ValueError(f"{name} values must lie in 0..255 (CPBD's contrast table), got {lo:g}..{hi:g}")
    return out


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) in 0..255 -> uint8 gray with MATLAB rgb2gray's weights, rounded as it does on uint8."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB array of shape (H, W, 3), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"RGB image is empty (shape {arr.shape})")
    if arr.dtype != np.uint8:
        rgb64 = as_gray(arr.reshape(arr.shape[0], -1), "RGB image").reshape(arr.shape)  # validates 0..255
        if arr.dtype.kind not in "ui":
            return np.clip(np.rint(rgb64 @ _RGB2GRAY), 0.0, 255.0).astype(np.uint8)
    # Whole numbers: the same result in 22-bit fixed point (equal for all 2**24 RGB triples, see tests).
    px = arr.reshape(-1, 3).astype(np.uint8, copy=False)
    acc = px[:, 0] * _RGB2GRAY_FIXED[0]
    acc += px[:, 1] * _RGB2GRAY_FIXED[1]
    acc += px[:, 2] * _RGB2GRAY_FIXED[2]
    acc += 1 << (_RGB2GRAY_BITS - 1)
    acc >>= _RGB2GRAY_BITS
    return acc.astype(np.uint8).reshape(arr.shape[:2])


@functools.lru_cache(maxsize=8)
def _canny_bleed_over(shape: tuple[int, int]) -> np.ndarray:
    """Gaussian of an all-ones mask (zero padding) + eps: skimage's border renormalisation."""
    out = _gaussian(np.ones(shape, dtype=np.float64))
    out += np.finfo(np.float64).eps
    out.setflags(write=False)
    return out


def _gaussian(x: np.ndarray) -> np.ndarray:
    """`ndi.gaussian_filter(x, 1.0, mode="constant")` on each image of (..., H, W): the same two 1-D passes."""
    out = np.empty_like(x)
    ndi.correlate1d(x, _GAUSS_W, -2, out, mode="constant", cval=0.0)
    ndi.correlate1d(out, _GAUSS_W, -1, out, mode="constant", cval=0.0)
    return out


def _canny_gradients(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """skimage canny's smoothing (border-renormalised Gaussian) and Sobel gradients + magnitude, per (H, W) image."""
    smoothed = _gaussian(img)
    smoothed /= _canny_bleed_over(img.shape[-2:])
    return _gradients(smoothed)


def _gradients(smoothed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sobel gradients along rows and columns of smoothed (..., H, W) images, and their magnitude."""
    isobel, jsobel = _sobel_pair(smoothed)
    magnitude = isobel * isobel
    magnitude += jsobel * jsobel
    np.sqrt(magnitude, out=magnitude)
    return isobel, jsobel, magnitude


def _pad_edge(x: np.ndarray) -> np.ndarray:
    """Pad each (H, W) image by one pixel repeating its border (scipy.ndimage 'reflect' mode for a 3-tap filter)."""
    p = np.empty(x.shape[:-2] + (x.shape[-2] + 2, x.shape[-1] + 2))
    p[..., 1:-1, 1:-1] = x
    p[..., 0, 1:-1] = x[..., 0, :]
    p[..., -1, 1:-1] = x[..., -1, :]
    p[..., 0] = p[..., 1]
    p[..., -1] = p[..., -2]
    return p


def _sobel_pair(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ndi.sobel(x, axis=0)` and `ndi.sobel(x, axis=1)` per (H, W) image, bit for bit (same operations, same order)."""
    p = _pad_edge(x)
    d1 = p[..., 2:] - p[..., :-2]  # [-1, 0, 1] along the columns (scipy: 0 * x + (x[-1] - x[1]) * -1)
    j = d1[..., :-2, :] + d1[..., 2:, :]  # then [1, 2, 1] along the rows (scipy: 2 * x + (x[-1] + x[1]))
    j += 2.0 * d1[..., 1:-1, :]
    d0 = p[..., 2:, :] - p[..., :-2, :]
    i = d0[..., :-2] + d0[..., 2:]
    i += 2.0 * d0[..., 1:-1]
    return i, j


def _canny_candidates(grads: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Non-maximum-suppressed pixels above the low threshold, and those also above the high one."""
    isobel, jsobel, magnitude = grads
    keep = np.zeros(magnitude.shape, dtype=bool)
    if magnitude.shape[-2] >= 3 and magnitude.shape[-1] >= 3:
        keep[..., 1:-1, 1:-1] = _nonmaximum_suppression(isobel, jsobel, magnitude)
    strong = keep & (magnitude >= _CANNY_HIGH)
    return keep, strong


def _hysteresis(keep: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Keep the 8-connected components of `keep` (within each (H, W) image) that contain a strong pixel."""
    if not strong.any():
        return strong
    structure = np.zeros((3,) * keep.ndim, dtype=bool)
    structure[(1,) * (keep.ndim - 2)] = True  # a 3x3 neighbourhood in the image plane only
    labels, count = ndi.label(keep, structure=structure)
    good = np.zeros(count + 1, dtype=bool)
    good[labels[strong]] = True
    return good[labels]


def canny_edges(gray: np.ndarray) -> np.ndarray:
    """Canny edge map equal to `skimage.feature.canny(gray.astype(float64))` (sigma 1, thresholds 0.1/0.2)."""
    return _hysteresis(*_canny_candidates(_canny_gradients(as_gray(gray))))


def _sampled_strong(imgs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Canny's strong candidates (before hysteresis) on `rows` of each (H, W) image: (N, len(rows), W) bool.

    Each row equals that row of `_canny_candidates(_canny_gradients(img))[1]`:
    it is computed from the slab of rows within `_CANNY_REACH` (every row must
    be at least that far from the image's top and bottom) with the same
    filters in the same order, on 13 and then 5 rows instead of the whole image.
    """
    reach, radius = _CANNY_REACH, len(_GAUSS_W) // 2
    slabs = imgs[:, rows[:, None] + np.arange(-reach, reach + 1)].astype(np.float64)  # (N, S, 13, W)
    # The vertical pass at rows r-2..r+2 (slab rows 4..8, no padding reached): correlate1d's loop for a
    # symmetric kernel, centre tap first, then the pairs from the outermost in, as in `_gaussian`.
    lo, hi = reach - 2, reach + 3
    smoothed = slabs[:, :, lo:hi] * _GAUSS_W[radius]
    for j in range(radius, 0, -1):
        smoothed += (slabs[:, :, lo - j : hi - j] + slabs[:, :, lo + j : hi + j]) * _GAUSS_W[radius - j]
    ndi.correlate1d(smoothed, _GAUSS_W, -1, smoothed, mode="constant", cval=0.0)
    smoothed /= _canny_bleed_over(imgs.shape[-2:])[rows[:, None] + np.arange(-2, 3)]
    grads = tuple(g[..., 1:4, :] for g in _gradients(smoothed))  # rows r-1..r+1 (5-row Sobel: outer rows unused)
    return _canny_candidates(grads)[1][..., 1, :]


def _nonmaximum_suppression(isobel: np.ndarray, jsobel: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """skimage's bilinear non-maximum suppression + low threshold on interior pixels of (..., H, W), vectorised.

    Each pixel compares its magnitude with two values interpolated (weight
    w = min(|gi|, |gj|) / max(|gi|, |gj|)) between an axis neighbour and a
    diagonal neighbour on either side along the gradient; the axis neighbours
    are vertical when |isobel| dominates. Same arithmetic as the Cython kernel.
    """
    rows, cols = mag.shape[-2:]

    def sh(dx: int, dy: int) -> np.ndarray:
        return mag[..., 1 + dx : rows - 1 + dx, 1 + dy : cols - 1 + dy]

    m = sh(0, 0)
    gi = isobel[..., 1:-1, 1:-1]
    gj = jsobel[..., 1:-1, 1:-1]
    ai = np.abs(gi)
    aj = np.abs(gj)
    same = (gi > 0) == (gj > 0)  # both gradients positive, or both <= 0
    vertical = np.where(same, ai > aj, ai >= aj)  # ties interpolate vertically only for opposite signs
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.minimum(ai, aj) / np.maximum(ai, aj)
    omw = 1.0 - w

    def below(diag: np.ndarray, axis: np.ndarray) -> np.ndarray:
        diag = diag * w
        diag += axis * omw
        return diag <= m

    # Diagonals follow the gradient sign: (+1,+1)/(-1,-1) for equal signs, (+1,-1)/(-1,+1) otherwise;
    # each is paired with the vertical neighbour on its row, or else with the horizontal one on its side.
    diag_low = np.where(same, sh(1, 1), sh(1, -1))
    diag_high = np.where(same, sh(-1, -1), sh(-1, 1))
    right, left = sh(0, 1), sh(0, -1)
    axis_low = np.where(vertical, sh(1, 0), np.where(same, right, left))
    axis_high = np.where(vertical, sh(-1, 0), np.where(same, left, right))
    keep = below(diag_low, axis_low)
    keep &= below(diag_high, axis_high)
    keep &= m >= _CANNY_LOW
    return keep


def _vertical_sobel(img: np.ndarray, integral: bool | None = None) -> np.ndarray:
    """`ndi.convolve(img, _SOBEL_V)` (reflect border) of a 2-D image, or of each integer image of (..., H, W)."""
    if not (_is_integral(img) if integral is None else integral):
        return ndi.convolve(img, _SOBEL_V)
    # Every term is a multiple of 1/8 below 2**10, so any summation order gives the same doubles.
    p = _pad_edge(img)
    diff = p[..., 2:] - p[..., :-2]
    out = diff[..., :-2, :] + diff[..., 2:, :]
    out += 2.0 * diff[..., 1:-1, :]
    out *= 0.125
    return out


def _is_integral(img: np.ndarray) -> bool:
    return bool(np.array_equal(img, np.rint(img)))


def _sobel_edges(img: np.ndarray) -> np.ndarray:
    strength2 = np.square(_vertical_sobel(img))
    thresh2 = 2.0 * np.sqrt(np.mean(strength2))
    padded = np.zeros((img.shape[0] + 2, img.shape[1] + 2))
    padded[1:-1, 1:-1] = strength2
    return _thin(padded, thresh2)


def _thin(padded: np.ndarray, thresh2: float | np.ndarray) -> np.ndarray:
    """Octave's simple thinning of the thresholded strength, for the centre of `padded` (..., H + 2, W + 2).

    A pixel above the threshold beats a neighbour at or below it anyway, so the
    neighbours need no thresholding: edge = above & (local max across | local max along).
    `thresh2` is one threshold, or one per image broadcast as (..., 1, 1).
    """
    centre = padded[..., 1:-1, 1:-1]
    across = centre > padded[..., 1:-1, :-2]
    across &= centre > padded[..., 1:-1, 2:]
    along = centre > padded[..., :-2, 1:-1]
    along &= centre > padded[..., 2:, 1:-1]
    across |= along
    across &= centre > thresh2
    return across


def sobel_edges(gray: np.ndarray) -> np.ndarray:
    """Thinned vertical Sobel edge map with the Octave automatic threshold (the port's `octave.sobel`)."""
    return _sobel_edges(as_gray(gray))


def _step_runs(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal-sign horizontal steps, on the flattened image.

    `sign[k]` is the sign (-1, 0, 1) of I.flat[k + 1] - I.flat[k] (`_ROW_END`
    where k is a row's last column, so no run crosses rows); `run[k]` numbers
    the run of equal signs holding k and `bounds[run]` is its first index
    (`bounds[run + 1] - 1` its last).
    """
    flat = img.ravel()
    if flat.dtype == np.uint8:
        sign = np.sign(np.subtract(flat[1:], flat[:-1], dtype=np.int16))
    else:
        sign = np.sign(flat[1:] - flat[:-1]).astype(np.int16)
    sign[img.shape[1] - 1 :: img.shape[1]] = _ROW_END
    change = np.empty(sign.size, dtype=bool)
    change[0] = True
    np.not_equal(sign[1:], sign[:-1], out=change[1:])  # row ends differ from both neighbours: runs of their own
    run = np.add.accumulate(change, dtype=np.int32)  # (np.cumsum allocates and runs about 2x slower here)
    run -= 1
    return sign, run, np.append(np.flatnonzero(change), sign.size)


def _widths_at(img: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Marziliano widths at interior pixels (r, c); 0 where the quantised angle is neither 0 nor +-180.

    `img` may be a stack of images as one (N * H, W) array: the pixels' rows r - 1 and r + 1 must be
    rows of the same image, and runs never cross rows.
    """
    cols = img.shape[1]
    flat = img.ravel()
    p = r * cols + c

    def at(q: np.ndarray) -> np.ndarray:
        return flat[q].astype(np.float64)

    grad_x = (at(p + 1) - at(p - 1)) / 2.0  # np.gradient's central difference
    grad_y = (at(p + cols) - at(p - cols)) / 2.0
    with np.errstate(invalid="ignore"):
        angle = np.where(
            grad_x != 0,
            np.arctan2(grad_y, grad_x) * (180.0 / np.pi),
            np.where(grad_y == np.pi / 2, 90.0, 0.0),
        )
    q = np.abs(angle / 45.0)
    rising = q < 0.5  # MATLAB round(angle / 45) == 0 (half away from zero)
    falling = q >= 3.5  # round(angle / 45) == +-4
    if p.size == 0:
        return np.zeros(0)
    # Runs only over the rows in use, with one row of margin on each side so that the
    # separator before column 1 and after column W-2 of every used row is inside the window.
    first_row = int(r.min()) - 1
    sign, run, bounds = _step_runs(img[first_row : int(r.max()) + 2])
    p = p - first_row * cols
    want = np.where(rising, 1, -1).astype(np.int16)
    # Left: consecutive steps at columns c-2, c-3, ... with the wanted sign; right: c+1, c+2, ...
    # For c = 1 the step left of c - 1 is the previous row's end, for c = W-2 the right one is its own.
    lk = p - 2
    left = np.where(sign[lk] == want, lk - bounds[run[lk]] + 1, 0)
    rk = p + 1
    right = np.where(sign[rk] == want, bounds[run[rk] + 1] - rk, 0)
    widths = np.minimum(left, MAX_MARGIN) + np.minimum(right, MAX_MARGIN) + 2.0
    return np.where(rising | falling, widths, 0.0)


def marziliano_widths(gray: np.ndarray, sobel_edges: np.ndarray) -> np.ndarray:
    """Marziliano edge widths at the Sobel edges (0 elsewhere), as the reference `marziliano_method`.

    For an edge at column c with quantised gradient angle 0 (or +-180), the
    width is 2 plus the number of consecutive rising (falling) intensity steps
    left of c - 1 and right of c + 1, each side capped at 100. Angles are
    rounded half away from zero like MATLAB's `round`.
    """
    img = as_gray(gray)
    edges = np.asarray(sobel_edges)
    if edges.shape != img.shape:
        raise ValueError(f"Sobel edge map shape {edges.shape} differs from the image shape {img.shape}")
    widths = np.zeros(img.shape, dtype=np.float64)
    if img.shape[0] < 3 or img.shape[1] < 3:
        return widths
    r, c = np.nonzero(edges[1:-1, 1:-1])
    r += 1
    c += 1
    widths[r, c] = _widths_at(img, r, c)
    return widths


def _jnb_width(contrast: np.ndarray) -> np.ndarray:
    """JNB width of blocks by their integer contrast (max - min): 5 when it is <= 50, else 3."""
    return np.where(contrast <= JNB_LOW_CONTRAST_MAX, JNB_WIDTH_LOW_CONTRAST, JNB_WIDTH_HIGH_CONTRAST)


def _pool(widths: np.ndarray, jnb: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """CPBD of `n` images from their edges' widths, JNB widths and image index: share with P_blur <= P_JNB.

    Per image as the reference computes it: a 101-bin histogram of P_blur
    divided by the image's edge count, bins 0..63 summed (0 for an image
    without edges).
    """
    p_blur = 1.0 - np.exp(-(np.abs(widths / jnb) ** BETA))
    bins = np.rint(p_blur * 100.0).astype(np.intp)
    hist = np.bincount(owner * 101 + bins, minlength=n * 101).reshape(n, 101).astype(np.float64)
    hist /= np.maximum(np.bincount(owner, minlength=n), 1)[:, None]
    return hist[:, : P_JNB_BIN + 1].sum(axis=1)


def _check_grid(shape: tuple[int, ...], grid: BlockGrid | None) -> BlockGrid:
    grid = BlockGrid.reference(shape) if grid is None else grid
    grid.check(shape)
    return grid


def cpbd_details(gray: np.ndarray, canny: np.ndarray, widths: np.ndarray, grid: BlockGrid | None = None) -> CpbdResult:
    """CPBD and block statistics from a Canny map and an edge-width map over a block grid.

    `grid=None` is the reference layout (whole 64x64 blocks from the top-left).
    An image without edge blocks (or without measured edges in them) gets
    CPBD 0, as the reference code returns.
    """
    img = as_gray(gray)
    canny_map = np.asarray(canny)
    width_map = np.asarray(widths, dtype=np.float64)
    for what, arr in (("Canny edge map", canny_map), ("edge-width map", width_map)):
        if arr.shape != img.shape:
            raise ValueError(f"{what} shape {arr.shape} differs from the image shape {img.shape}")
    grid = _check_grid(img.shape, grid)
    if grid.n_blocks == 0:
        return CpbdResult(0.0, 0, 0, 0)
    area = grid.block_height * grid.block_width
    is_edge_block = np.count_nonzero(grid.blocks(canny_map), axis=(1, 2)) > area * EDGE_BLOCK_FRACTION
    n_edge_blocks = int(is_edge_block.sum())
    if n_edge_blocks == 0:
        return CpbdResult(0.0, grid.n_blocks, 0, 0)
    jnb = _jnb_width(grid.contrast(img)[is_edge_block])
    block_widths = grid.blocks(width_map)[is_edge_block]
    present = block_widths != 0
    w = block_widths[present]
    if w.size == 0:
        return CpbdResult(0.0, grid.n_blocks, n_edge_blocks, 0)
    w_jnb = np.broadcast_to(jnb[:, None, None], block_widths.shape)[present]
    value = _pool(w, w_jnb, np.zeros(w.size, dtype=np.intp), 1)[0]
    return CpbdResult(float(value), grid.n_blocks, n_edge_blocks, int(w.size))


def cpbd_from_maps(gray: np.ndarray, canny: np.ndarray, widths: np.ndarray, grid: BlockGrid | None = None) -> float:
    """CPBD from precomputed Canny and edge-width maps (e.g. the MATLAB reference matrices)."""
    return cpbd_details(gray, canny, widths, grid).value


def _sobel_strength(imgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared vertical Sobel response of each image of (N, H, W) and its Octave threshold, in the same units.

    uint8 images: 64 x the reference strength, as exact int32 (OpenCV's integer Sobel is 8 x
    `_vertical_sobel`), and 64 x the reference threshold. The reference mean of the squares sums
    multiples of 1/64 below 2**34, which is exact in any order, so the integer sum gives it bit
    for bit. Other images: the reference float64 strength and threshold.
    """
    n = len(imgs)
    if imgs.dtype == np.uint8:
        strength = np.empty(imgs.shape, dtype=np.int32)
        for img, out in zip(imgs, strength, strict=True):
            out[...] = cv2.Sobel(img, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
        strength *= strength
        mean = strength.reshape(n, -1).sum(axis=1, dtype=np.int64) / 64.0 / (imgs.shape[1] * imgs.shape[2])
        return strength, 64.0 * (2.0 * np.sqrt(mean))
    strength = np.square(np.stack([_vertical_sobel(img) for img in imgs]))
    return strength, 2.0 * np.sqrt(strength.reshape(n, -1).mean(axis=1))


def _proof_rows(grid: BlockGrid, height: int) -> np.ndarray:
    """Rows whose Canny pixels try to prove the edge blocks: every `_PROOF_ROW_STEP`-th row of each block."""
    rows = [grid.top + b * grid.block_height + offset
            for b in range(grid.rows) for offset in range(_PROOF_ROW_STEP // 2, grid.block_height, _PROOF_ROW_STEP)]
    return np.array([r for r in rows if _CANNY_REACH <= r < height - _CANNY_REACH], dtype=np.intp)


def _proven_counts(imgs: np.ndarray, grid: BlockGrid) -> np.ndarray:
    """Per image and block, the strong Canny pixels found on the proof rows: (N, n_blocks), a lower bound.

    Strong candidates survive hysteresis, so they are Canny edges of the full map.
    """
    rows = _proof_rows(grid, imgs.shape[1])
    if rows.size == 0:
        return np.zeros((len(imgs), grid.n_blocks), dtype=np.intp)
    strong = _sampled_strong(imgs, rows)[..., grid.left : grid.left + grid.cols * grid.block_width]
    per_row = np.add.reduce(strong.reshape(strong.shape[:2] + (grid.cols, grid.block_width)), axis=-1, dtype=np.intp)
    in_block = (rows[:, None] - grid.top) // grid.block_height == np.arange(grid.rows)  # (S, rows)
    return np.einsum("nsc,sb->nbc", per_row, in_block.astype(np.intp)).reshape(len(imgs), grid.n_blocks)


def _measure_stack(imgs: np.ndarray, grid: BlockGrid) -> list[CpbdResult]:
    """CPBD of each image of a (N, H, W) stack over a grid that fits it (see `measure`).

    `imgs` is uint8 (integer images, the exact integer paths) or float64 in 0..255.
    """
    n, rows, cols = imgs.shape
    limit = grid.block_height * grid.block_width * EDGE_BLOCK_FRACTION
    # Fast exact decision: strong Canny pixels on a few rows of each block are true edges of the
    # full map. When every block already holds more than `limit` of them the full map is not
    # needed; otherwise the image gets the full Canny candidates.
    counts = _proven_counts(imgs, grid)
    unsure = np.flatnonzero(~(counts > limit).all(axis=1))
    if unsure.size:
        keep, strong = _canny_candidates(_canny_gradients(imgs[unsure].astype(np.float64)))
        full = grid.counts(strong)
        # Hysteresis only adds weak pixels to strong ones: blocks already above the limit, or
        # whose candidates cannot reach it, are decided without tracing.
        trace = np.flatnonzero(((full <= limit) & (grid.counts(keep) > limit)).any(axis=1))
        if trace.size:
            full[trace] = grid.counts(_hysteresis(keep[trace], strong[trace]))
        counts[unsure] = full
    is_edge_block = counts > limit
    n_edge_blocks = is_edge_block.sum(axis=1)
    results = [CpbdResult(0.0, grid.n_blocks, int(k), 0) for k in n_edge_blocks]
    todo = np.flatnonzero(n_edge_blocks)
    if todo.size == 0 or rows < 3 or cols < 3:
        return results
    if todo.size < n:
        imgs, is_edge_block = imgs[todo], is_edge_block[todo]

    # Sobel edges inside edge blocks, thinned only there and never on the image border (the
    # reference measures no width there); the threshold still uses the whole image.
    strength, thresh = _sobel_strength(imgs)
    bottom, right = grid.top + grid.rows * grid.block_height, grid.left + grid.cols * grid.block_width
    ra, rb, ca, cb = max(grid.top, 1), min(bottom, rows - 1), max(grid.left, 1), min(right, cols - 1)
    selected = np.zeros(imgs.shape, dtype=bool)
    grid.tiles(selected)[...] = is_edge_block.reshape(-1, grid.rows, 1, grid.cols, 1)
    edges = selected[:, ra:rb, ca:cb]
    edges &= _thin(strength[:, ra - 1 : rb + 1, ca - 1 : cb + 1], thresh[:, None, None])
    k, at = np.divmod(np.flatnonzero(edges), (rb - ra) * (cb - ca))
    r, c = np.divmod(at, cb - ca)
    # Widths on the rows ra-1..rb of every image, stacked as one image (no run crosses a row).
    window = imgs[:, ra - 1 : rb + 1].reshape(-1, cols)
    widths = _widths_at(window, k * (rb - ra + 2) + r + 1, c + ca)
    present = widths != 0
    k, w = k[present], widths[present]
    r, c = r[present] + ra, c[present] + ca
    block = (r - grid.top) // grid.block_height * grid.cols + (c - grid.left) // grid.block_width
    values = _pool(w, _jnb_width(grid.contrast(imgs))[k, block], k, len(imgs))
    n_edges = np.bincount(k, minlength=len(imgs))
    for j, i in enumerate(todo):
        if n_edges[j]:
            results[i] = CpbdResult(float(values[j]), grid.n_blocks, int(n_edge_blocks[i]), int(n_edges[j]))
    return results


def _exact_stack(imgs: np.ndarray, integer_dtype: bool) -> np.ndarray:
    """A validated float64 stack as uint8 when every image holds whole numbers (the exact integer paths)."""
    if integer_dtype or _is_integral(imgs):
        return imgs.astype(np.uint8)
    return imgs


def measure(gray: np.ndarray, grid: BlockGrid | None = None) -> CpbdResult:
    """Whole CPBD pipeline on a grayscale image over `grid` (None: the reference layout).

    Equal to `cpbd_details(gray, canny_edges(gray), marziliano_widths(gray,
    sobel_edges(gray)), grid)`, but it traces Canny hysteresis only when a
    block's decision depends on it and measures widths only inside edge blocks.
    """
    img = as_gray(gray)
    grid = _check_grid(img.shape, grid)
    if grid.n_blocks == 0:
        return CpbdResult(0.0, 0, 0, 0)
    return _measure_stack(_exact_stack(img[None], np.asarray(gray).dtype.kind in "ui"), grid)[0]


def _stack(images: np.ndarray | Sequence[np.ndarray], what: str) -> np.ndarray:
    """One array of same-shape images; a ValueError naming the shapes otherwise."""
    if isinstance(images, np.ndarray):
        return np.ascontiguousarray(images)
    shapes = {np.shape(img) for img in images}
    if len(shapes) > 1:
        raise ValueError(f"{what} must all have the same shape, got {sorted(shapes)}")
    return np.stack(images)


def measure_many(grays: np.ndarray | Sequence[np.ndarray], grid: BlockGrid | None = None) -> list[CpbdResult]:
    """`measure` of each of N same-size grayscale images (a (N, H, W) array or a sequence), vectorised.

    The images go through the pipeline `_CHUNK` at a time as one stack; every
    step works image by image within it, so each result equals `measure` of
    that image alone.
    """
    n = len(grays)
    if n == 0:
        return []
    shape = np.shape(grays[0])
    if len(shape) != 2:
        raise ValueError(f"images must be 2-D grayscale arrays, got shape {shape}")
    grid = _check_grid(shape, grid)
    if grid.n_blocks == 0:
        return [CpbdResult(0.0, 0, 0, 0)] * n
    out: list[CpbdResult] = []
    for s in range(0, n, _CHUNK):
        part = _stack(grays[s : s + _CHUNK], "images")
        if part.dtype != np.uint8:
            imgs = as_gray(part.reshape(-1, part.shape[2]), "images").reshape(part.shape)
            part = _exact_stack(imgs, part.dtype.kind in "ui")
        out += _measure_stack(part, grid)
    return out


def cpbd(gray: np.ndarray) -> float:
    """CPBD of a 2-D grayscale image (uint8, or float in 0..255), as the reference code computes it."""
    return measure(gray).value


def face_measure(crop_rgb: np.ndarray, grid: BlockGrid = FACE_GRID) -> CpbdResult:
    """CPBD of an aligned RGB face crop pooled over the face block grid."""
    arr = np.asarray(crop_rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"face crop must be RGB of shape (H, W, 3), got {arr.shape}")
    gray = rgb_to_gray(arr)
    return measure(gray, grid)


def face_measure_many(crops_rgb: np.ndarray | Sequence[np.ndarray], grid: BlockGrid = FACE_GRID) -> list[CpbdResult]:
    """`face_measure` of each of N same-size RGB face crops, vectorised (each result equals the crop's own)."""
    out: list[CpbdResult] = []
    for s in range(0, len(crops_rgb), _CHUNK):
        part = _stack(crops_rgb[s : s + _CHUNK], "face crops")
        if part.ndim != 4 or part.shape[3] != 3:
            raise ValueError(f"face crops must be RGB of shape (H, W, 3), got {part.shape[1:]}")
        n, h, w = part.shape[:3]
        out += measure_many(rgb_to_gray(part.reshape(n * h, w, 3)).reshape(n, h, w), grid)
    return out


def face_cpbd(crop_rgb_112: np.ndarray, grid: BlockGrid = FACE_GRID) -> float:
    """CPBD of a 112x112 aligned RGB face over the face-centred block grid (`FACE_GRID`)."""
    return face_measure(crop_rgb_112, grid).value


# Pixelation (nearest-neighbour upsampling) makes perfect step edges that CPBD reads as sharp. Its signature:
# between neighbouring pixels in textured parts of the face, exact repeats (block interiors) instead of the
# small steps of a natural or blurred crop. Measured on the 29 package and face-api crops: repeats are 3-9 %
# of the textured neighbour pairs of clean and Gaussian-blurred crops, 37 % at a 1.5x, 52 % at 2x and 70-76 %
# at 3x-4x nearest-neighbour upsampling (a block of k pixels repeats (k-1)/k of its pairs).
PIXEL_TEXTURE_RANGE = 16  # a pair is textured when its 5x5 neighbourhood spans >= this many grey levels
PIXEL_REPEAT_MIN = 0.25  # repeats above this share: pixelated (a block of >= 1.33 px)
PIXEL_MIN_PAIRS = 200  # fewer textured pairs: too little texture to tell


def _grid_region(images: np.ndarray, grid: BlockGrid) -> np.ndarray:
    """The part of image(s) (last two axes: rows, columns) that the grid's blocks cover."""
    return images[..., grid.top:grid.top + grid.rows * grid.block_height,
                  grid.left:grid.left + grid.cols * grid.block_width]


def _grays(images: np.ndarray) -> np.ndarray:
    """Grey levels of RGB image(s) (..., H, W, 3); grey images (..., H, W) as they are."""
    arr = np.asarray(images)
    if arr.shape[-1:] != (3,) or arr.ndim < 3:
        return arr
    return rgb_to_gray(arr.reshape(-1, arr.shape[-2], 3)).reshape(arr.shape[:-1])


def pixel_block(crop: np.ndarray, grid: BlockGrid = FACE_GRID) -> float:
    """The side of the repeated-pixel blocks over the face grid of an RGB or grey crop: ~1 for a natural crop, k
    for a crop upsampled k-fold by pixel repetition (1/(1 - share of exact repeats among textured neighbour
    pairs))."""
    g = _grid_region(np.rint(_grays(crop)).astype(np.uint8), grid)
    kernel = np.ones((5, 5), np.uint8)
    textured = (cv2.dilate(g, kernel) - cv2.erode(g, kernel)) >= PIXEL_TEXTURE_RANGE
    gi = g.astype(np.int16)
    repeats = np.concatenate([(np.diff(gi, axis=1) == 0)[textured[:, :-1]], (np.diff(gi, axis=0) == 0)[textured[:-1]]])
    if repeats.size < PIXEL_MIN_PAIRS:
        return 1.0
    return float(1.0 / max(1.0 - repeats.mean(), 1e-6))


def smooth_resolution(crop_rgb: np.ndarray, block: float) -> np.ndarray:
    """The crop at the resolution its pixel blocks leave (area down by `block`), brought back with linear
    interpolation: the same loss of detail without the step edges."""
    h, w = crop_rgb.shape[:2]
    small = cv2.resize(crop_rgb, (max(2, round(w / block)), max(2, round(h / block))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# Lost resolution with smooth interpolation (a face upsampled 3x with linear or cubic kernels) keeps edges
# CPBD can call sharp, but leaves almost no energy near the crop's Nyquist frequency. `high_band` is
# log10(power at 0.5-1.0 of Nyquist / power at 0.1-0.3 of Nyquist) of the Hann-windowed face region.
# Chosen on the 29 package and face-api crops: clean crops -1.81 .. -0.51, JPEG q30 -1.79 .. -0.58; 3x upsampled
# (linear, cubic, Lanczos) -3.73 .. -2.26, 4x linear -2.75 .. -2.39; 2x linear -2.64 .. -1.72 (a mild loss).
HIGH_BAND_MIN = -2.0  # below: the crop has lost resolution, so it is not "clear" whatever its CPBD
_BANDS = ((0.5, 1.0), (0.1, 0.3))


@functools.lru_cache(maxsize=8)
def _band_masks(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hann window and the (high, mid) band masks of a real FFT (rfft2 layout: counted twice but one)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(h) * 2, np.fft.rfftfreq(w) * 2, indexing="ij")  # 1.0 = Nyquist
    radius = np.hypot(fy, fx)
    (hi0, hi1), (mid0, mid1) = _BANDS
    weight = np.full(radius.shape, 2.0)  # the half spectrum stands for both halves ...
    weight[:, 0] = 1.0  # ... but for the columns that have no mirror
    if w % 2 == 0:
        weight[:, -1] = 1.0
    hi = np.where((radius >= hi0) & (radius <= hi1), weight, 0.0).astype(np.float32)
    mid = np.where((radius >= mid0) & (radius < mid1), weight, 0.0).astype(np.float32)
    return np.outer(np.hanning(h), np.hanning(w)).astype(np.float32), hi, mid


def high_band(crops: np.ndarray, grid: BlockGrid = FACE_GRID) -> np.ndarray:
    """`high_band` (see HIGH_BAND_MIN) of each of N same-size crops, RGB (N, H, W, 3) or grey (N, H, W), over the
    face grid's region."""
    g = _grid_region(_grays(crops), grid).astype(np.float32)
    window, hi, mid = _band_masks(*g.shape[1:])
    spectrum = np.fft.rfft2((g - g.mean(axis=(1, 2), keepdims=True)) * window)
    power = spectrum.real**2 + spectrum.imag**2
    high, middle = (power * hi).sum(axis=(1, 2), dtype=np.float64), (power * mid).sum(axis=(1, 2), dtype=np.float64)
    return np.log10(np.maximum(high, 1e-12) / np.maximum(middle, 1e-12))


class BlurStage:
    """Blur label stage: CPBD of each aligned crop -> one `blur` factors row (hazy / blurry / clear)."""

    name = "blur"
    labeller = "cpbd"

    def __init__(self, thresholds: tuple[float, float] = BLUR_THRESHOLDS, grid: BlockGrid = FACE_GRID) -> None:
        self.thresholds = ordered_thresholds(thresholds, "blur")
        self.grid = grid
        g = grid
        self.version = f"{VERSION};grid={g.top},{g.left},{g.block_height}x{g.block_width},{g.rows}x{g.cols}"
        self._grid = grid.to_dict()  # serialised into each row's details right away, so one dict serves all

    def _row(self, sample_id: str, **kw: Any) -> dict[str, Any]:
        return factor_row(
            sample_id,
            "blur",
            labeller=self.labeller,
            labeller_version=self.version,
            thresholds={"hazy_below": self.thresholds[0], "clear_above": self.thresholds[1]},
            **kw,
        )

    def _measured(self, sample_id: str, result: CpbdResult, checked: dict[str, Any]) -> dict[str, Any]:
        """The row of a measured crop; `checked` holds the resolution checks of `_resolution` (may be empty)."""
        details: dict[str, Any] = {
            "grid": self._grid,
            "n_blocks": result.n_blocks,
            "n_edge_blocks": result.n_edge_blocks,
            "n_edges": result.n_edges,
            **checked,
        }
        if result.n_edge_blocks == 0:
            details["no_edge_blocks"] = True
        decision = blur_class(result.value, self.thresholds)
        if decision.index == CLEAR_INDEX and checked.get("high_band", 0.0) < HIGH_BAND_MIN:
            decision = FactorClass("blur", CLEAR_INDEX - 1)  # sharp edges, but no fine detail left
            details["resolution_capped"] = True
        return self._row(sample_id, value=result.value, decision=decision, details=details)

    def label(self, face: FaceCrop) -> dict[str, Any]:
        """One factors row for one crop; failures become rows with a status and a reason."""
        if face.status != OK:
            return self._row(face.sample_id, status=face.status, error=face.error or f"no crop (status {face.status})")
        if face.crop is None:
            return self._row(face.sample_id, status=ERROR, error="crop is missing although status is ok")
        try:
            result = face_measure(face.crop, self.grid)
            result, checked = self._resolution([face.crop], [result])[0]
        except (ValueError, TypeError) as e:
            return self._row(face.sample_id, status=ERROR, error=f"CPBD failed: {e}")
        return self._measured(face.sample_id, result, checked)

    def _resolution(self, crops: Sequence[np.ndarray], results: Sequence[CpbdResult]
                    ) -> list[tuple[CpbdResult, dict[str, Any]]]:
        """The resolution checks of the crops CPBD calls clear (step edges and smooth upsampling can only make a
        face read sharper): a pixelated crop is measured again at the resolution its blocks leave
        (`pixel_block`, `smooth_resolution`), and `high_band` of the crop so measured is recorded."""
        out: list[tuple[CpbdResult, dict[str, Any]]] = [(r, {}) for r in results]
        todo, shown = [], []
        for k, (crop, result) in enumerate(zip(crops, results, strict=True)):
            if np.ndim(crop) != 3 or np.shape(crop)[2] != 3 or \
                    blur_class(result.value, self.thresholds).index != CLEAR_INDEX:
                continue
            gray = _grays(np.asarray(crop, np.uint8))  # once for both checks
            block = pixel_block(gray, self.grid)
            if block >= 1.0 / (1.0 - PIXEL_REPEAT_MIN):
                smooth = smooth_resolution(np.asarray(crop, np.uint8), block)
                out[k] = (face_measure(smooth, self.grid), {"pixelated": {"block": round(block, 3),
                                                                          "cpbd_as_given": result.value}})
                gray = _grays(smooth)
            todo.append(k)
            shown.append(gray)
        if todo:
            for k, band in zip(todo, high_band(np.stack(shown), self.grid), strict=True):
                out[k][1]["high_band"] = round(float(band), 4)
        return out

    def __call__(self, batch: list[FaceCrop]) -> list[dict[str, Any]]:
        """Rows of a batch, in order: same-size uint8 RGB crops measured together, the rest one by one."""
        rows: list[dict[str, Any] | None] = [None] * len(batch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, face in enumerate(batch):
            crop = face.crop
            if (face.status == OK and isinstance(crop, np.ndarray) and crop.dtype == np.uint8 and crop.ndim == 3
                    and crop.shape[2] == 3 and crop.size > 0):
                groups.setdefault(crop.shape, []).append(i)
            else:
                rows[i] = self.label(face)
        for idx in groups.values():
            try:
                crops = [batch[i].crop for i in idx]
                measured = self._resolution(crops, face_measure_many(crops, self.grid))
            except ValueError:  # e.g. the grid does not fit these crops: each gets its own error row
                for i in idx:
                    rows[i] = self.label(batch[i])
                continue
            for i, (result, checked) in zip(idx, measured, strict=True):
                rows[i] = self._measured(batch[i].sample_id, result, checked)
        return rows  # type: ignore[return-value]  (every entry is filled)
