"""insightface RecordIO datasets (train.rec + train.idx): shards of records, read in spans."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import images
from pipeline.readers.base import (
    DatasetReader,
    Record,
    Shard,
)
from pipeline.readers.recordio_format import (
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

MAX_SPAN_BYTES = 64 * 1024 * 1024  # a shard's records are read in one go when they span less


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
