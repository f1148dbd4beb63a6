"""The compiled form of one shape-predictor cascade level (`cascade_level.c`): built on first use, loaded by ctypes.

The numpy cascade of `models.shape_predictor` is the reference; this kernel does
the same operations in the same order and precision in C (no contraction into
fused multiply-adds, no fast-math), so the points are the same bit for bit,
about 1.9x faster per cascade run on a 2-core x86-64 host (`landmarks68` in
`python benchmarks/label.py`). `ShapePredictor` checks it against the numpy
path on a probe batch before using it, as `models.fast_forward` checks its
engines.

The source is compiled with the C compiler of `$CC` (else `cc` or `gcc` on the
PATH) into the model store's `derived/` folder (else a per-user temporary
folder), under a name keyed by the source, the flags, the compiler and the
machine, written atomically: processes and hosts sharing a store each find or
build their own. Where no compiler is found or the build fails, the numpy path
runs: the same points, slower.

`$FIQA_CASCADE_KERNEL` chooses: `auto` (default: the kernel where it builds),
`off` (always numpy), `require` (an error where the kernel cannot be used).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

ENV_VAR = "FIQA_CASCADE_KERNEL"
MODES = ("auto", "off", "require")
SOURCE = Path(__file__).with_name("cascade_level.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
BUILD_TIMEOUT_S = 120


class KernelUnavailableError(RuntimeError):
    """The compiled cascade kernel was required ($FIQA_CASCADE_KERNEL=require) but cannot be used."""


def mode() -> str:
    """$FIQA_CASCADE_KERNEL, checked: auto, off or require."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: choose one of {', '.join(MODES)}")
    return value


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _build_dir() -> Path:
    """The model store's derived/ folder when it can be written, else a per-user temporary folder (used only when
    this user owns it and nobody else may write to it: a library planted there by another user is never loaded)."""
    from models.weights import models_dir

    store = models_dir() / "derived"
    try:
        store.mkdir(parents=True, exist_ok=True)
        if os.access(store, os.W_OK):
            return store
    except OSError:
        pass
    private = Path(tempfile.gettempdir()) / f"fiqa-kernels-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.lstat()
    if not private.is_dir() or private.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{private} is not a folder that only this user owns and may write to")
    return private


def _build(compiler: list[str], extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library of SOURCE for this compiler, flags and machine: found, or compiled now (atomically)."""
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), " ".join(compiler).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = _build_dir() / f"cascade_level-{key}.so"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise OSError(f"{' '.join(compiler)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = ctypes.CDLL(str(path)).fiqa_cascade_level  # ctypes releases the GIL during the call
    fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=1)
def _loaded() -> tuple[ctypes._CFuncPtr | None, str]:  # type: ignore[name-defined]
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler ($CC, cc or gcc) found"
    try:
        path = _build(compiler)
        return _bind(path), f"compiled C ({path.name})"
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return None, f"the cascade kernel could not be built or loaded: {e}"


def kernel() -> tuple[ctypes._CFuncPtr | None, str]:  # type: ignore[name-defined]
    """(the level function or None, what runs and why) under $FIQA_CASCADE_KERNEL; `require` raises where none."""
    chosen = mode()
    if chosen == "off":
        return None, f"numpy ({ENV_VAR}=off)"
    fn, why = _loaded()
    if fn is None and chosen == "require":
        raise KernelUnavailableError(f"{ENV_VAR}=require but {why}")
    return fn, why if fn is not None else f"numpy ({why})"


__all__ = ["ENV_VAR", "KernelUnavailableError", "kernel", "mode"]
