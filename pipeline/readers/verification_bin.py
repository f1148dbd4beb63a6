"""Verification .bin files (images, issame), unpickled with only bytes, lists and numpy bool arrays."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from models.safe_pickle import RestrictedUnpickler
from pipeline.readers.base import (
    DatasetReader,
    Record,
    Shard,
)
from pipeline.readers.recordio_format import (
    DatasetError,
)


class UnsafePickleError(DatasetError):
    """A .bin pickle asked for something outside bytes, lists, tuples and numpy bool arrays."""


class _NdarrayToken:
    """Stands in for numpy.ndarray inside a restricted pickle; only _reconstruct accepts it."""


class _BoolDtype:
    """A validated bool dtype from a pickle; its state is checked, never handed to numpy."""

    def __setstate__(self, state: Any) -> None:
        ok = (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("|", b"|", "=", b"=", "<", b"<")
              and all(s is None for s in state[2:5]))
        if not ok:
            raise UnsafePickleError(f"refused numpy dtype state {state!r}: only plain bool dtypes are allowed")


class _BoolArray:
    """Collects a pickled bool ndarray's state and builds the array with np.frombuffer."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError("refused numpy array state: unexpected layout")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _BoolDtype):
            raise UnsafePickleError("refused numpy array: only bool arrays are allowed")
        self.array = _bool_from_bytes(raw, shape, "F" if fortran else "C")


_NDARRAY = _NdarrayToken()


def _bool_from_bytes(raw: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(raw, bytes | bytearray):
        raise UnsafePickleError(f"refused numpy bool array data of type {type(raw).__name__}")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise UnsafePickleError(f"refused numpy array shape {shape!r}")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) != n:
        raise UnsafePickleError(f"numpy bool array of shape {shape} has {len(raw)} data bytes, expected {n}")
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(shape, order=order) != 0


def _latin1_encode(obj: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: only str -> latin-1 bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _BoolArray:
    if cls is not _NDARRAY:
        raise UnsafePickleError("refused numpy _reconstruct of anything but a plain ndarray")
    return _BoolArray()


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> _BoolDtype:
    name = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
    if name not in ("b1", "?", "bool"):
        raise UnsafePickleError(f"refused numpy dtype {name!r}: only bool arrays are allowed")
    return _BoolDtype()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _BoolDtype):
        raise UnsafePickleError("refused numpy _frombuffer of a non-bool dtype")
    return _bool_from_bytes(buf, shape, "F" if order == "F" else "C")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


def _refuse(module: str, name: str) -> UnsafePickleError:
    return UnsafePickleError(f"refused to load {module}.{name}: a verification .bin may only contain bytes, lists, "
                             "tuples and numpy bool arrays")


_MAX_NESTING = 3  # (images, issame): a tuple of a list of bytes and a list/array of bools


def _unwrap(obj: Any, depth: int = 0) -> Any:
    """The loaded object with numpy stand-ins replaced by arrays; deeper nesting than a .bin has is refused."""
    if isinstance(obj, _BoolArray):
        if obj.array is None:
            raise UnsafePickleError("numpy bool array without data")
        return obj.array
    if isinstance(obj, list | tuple):
        if depth >= _MAX_NESTING:
            raise DatasetError(f"lists nested deeper than {_MAX_NESTING} levels; a verification .bin is "
                               "(images, issame)")
        return type(obj)(_unwrap(x, depth + 1) for x in obj)
    if isinstance(obj, _BoolDtype | _NdarrayToken):
        raise UnsafePickleError("stray numpy object outside an array")
    return obj


@dataclass(frozen=True, slots=True)
class VerificationSet:
    """An insightface verification set: images 2i and 2i+1 form pair i, issame[i] says if they match."""

    images: list[bytes]
    issame: np.ndarray  # bool, (n_pairs,)

    @property
    def n_pairs(self) -> int:
        return int(self.issame.size)

    def pairs(self) -> Iterator[tuple[int, int, bool]]:
        """(index of image a, index of image b, same identity) for every pair."""
        for i, same in enumerate(self.issame.tolist()):
            yield 2 * i, 2 * i + 1, bool(same)


def load_verification_bin(path: str | os.PathLike[str]) -> VerificationSet:
    """Load lfw.bin-style (images, issame) with a restricted unpickler; anything that calls a function is refused."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            obj = _unwrap(RestrictedUnpickler(f, _ALLOWED_GLOBALS, _refuse, encoding="bytes").load())
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{str(p)!r}: {e}") from None
    except DatasetError as e:
        raise DatasetError(f"{str(p)!r}: {e}") from None
    except OSError:
        raise
    except RecursionError:
        raise DatasetError(f"{str(p)!r} is not a valid verification .bin pickle: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - any failure of the unpickler on these bytes means a malformed file
        raise DatasetError(f"{str(p)!r} is not a valid verification .bin pickle: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from None
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise DatasetError(f"{str(p)!r}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, list | tuple):
        raise DatasetError(f"{str(p)!r}: images must be a list of encoded images, got {type(bins).__name__}")
    for i, b in enumerate(bins):
        if not isinstance(b, bytes | bytearray):
            raise DatasetError(f"{str(p)!r}: image {i} is {type(b).__name__}, expected encoded bytes")
    if isinstance(issame, np.ndarray):
        same = issame.reshape(-1)
    elif isinstance(issame, list | tuple):
        bad = next((i for i, v in enumerate(issame) if not isinstance(v, bool | int) or v not in (0, 1)), None)
        if bad is not None:
            raise DatasetError(f"{str(p)!r}: issame[{bad}] is {issame[bad]!r}, expected a bool")
        same = np.asarray(issame, dtype=bool).reshape(-1)
    else:
        raise DatasetError(f"{str(p)!r}: issame must be a list or bool array, got {type(issame).__name__}")
    if len(bins) < 2 * same.size:
        raise DatasetError(f"{str(p)!r}: {same.size} pairs need {2 * same.size} images, the file has {len(bins)}")
    return VerificationSet([bytes(b) for b in bins], same)


@lru_cache(maxsize=2)
def _cached_bin(path: str, mtime_ns: int, size: int) -> VerificationSet:
    return load_verification_bin(path)


def cached_verification_bin(path: str | os.PathLike[str]) -> VerificationSet:
    """load_verification_bin, cached per process while the file is unchanged."""
    p = os.path.abspath(path)
    st = os.stat(p)
    return _cached_bin(p, st.st_mtime_ns, st.st_size)


class BinReader(DatasetReader):
    """insightface verification `.bin` (lfw.bin, cfp_fp.bin, ...): every image a record, identity unknown (-1)."""

    kind = "bin"

    def __init__(self, path: str | os.PathLike[str], **kw: Any) -> None:
        super().__init__(path, **kw)
        if not self.path.is_file():
            raise DatasetError(f"verification set {str(self.path)!r} is not a file")

    def load(self) -> VerificationSet:
        return cached_verification_bin(self.path)

    def _make_plan(self) -> list[Shard]:
        return self._split(len(self.load().images))

    def read(self, shard: Shard) -> Iterator[Record]:
        vs, path, name = self.load(), str(self.path), self.path.name
        for i in range(shard.start, shard.stop):
            yield Record(self.kind, f"{path}#{i}", f"{name}#{i}", -1, None, vs.images[i])
