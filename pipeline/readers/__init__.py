"""Lazy, shardable dataset readers: ImageFolder, insightface RecordIO, verification .bin, CSV/TSV lists.

Every reader splits its dataset into a deterministic plan of shards (the same
dataset always gives the same plan, which is what makes an ingest resumable),
keeps only a compact index in memory, and reads a shard's encoded bytes only
when that shard is read. `rank`/`world_size` select every world_size-th shard.

`open_source(row)` re-opens the encoded bytes of one `samples` row from its
`source_kind` and `source`; `pipeline.images.decode` turns them into RGB.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from models.safe_pickle import RestrictedUnpickler
from pipeline import images
from pipeline.readers.recordio_format import (
    RECORDIO_MAGIC,
    DatasetError,
    IRHeader,
    RecordIOError,
    label_int,
    plain_image_at,
    pread_file,
    read_idx,
    read_record,
    scan_rec,
    unpack_ir,
)

KINDS: tuple[str, ...] = ("folder", "recordio", "bin", "list")
DEFAULT_SHARD_SIZE = 1000
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif",
)

MAX_SPAN_BYTES = 64 * 1024 * 1024  # a shard's records are read in one go when they span less
_UTF8_BOM = b"\xef\xbb\xbf"


class UnsafePickleError(DatasetError):
    """A .bin pickle asked for something outside bytes, lists, tuples and numpy bool arrays."""


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


# ---------------------------------------------------------------- files


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


def _utf8(text: str) -> tuple[str, bool]:
    """The text itself when it is valid UTF-8, else a backslash-escaped stand-in and False."""
    try:
        text.encode("utf-8")
        return text, True
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace"), False


def _file_record(kind: str, path: Path, key: str, identity: int, name: str | None, max_bytes: int) -> Record:
    source, ok_source = _utf8(str(path))
    key_text, _ = _utf8(key)
    name = None if name is None else _utf8(name)[0]
    if not ok_source:
        return Record(kind, source, key_text, identity, name, None, images.BAD_ENTRY,
                      "file name is not valid UTF-8; it cannot be stored or re-opened by name")
    data, status, error = read_file(path, max_bytes)
    return Record(kind, source, key_text, identity, name, data, status, error)


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir following symlinks; a symlink loop or an unreadable target counts as not a directory."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _is_symlink(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _within(path: str, root: str) -> bool:
    """True when `path` is `root` or lies below it (both real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        return None


class FolderReader(DatasetReader):
    """ImageFolder tree: root/<identity>/**/<image>; identity label = index of the sorted sub-folder names.

    Files directly under the root get identity -1. Hidden entries are skipped; only
    files with an image extension are read (`extensions=None` reads every file).
    Symlinks are followed only out of the dataset: a symlinked folder or file that
    resolves to the root, an ancestor, another identity's folder or back into its own
    identity is not followed and becomes one `bad_entry` row, so no file is ever read
    twice or under the wrong identity; a symlink loop becomes an `unreadable` row.
    """

    kind = "folder"

    def __init__(self, path: str | os.PathLike[str], *, extensions: Sequence[str] | None = IMAGE_EXTENSIONS,
                 max_bytes: int = images.MAX_BYTES, **kw: Any) -> None:
        super().__init__(path, **kw)
        if not self.path.is_dir():
            raise NotADirectoryError(f"image folder {str(self.path)!r} is not a directory")
        self.extensions = None if extensions is None else tuple(e.lower() for e in extensions)
        self.max_bytes = max_bytes
        self._reset_caches()

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._root_scan: tuple[list[str], list[str]] | None = None
        self._refused: dict[str, str] = {}  # relative path -> why it is not followed (a bad_entry row)
        self._groups: dict[str, list[str]] = {}

    def _wanted(self, name: str) -> bool:
        if name.startswith("."):
            return False
        return self.extensions is None or os.path.splitext(name)[1].lower() in self.extensions

    def _scan_root(self) -> tuple[list[str], list[str]]:
        """(identity folder names, root-level entries) of the root, sorted; refused folders are root entries."""
        if self._root_scan is None:
            root = str(self.path)
            with os.scandir(root) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
            names: list[str] = []
            files: list[str] = []
            seen: dict[str, str] = {}
            for e in entries:
                if not _is_dir(e):
                    if self._wanted(e.name):
                        files.append(e.name)
                    continue
                real = _realpath(e.path)
                reason = None
                if real is None:
                    reason = "folder cannot be resolved"
                elif _within(root, real):
                    reason = f"symlink to {real!r}, the dataset folder or one above it; not followed"
                elif _is_symlink(e) and _within(real, root):
                    reason = (f"symlink to {real!r} inside the dataset; not followed (its files would be read "
                              "twice, under two identities)")
                elif real in seen:
                    reason = f"same folder as identity {seen[real]!r}; not followed (its files would be read twice)"
                if reason is not None:
                    self._refused[e.name] = reason
                    files.append(e.name)
                    continue
                seen[real] = e.name
                names.append(e.name)
            self._root_scan = (names, files)
        return self._root_scan

    def identities(self) -> list[str]:
        """Sorted identity sub-folder names; the label of each is its position."""
        return self._scan_root()[0]

    def group_files(self, group: str) -> list[str]:
        """Sorted paths (relative to the root, '/'-separated) of one identity folder; '' = root-level entries.

        Entries that are not followed (see the class docstring) are listed too and
        read as `bad_entry` rows.
        """
        if group == "":
            return self._scan_root()[1]
        if group in self._groups:
            return self._groups[group]
        root = str(self.path)
        group_real = _realpath(str(self.path / group)) or str(self.path / group)
        out: list[str] = []
        seen: set[tuple[int, int]] = set()
        stack = [group]
        while stack:
            rel = stack.pop()
            d = self.path / rel
            try:
                st = d.stat()
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError as e:
                self._refused[rel] = f"folder cannot be listed: {e.strerror or e}"
                out.append(rel)
                continue
            seen.add((st.st_dev, st.st_ino))
            for e in entries:
                if e.name.startswith("."):
                    continue
                sub = f"{rel}/{e.name}"
                is_dir = _is_dir(e)
                if not is_dir and not self._wanted(e.name):
                    continue
                reason = self._refuse_link(e, root, group_real, is_dir) if _is_symlink(e) else None
                if reason is None and is_dir:
                    try:
                        est = e.stat(follow_symlinks=True)
                    except OSError as err:
                        reason = f"folder cannot be read: {err.strerror or err}"
                    else:
                        if (est.st_dev, est.st_ino) in seen:
                            reason = "folder already read through another path (symlink loop); not followed"
                        else:
                            stack.append(sub)
                            continue
                if reason is not None:
                    self._refused[sub] = reason
                out.append(sub)
        out.sort()
        self._groups[group] = out
        return out

    @staticmethod
    def _refuse_link(e: os.DirEntry, root: str, group_real: str, is_dir: bool) -> str | None:
        """Why a symlink inside an identity folder is not followed, or None when it leads out of the dataset."""
        real = _realpath(e.path)
        if real is None:
            return None  # broken or looping link: read_file says so as a row
        what = "folder" if is_dir else "file"
        if _within(root, real):
            return f"symlink to {real!r}, the dataset folder or one above it; not followed"
        if not _within(real, root):
            return None
        if _within(real, group_real):
            return (f"symlink to {real!r} inside this identity's own folder; not followed (that {what} is read "
                    "already)") if is_dir else None
        return (f"symlink to {real!r} in another identity's folder; not followed (that {what} would be read "
                "under the wrong identity)")

    def _make_plan(self) -> list[Shard]:
        groups = [("", -1)] + [(name, i) for i, name in enumerate(self.identities())]
        shards: list[Shard] = []
        parts: list[tuple[str, int, int, int]] = []
        total = start = fill = 0
        for group, label in groups:
            n = len(self.group_files(group))
            a = 0
            while a < n:
                take = min(n - a, self.shard_size - fill)
                parts.append((group, label, a, a + take))
                a += take
                fill += take
                total += take
                if fill == self.shard_size:
                    shards.append(Shard(len(shards), start, total, tuple(parts)))
                    parts, start, fill = [], total, 0
        if parts:
            shards.append(Shard(len(shards), start, total, tuple(parts)))
        return shards

    def read(self, shard: Shard) -> Iterator[Record]:
        for group, label, a, b in shard.parts:
            files = self.group_files(group)[a:b]
            name = group or None
            for rel in files:
                reason = self._refused.get(rel)
                if reason is None:
                    yield _file_record(self.kind, self.path / rel, rel, label, name, self.max_bytes)
                else:
                    source, key = _utf8(str(self.path / rel))[0], _utf8(rel)[0]
                    yield Record(self.kind, source, key, label, None if name is None else _utf8(name)[0], None,
                                 images.BAD_ENTRY, _utf8(reason)[0])


# ---------------------------------------------------------------- RecordIO


def _rec_paths(path: Path) -> tuple[Path, Path]:
    """(train.rec, train.idx) from a directory, a .rec or an .idx path."""
    if path.is_dir():
        recs = sorted(path.glob("*.rec"))
        rec = path / "train.rec" if (path / "train.rec").exists() else (recs[0] if len(recs) == 1 else None)
        if rec is None:
            found = ", ".join(p.name for p in recs) or "none"
            raise DatasetError(f"{str(path)!r}: expected train.rec or exactly one .rec file (found: {found})")
    elif path.suffix == ".idx":
        rec = path.with_suffix(".rec")
    else:
        rec = path
    if not rec.is_file():
        raise FileNotFoundError(f"RecordIO file {str(rec)!r} does not exist")
    return rec, rec.with_suffix(".idx")


@dataclass(frozen=True, slots=True)
class RecIndex:
    """A .rec's index sorted by key: offsets, where each record ends at the latest, and shared offsets.

    `first[i]` is the position of the lowest key with the same offset as key i (i itself
    when the offset is not shared): an index that gives two keys one offset reads that
    record once, for the lowest key, and the others become `bad_entry` rows.
    """

    keys: np.ndarray
    offsets: np.ndarray
    ends: np.ndarray
    first: np.ndarray
    size: int


@lru_cache(maxsize=4)
def _rec_index(rec_path: str, idx_path: str | None, size: int, rec_mtime_ns: int, idx_mtime_ns: int) -> RecIndex:
    """The RecIndex of a .rec, cached per process while the files are unchanged."""
    keys, offsets = read_idx(Path(idx_path)) if idx_path else scan_rec(Path(rec_path))
    sorted_offsets, first_of = np.unique(offsets, return_index=True)
    nxt = np.searchsorted(sorted_offsets, offsets, side="right")
    ends = np.where(nxt < sorted_offsets.size, sorted_offsets[np.minimum(nxt, sorted_offsets.size - 1)], size)
    ends = np.maximum(ends, np.minimum(offsets, size))  # offsets past the end: the record reads as truncated
    first = first_of[np.searchsorted(sorted_offsets, offsets)] if offsets.size else offsets.copy()
    for a in (keys, offsets, ends, first):
        a.flags.writeable = False
    return RecIndex(keys, offsets, ends, first, size)


class RecordIOReader(DatasetReader):
    """insightface RecordIO (`train.rec` + `train.idx`), as MS1MV2, Glint360K and WebFace ship.

    When record 0 is a header (flag >= 2, empty payload), its labels (a, b) say that
    images are keys 1..a-1 and keys a..b-1 hold each identity's [start, stop) image
    range; otherwise every indexed record is an image. The label of an image is its
    own IRHeader label; an image key the index does not list is a `bad_entry` row.
    Without a `.idx`, the index is built by scanning the `.rec`.
    A record that cannot be read (truncated file, bad framing, offset past the end) is
    a `corrupt` row; one whose label is not an integer, or whose offset the index gives
    to a lower key too, is a `bad_entry` row. A header that cannot be read refuses the
    dataset with an error naming the file.
    """

    kind = "recordio"

    def __init__(self, path: str | os.PathLike[str], **kw: Any) -> None:
        super().__init__(path, **kw)
        self.rec_path, self.idx_path = _rec_paths(self.path)
        self._reset_caches()

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._index: RecIndex | None = None
        self._layout: tuple[int, int, tuple[int, int] | None] | None = None

    def index(self) -> RecIndex:
        """The index of the .rec, sorted by key."""
        if self._index is None:
            rec = self.rec_path.stat()
            idx = self.idx_path.stat() if self.idx_path.is_file() else None
            self._index = _rec_index(str(self.rec_path), str(self.idx_path) if idx else None, rec.st_size,
                                     rec.st_mtime_ns, idx.st_mtime_ns if idx else 0)
        return self._index

    def _read_key(self, fd: int, i: int, what: str) -> tuple[IRHeader, bytes]:
        """The record at index position i, or a DatasetError naming the file, the record and the reason."""
        ix = self.index()
        off = int(ix.offsets[i])
        try:
            if off >= ix.size:
                raise RecordIOError(f"offset {off} is past the end of the file ({ix.size} bytes; truncated?)")
            payload, _ = read_record(pread_file(fd), off, limit=ix.size)
            return unpack_ir(payload)
        except RecordIOError as e:
            raise DatasetError(f"{str(self.rec_path)!r}: {what} (key {int(ix.keys[i])}, byte {off}) cannot be "
                               f"read: {e}") from None

    def layout(self) -> tuple[int, int, tuple[int, int] | None]:
        """(lo, hi, identity_keys): image positions [lo, hi) in the sorted index, and the identity key range."""
        if self._layout is None:
            ix = self.index()
            keys = ix.keys
            lo, hi, ids = 0, int(keys.size), None
            if keys.size and keys[0] == 0:
                fd = os.open(self.rec_path, os.O_RDONLY)
                try:
                    head, payload = self._read_key(fd, 0, "header record")
                finally:
                    os.close(fd)
                if head.flag >= 2 and not payload:
                    a, b = (self._header_label(x) for x in head.label[:2])
                    last = int(keys[-1])
                    if not 1 <= a <= b or b > last + 1:
                        raise DatasetError(f"{str(self.rec_path)!r}: header record labels ({a}, {b}) are not "
                                           f"image/identity key bounds (the index ends at key {last})")
                    lo = int(np.searchsorted(keys, 1))
                    hi = int(np.searchsorted(keys, a))
                    ids = (a, b)
                    self._check_bounds(a, b, hi)
            self._layout = (lo, hi, ids)
        return self._layout

    def _check_bounds(self, a: int, b: int, hi: int) -> None:
        """Refuse a header whose image/identity boundary is off: key a must start the identity records."""
        ix = self.index()
        fd = os.open(self.rec_path, os.O_RDONLY)
        try:
            for i, want_identity in ((hi, True), (hi - 1, False)):
                if not 0 < i < ix.keys.size or (want_identity and (a == b or int(ix.keys[i]) != a)):
                    continue
                try:  # an unreadable record (a truncated file) says nothing about the boundary
                    head, payload = self._read_key(fd, i, "record")
                except DatasetError:
                    continue
                if (head.flag >= 2 and not payload) != want_identity:
                    what = "an image record" if want_identity else "an identity record"
                    raise DatasetError(f"{str(self.rec_path)!r}: the header says images are keys 1..{a - 1} and "
                                       f"identity records keys {a}..{b - 1}, but key {int(ix.keys[i])} is {what}")
        finally:
            os.close(fd)

    def _header_label(self, value: float) -> int:
        try:
            return label_int(value, "header label")
        except RecordIOError as e:
            raise DatasetError(f"{str(self.rec_path)!r}: {e}") from None

    def identity_ranges(self) -> dict[int, tuple[int, int]]:
        """identity -> [start, stop) image keys, from the identity records the header points to ({} without one)."""
        _, _, ids = self.layout()
        if ids is None:
            return {}
        keys = self.index().keys
        out: dict[int, tuple[int, int]] = {}
        fd = os.open(self.rec_path, os.O_RDONLY)
        try:
            for k in range(ids[0], ids[1]):
                i = int(np.searchsorted(keys, k))
                if i >= keys.size or keys[i] != k:
                    raise DatasetError(f"{str(self.rec_path)!r}: identity record {k} is missing from the index")
                head, _ = self._read_key(fd, i, "identity record")
                if head.flag < 2:
                    raise DatasetError(f"{str(self.rec_path)!r}: identity record {k} has no [start, stop) labels")
                out[k - ids[0]] = (self._header_label(head.label[0]), self._header_label(head.label[1]))
        finally:
            os.close(fd)
        return out

    def _make_plan(self) -> list[Shard]:
        lo, hi, ids = self.layout()
        if ids is None:
            return self._split(hi - lo)
        announced, listed = ids[0] - 1, hi - lo
        if announced - listed > listed:
            raise DatasetError(f"{str(self.rec_path)!r}: the header announces {announced} images (keys 1.."
                               f"{ids[0] - 1}) but {self.idx_path.name} lists only {listed} of them")
        return self._split(announced)  # one record per image key the header announces, listed or not

    def _positions(self, shard: Shard) -> list[tuple[int, int | None]]:
        """(key, index position or None when the index lacks the key) of every record of the shard."""
        ix = self.index()
        lo, _, ids = self.layout()
        if ids is None:
            return list(zip(ix.keys[lo + shard.start:lo + shard.stop].tolist(),
                            range(lo + shard.start, lo + shard.stop), strict=True))
        ks = np.arange(1 + shard.start, 1 + shard.stop, dtype=np.int64)
        pos = np.searchsorted(ix.keys, ks)
        found = (pos < ix.keys.size) & (ix.keys[np.minimum(pos, max(ix.keys.size - 1, 0))] == ks)
        return [(k, p if f else None) for k, p, f in zip(ks.tolist(), pos.tolist(), found.tolist(), strict=True)]

    def read(self, shard: Shard) -> Iterator[Record]:
        ix = self.index()
        todo = self._positions(shard)
        rec_name, rec_str = self.rec_path.name, str(self.rec_path)
        listed = [i for _, i in todo if i is not None]
        if not listed:
            for k, _ in todo:
                yield self._unlisted(k, rec_name, rec_str)
            return
        offs, stops = ix.offsets[listed], ix.ends[listed]
        base, top = int(offs.min()), min(int(stops.max()), ix.size)
        offsets, firsts = offs.tolist(), ix.first[listed].tolist()
        fd = os.open(self.rec_path, os.O_RDONLY)
        try:
            buf = memoryview(b"")
            if 0 <= top - base <= MAX_SPAN_BYTES:
                buf = memoryview(os.pread(fd, top - base, base))
                end = base + len(buf)

                def read_at(pos: int, n: int) -> bytes:  # the shard's span from memory, anything else from the file
                    return bytes(buf[pos - base: pos - base + n]) if base <= pos and pos + n <= end else \
                        os.pread(fd, n, pos)
            else:
                read_at = pread_file(fd)
            j = 0
            for k, i in todo:
                if i is None:
                    yield self._unlisted(k, rec_name, rec_str)
                    continue
                off, first = offsets[j], firsts[j]
                j += 1
                # An image record in the span is read in place; anything else (or any doubt) takes _record.
                hit = plain_image_at(buf, off - base) if first == i else None
                if hit is not None:
                    label, start, stop = hit
                    try:
                        ident = label_int(label)
                    except RecordIOError:
                        hit = None
                if hit is None:
                    yield self._record(i, read_at, rec_name, rec_str)
                else:
                    yield Record(self.kind, f"{rec_str}#{off}", f"{rec_name}#{k}", ident, str(ident),
                                 bytes(buf[start:stop]))
        finally:
            os.close(fd)

    def _unlisted(self, k: int, rec_name: str, rec_str: str) -> Record:
        """The row of an image key the header announces but the index does not list."""
        return Record(self.kind, rec_str, f"{rec_name}#{k}", -1, None, None, images.BAD_ENTRY,
                      f"record {k}: the header says it is an image, but {self.idx_path.name} has no line for it")

    def _record(self, i: int, read_at: Any, rec_name: str, rec_str: str) -> Record:
        ix = self.index()
        k, off = int(ix.keys[i]), int(ix.offsets[i])
        source, key = f"{rec_str}#{off}", f"{rec_name}#{k}"
        if ix.first[i] != i:
            return Record(self.kind, source, key, -1, None, None, images.BAD_ENTRY,
                          f"record {k}: the index gives it byte offset {off}, the offset of key "
                          f"{int(ix.keys[ix.first[i]])}; read once, for that key")
        try:
            if off >= ix.size:
                raise RecordIOError(f"offset {off} is past the end of {rec_name} ({ix.size} bytes; truncated?)")
            head, payload = unpack_ir(read_record(read_at, off, limit=ix.size)[0])
        except RecordIOError as e:
            return Record(self.kind, source, key, -1, None, None, images.CORRUPT, f"record {k}: {e}")
        try:
            ident = head.identity
        except RecordIOError as e:
            return Record(self.kind, source, key, -1, None, None, images.BAD_ENTRY, f"record {k}: {e}")
        return Record(self.kind, source, key, ident, str(ident), payload)


# ---------------------------------------------------------------- verification .bin


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


# ---------------------------------------------------------------- CSV / TSV list


class ListReader(DatasetReader):
    """A CSV/TSV list of `path,identity` rows (optional `path,identity` header, '#' comments).

    Relative paths resolve against `root` (default: the list file's folder). The
    delimiter is a tab for .tsv, a comma for .csv, otherwise sniffed from the first row.
    Integer identities are used as labels; other names are numbered in sorted order.
    """

    kind = "list"

    def __init__(self, path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                 delimiter: str | None = None, max_bytes: int = images.MAX_BYTES, **kw: Any) -> None:
        super().__init__(path, **kw)
        if not self.path.is_file():
            raise DatasetError(f"list file {str(self.path)!r} is not a file")
        self.root = Path(root).expanduser().resolve() if root is not None else self.path.parent
        self.delimiter = delimiter
        self.max_bytes = max_bytes
        self.labels: dict[str, int] | None = None  # identity name -> label, when names are not integers
        self.numbered = False  # labels known (set by the planning pass, travels with the reader)
        self.repeats: dict[int, int] = {}  # digest of a path listed more than once -> its first line number
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DatasetError(f"list file {str(self.path)!r} is UTF-16 or UTF-32 encoded; save it as UTF-8")

    def _lines(self, offset: int = 0) -> Iterator[tuple[int, int, str]]:
        """(byte offset, line number, text) of every data line from `offset`, skipping blanks and comments."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            pos = offset
            lineno = 0
            for raw in f:
                start, pos = pos, pos + len(raw)
                lineno += 1
                if start == 0 and raw.startswith(_UTF8_BOM):
                    raw = raw[len(_UTF8_BOM):]
                text = raw.decode("utf-8", "surrogateescape").strip("\r\n")
                if not text.strip() or text.lstrip().startswith("#"):
                    continue
                yield start, lineno, text

    def _split_row(self, text: str) -> list[str] | None:
        if self.delimiter is None:  # decided once, from the file name or the first data line
            suffix = self.path.suffix.lower()
            self.delimiter = "\t" if suffix == ".tsv" else "," if suffix == ".csv" else "\t" if "\t" in text else ","
        try:
            return [c.strip() for c in next(csv.reader([text], delimiter=self.delimiter), [])]
        except csv.Error:  # NUL bytes, an over-long field: the line is a bad entry
            return None

    @staticmethod
    def _is_header(fields: list[str] | None) -> bool:
        return bool(fields) and fields[0].lower() == "path"

    def _make_plan(self) -> list[Shard]:
        names: set[str] = set()
        starts: list[tuple[int, int]] = []
        digests, linenos = array("Q"), array("Q")
        n = 0
        first = True
        for offset, lineno, text in self._lines():
            fields = self._split_row(text)
            if first:
                first = False
                if self._is_header(fields):
                    continue
            if n % self.shard_size == 0:
                starts.append((offset, lineno))
            n += 1
            if self._usable(fields):
                digests.append(self._digest(fields[0]))
                linenos.append(lineno)
                if len(fields) == 2 and fields[1]:
                    names.add(fields[1])
        if any(not _is_int(s) for s in names):
            self.labels = {s: i for i, s in enumerate(sorted(names))}
        self.repeats = self._find_repeats(np.frombuffer(digests, np.uint64), np.frombuffer(linenos, np.uint64))
        self.numbered = True
        return [Shard(i, i * self.shard_size, min((i + 1) * self.shard_size, n), starts[i])
                for i in range(len(starts))]

    @staticmethod
    def _usable(fields: list[str] | None) -> bool:
        return bool(fields) and bool(fields[0]) and len(fields) <= 2 and "\0" not in fields[0]

    def _full_path(self, rel: str) -> str:
        return os.path.normpath(rel if os.path.isabs(rel) else os.path.join(self.root, rel))

    def _digest(self, rel: str) -> int:
        """A 64-bit digest of the file a line names (so two spellings of one path collide)."""
        h = hashlib.blake2b(os.fsencode(self._full_path(rel)), digest_size=8).digest()
        return int.from_bytes(h, "little")

    @staticmethod
    def _find_repeats(digests: np.ndarray, linenos: np.ndarray) -> dict[int, int]:
        """digest -> first line number, for the paths listed on more than one line."""
        if digests.size < 2:
            return {}
        uniq, first, counts = np.unique(digests, return_index=True, return_counts=True)
        rep = counts > 1
        return {int(d): int(linenos[i]) for d, i in zip(uniq[rep], first[rep], strict=True)}

    def read(self, shard: Shard) -> Iterator[Record]:
        if not self.numbered:
            self.plan()  # identity numbering needs the full pass (once per process)
        offset, lineno0 = shard.parts
        count = 0
        for _, lineno, text in self._lines(offset):
            if count == len(shard):
                break
            count += 1
            yield self._row_record(lineno0 + lineno - 1, text, self._split_row(text))

    def _row_record(self, lineno: int, text: str, fields: list[str] | None) -> Record:
        key = _utf8(f"{self.path.name}:{lineno}")[0]
        if not self._usable(fields):
            shown, _ = _utf8(text)
            return Record(self.kind, shown, key, -1, None, None, images.BAD_ENTRY,
                          f"line {lineno}: expected 'path{self._delim_name()}identity', got {shown!r}")
        rel = fields[0]
        first = self.repeats.get(self._digest(rel)) if self.repeats else None
        if first is not None and first != lineno:
            shown = _utf8(self._full_path(rel))[0]
            return Record(self.kind, shown, key, -1, None, None, images.BAD_ENTRY,
                          f"line {lineno}: {_utf8(rel)[0]!r} is listed already on line {first}; read once")
        name = fields[1] if len(fields) == 2 and fields[1] else None
        if name is None:
            label = -1
        elif self.labels is not None:
            label = self.labels[name]
        else:
            label = int(name)
        path = Path(rel) if os.path.isabs(rel) else self.root / rel
        return _file_record(self.kind, path, rel, label, name, self.max_bytes)

    def _delim_name(self) -> str:
        return "<TAB>" if self.delimiter == "\t" else ","


def _is_int(s: str) -> bool:
    """An integer identity that fits the int64 `identity` column."""
    try:
        return -(2**63) <= int(s) < 2**63
    except ValueError:
        return False


# ---------------------------------------------------------------- dispatch


READERS: dict[str, type[DatasetReader]] = {
    "folder": FolderReader, "recordio": RecordIOReader, "bin": BinReader, "list": ListReader,
}


def detect_format(path: str | os.PathLike[str]) -> str:
    """The reader kind for a path: .rec/.idx or a folder holding train.rec -> recordio, .bin, .csv/.tsv/.txt, folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path {str(p)!r} does not exist")
    if p.is_dir():
        return "recordio" if (p / "train.rec").is_file() or len(list(p.glob("*.rec"))) == 1 else "folder"
    suffix = p.suffix.lower()
    if suffix in (".rec", ".idx"):
        return "recordio"
    if suffix == ".bin":
        return "bin"
    if suffix in (".csv", ".tsv", ".txt", ".list"):
        return "list"
    raise DatasetError(f"cannot tell the format of {str(p)!r} from its name; pass the format explicitly "
                       f"(one of {', '.join(KINDS)})")


def open_reader(path: str | os.PathLike[str], format: str = "auto", **kw: Any) -> DatasetReader:
    """A reader for `path` (format 'auto' detects it); kw: rank, world_size, shard_size and reader options."""
    kind = detect_format(path) if format == "auto" else format
    if kind not in READERS:
        raise ValueError(f"unknown dataset format {format!r}; choose auto or one of {', '.join(KINDS)}")
    return READERS[kind](path, **kw)


def open_source(row: Mapping[str, Any]) -> bytes:
    """The encoded image bytes of one `samples` row, from its `source_kind` and `source`.

    folder/list: the file; recordio: the record at "<rec path>#<byte offset>" minus its
    IRHeader; bin: image <index> of "<bin path>#<index>". Raises SourceReadError with the
    source and the reason when the bytes cannot be read.
    """
    try:
        kind, source = row["source_kind"], row["source"]
    except KeyError as e:
        raise ValueError(f"open_source needs a row with 'source_kind' and 'source', missing {e}") from e
    if kind in ("folder", "list"):
        data, status, error = read_file(source)
        if data is None:
            raise SourceReadError(f"{source}: {status}: {error}")
        return data
    if kind not in ("recordio", "bin"):
        raise ValueError(f"unknown source_kind {kind!r}; expected one of {', '.join(KINDS)}")
    path, pos = parse_bytes_source(str(source))
    try:
        if kind == "bin":
            vs = cached_verification_bin(path)
            if pos >= len(vs.images):
                raise SourceReadError(f"{source}: index {pos} beyond the {len(vs.images)} images of {path}")
            return vs.images[pos]
        fd = os.open(path, os.O_RDONLY)
        try:
            return unpack_ir(read_record(pread_file(fd), pos)[0])[1]
        finally:
            os.close(fd)
    except DatasetError as e:
        raise SourceReadError(f"{source}: {e}") from e
    except OSError as e:
        if isinstance(e, SourceReadError):
            raise
        raise SourceReadError(f"{source}: cannot read: {e.strerror or e}") from e


def parse_bytes_source(source: str) -> tuple[str, int]:
    """Split "<path>#<number>" into (path, number)."""
    path, sep, where = source.rpartition("#")
    if not sep or not where.isdigit():
        raise ValueError(f"source {source!r} must look like '<path>#<number>'")
    return path, int(where)


__all__ = [
    "BinReader", "DatasetError", "DatasetReader", "FolderReader", "IRHeader", "KINDS", "ListReader", "Record",
    "RecordIOReader", "Shard", "SourceReadError", "UnsafePickleError", "VerificationSet", "detect_format",
    "load_verification_bin", "open_reader", "open_source", "read_file", "read_idx", "read_record", "unpack_ir",
    "RECORDIO_MAGIC", "parse_bytes_source", "cached_verification_bin", "IMAGE_EXTENSIONS",
]
