"""The reader contract: Record, Shard, DatasetReader, and reading one file into a Record with a reason."""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline import images

KINDS: tuple[str, ...] = ("folder", "recordio", "bin", "list")
DEFAULT_SHARD_SIZE = 1000


class SourceReadError(OSError):
    """open_source could not read a row's encoded bytes; the message names the source and why."""


@dataclass(frozen=True, slots=True)
class Record:
    """One source record: where it lives, its identity, and its encoded bytes (or why they are missing).

    `status`/`error` are set (and `data` is None) when the bytes could not be read;
    the status values are those of `pipeline.images`.
    """

    kind: str
    source: str  # what open_source() takes back: a path, or "<path>#<offset|index>"
    key: str  # stable key within the dataset (sample_id = hash(dataset, key))
    identity: int  # integer label, -1 when unknown
    identity_name: str | None
    data: bytes | None
    status: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    """A contiguous range [start, stop) of a reader's records plus the reader's own locator."""

    index: int
    start: int
    stop: int
    parts: tuple = ()

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


class DatasetReader(ABC):
    """Base of all readers: a cached shard plan, rank selection and lazy iteration."""

    kind: ClassVar[str]

    def __init__(self, path: str | os.PathLike[str], *, rank: int = 0, world_size: int = 1,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"dataset path {str(p)!r} does not exist")
        self.path = p.resolve()
        self.rank, self.world_size, self.shard_size = rank, world_size, shard_size
        self._plan: list[Shard] | None = None

    def plan(self) -> list[Shard]:
        """All shards of the dataset (every rank), computed once."""
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def shards(self) -> list[Shard]:
        """The shards this rank reads."""
        return [s for s in self.plan() if s.index % self.world_size == self.rank]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards())

    def __iter__(self) -> Iterator[Record]:
        for s in self.shards():
            yield from self.read(s)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the reader without its plan or caches; read(shard) reloads what it needs.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Re-create per-process caches after unpickling (subclasses extend)."""
        self._plan = None

    def _split(self, n: int) -> list[Shard]:
        return [Shard(i, a, min(a + self.shard_size, n)) for i, a in enumerate(range(0, n, self.shard_size))]

    @abstractmethod
    def _make_plan(self) -> list[Shard]:
        """Split the dataset into shards of at most shard_size records."""

    @abstractmethod
    def read(self, shard: Shard) -> Iterator[Record]:
        """Yield the shard's records in order, one per sample, never raising for a single bad sample."""





def read_file(path: str | os.PathLike[str], max_bytes: int = images.MAX_BYTES) -> tuple[bytes | None, str | None,
                                                                                       str | None]:
    """(data, status, error) of one file: broken links, non-regular, oversized and unreadable files get a reason."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            return None, images.MISSING, f"broken symlink -> {os.readlink(p)!r}"
        return None, images.MISSING, "file not found"
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        return None, images.UNREADABLE, f"cannot stat: {getattr(e, 'strerror', None) or e}"
    if not stat.S_ISREG(st.st_mode):
        what = "directory" if stat.S_ISDIR(st.st_mode) else "fifo" if stat.S_ISFIFO(st.st_mode) else \
            "socket" if stat.S_ISSOCK(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "special file"
        return None, images.UNREADABLE, f"not a regular file ({what})"
    if st.st_size > max_bytes:
        return None, images.TOO_LARGE, f"file is {st.st_size} bytes, above the limit of {max_bytes}; not read"
    try:
        with open(p, "rb") as f:
            return f.read(), None, None
    except OSError as e:
        return None, images.UNREADABLE, f"cannot read: {e.strerror or e}"


def utf8_text(text: str) -> tuple[str, bool]:
    """The text itself when it is valid UTF-8, else a backslash-escaped stand-in and False."""
    try:
        text.encode("utf-8")
        return text, True
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace"), False


def file_record(kind: str, path: Path, key: str, identity: int, name: str | None, max_bytes: int) -> Record:
    source, ok_source = utf8_text(str(path))
    key_text, _ = utf8_text(key)
    name = None if name is None else utf8_text(name)[0]
    if not ok_source:
        return Record(kind, source, key_text, identity, name, None, images.BAD_ENTRY,
                      "file name is not valid UTF-8; it cannot be stored or re-opened by name")
    data, status, error = read_file(path, max_bytes)
    return Record(kind, source, key_text, identity, name, data, status, error)














