"""The insightface / MXNet RecordIO format: record framing, IRHeader, `.idx` files, and a writer.

dmlc-core RecordIO: every part starts with the magic 0xced7230a and a 32-bit word
holding a continuation flag (upper 3 bits) and the part length (lower 29 bits);
parts are zero-padded to 4 bytes. A payload containing the magic at a 4-aligned
offset is split there (flag 1 = first, 2 = middle, 3 = last part) and the magic
is re-inserted on read. An image record's payload is an IRHeader ('IfQQ': flag,
label, id, id2), `flag` extra float32 labels when flag > 0, then the encoded image.
insightface face datasets put a header record at key 0 (labels (a, b): images are
keys 1..a-1, keys a..b-1 hold each identity's [start, stop) image-key range).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
IR_FORMAT = "<IfQQ"  # IRHeader: flag, label, id, id2 (MXNet's `recordio.IRHeader`)
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
MAX_LABEL = 2**31  # identity labels are float32 integers; anything beyond is a corrupt field


class DatasetError(ValueError):
    """A dataset (not a single record) is malformed: wrong layout, bad index, refused pickle."""


class RecordIOError(DatasetError):
    """RecordIO bytes that do not follow the format (bad magic, truncated part, bad flag sequence)."""


@dataclass(frozen=True, slots=True)
class IRHeader:
    """MXNet image-record header: flag (number of extra float labels), label(s), id, id2."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    @property
    def identity(self) -> int:
        """The integer class label (first label when several are stored); RecordIOError when it is not one."""
        return label_int(self.label if isinstance(self.label, float) else (self.label[0] if self.label else -1.0))


def label_int(value: float, what: str = "label") -> int:
    """A float label as an integer; NaN, infinite, fractional or out-of-range values raise RecordIOError."""
    if not math.isfinite(value) or value != int(value) or not -MAX_LABEL < value < MAX_LABEL:
        raise RecordIOError(f"{what} {value!r} is not an integer identity label")
    return int(value)


def read_record(read_at: Callable[[int, int], bytes], pos: int, *, limit: int | None = None,
                payload: bool = True) -> tuple[bytes, int]:
    """Read one (possibly multi-part) RecordIO record starting at byte `pos`; returns (payload, next position).

    `read_at(pos, n)` returns up to n bytes at pos (a file's pread or a buffer slice).
    `limit` is where the record must end at the latest (the file size); `payload=False` only walks the headers.
    """
    chunks: list[bytes] = []
    first = True
    while True:
        head = read_at(pos, 8)
        if len(head) < 8:
            raise RecordIOError(f"RecordIO record truncated: header at byte {pos} has {len(head)} of 8 bytes")
        magic, lrec = struct.unpack("<II", head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"RecordIO magic mismatch at byte {pos}: 0x{magic:08x}, "
                                f"expected 0x{RECORDIO_MAGIC:08x}")
        cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
        if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            raise RecordIOError(f"RecordIO continuation flag {cflag} out of sequence at byte {pos}")
        if limit is not None and pos + 8 + length > limit:
            raise RecordIOError(f"RecordIO part at byte {pos} declares {length} bytes, running past byte {limit} "
                               "(the end of the file: truncated?)")
        if payload:
            body = read_at(pos + 8, length)
            if len(body) < length:
                raise RecordIOError(f"RecordIO record truncated at byte {pos}: part declares {length} bytes, "
                                   f"{len(body)} present")
            chunks.append(body)
        pos += 8 + ((length + 3) & ~3)
        if cflag in (0, 3):
            return b"".join(chunks), pos
        if payload:
            chunks.append(_MAGIC_BYTES)
        first = False


_PART_HEAD = struct.Struct("<II")
_IR = struct.Struct(IR_FORMAT)


def plain_image_at(buf: bytes | memoryview, pos: int) -> tuple[float, int, int] | None:
    """(label, start, stop) of the image bytes of the record at buf[pos:], read in place, when it is one part
    with an IRHeader of no extra labels (how image records are written) and lies wholly inside buf.

    None for anything else (several parts or labels, bad framing, a record running past buf):
    read_record + unpack_ir then read it and say what is wrong.
    """
    if pos < 0 or pos + 8 + IR_SIZE > len(buf):
        return None
    magic, lrec = _PART_HEAD.unpack_from(buf, pos)
    stop = pos + 8 + (lrec & _LEN_MASK)
    if magic != RECORDIO_MAGIC or lrec >> _LEN_BITS or stop > len(buf) or stop < pos + 8 + IR_SIZE:
        return None
    flag, label, _, _ = _IR.unpack_from(buf, pos + 8)
    return (float(label), pos + 8 + IR_SIZE, stop) if flag == 0 else None


def unpack_ir(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and the payload (the encoded image)."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"RecordIO record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id1, id2 = struct.unpack_from(IR_FORMAT, record)
    if flag == 0:
        return IRHeader(0, float(label), id1, id2), record[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if end > len(record):
        raise RecordIOError(f"RecordIO IRHeader declares {flag} labels but the record has {len(record)} bytes")
    labels = tuple(float(x) for x in np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE))
    return IRHeader(flag, labels, id1, id2), record[end:]


def read_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a `.idx` file ("key<TAB>offset" lines), sorted by key."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        tbl = pacsv.read_csv(idx_path, read_options=pacsv.ReadOptions(column_names=["key", "offset"]),
                             parse_options=pacsv.ParseOptions(delimiter="\t"),
                             convert_options=pacsv.ConvertOptions(column_types={"key": pa.int64(),
                                                                                "offset": pa.int64()}))
    except (pa.ArrowInvalid, OSError) as e:
        raise RecordIOError(f"RecordIO index {str(idx_path)!r} is not 'key<TAB>offset' lines: {e}") from e
    if tbl.column("key").null_count or tbl.column("offset").null_count:
        raise RecordIOError(f"RecordIO index {str(idx_path)!r} has a line without a key or an offset")
    keys = tbl.column("key").to_numpy()
    offsets = tbl.column("offset").to_numpy()
    if keys.size and (keys.min() < 0 or offsets.min() < 0):
        raise RecordIOError(f"RecordIO index {str(idx_path)!r} has negative keys or offsets")
    order = np.argsort(keys, kind="stable")
    keys, offsets = keys[order], offsets[order]
    if keys.size > 1 and np.any(keys[1:] == keys[:-1]):
        dup = int(keys[1:][keys[1:] == keys[:-1]][0])
        raise RecordIOError(f"RecordIO index {str(idx_path)!r} lists key {dup} more than once")
    return keys, offsets


def scan_rec(rec_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Build (keys, offsets) by walking a .rec file's record headers (keys 0, 1, 2, ...), for a missing .idx."""
    offsets: list[int] = []
    size = rec_path.stat().st_size
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            offsets.append(pos)
            try:
                _, pos = read_record(pread_file(fd), pos, limit=size, payload=False)
            except RecordIOError as e:
                raise RecordIOError(f"{rec_path}: cannot build an index without train.idx: {e}") from e
    finally:
        os.close(fd)
    return np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def pread_file(fd: int) -> Callable[[int, int], bytes]:
    """A read_at(pos, n) for read_record over an open file descriptor (thread-safe, no seek)."""
    return lambda pos, n: os.pread(fd, n, pos)


def encode_record(payload: bytes) -> bytes:
    """Frame one payload as RecordIO parts (splitting where the magic occurs at a 4-aligned offset)."""
    if len(payload) > _LEN_MASK:
        raise RecordIOError(f"RecordIO records must be shorter than 2^29 bytes, got {len(payload)}")
    out: list[bytes] = []
    start = 0
    view = memoryview(payload)
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            out += [_MAGIC_BYTES, struct.pack("<I", (cflag << _LEN_BITS) | (pos - start)), view[start:pos]]
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start else 0
    out += [_MAGIC_BYTES, struct.pack("<I", (cflag << _LEN_BITS) | (len(payload) - start)), view[start:],
            b"\0" * (-len(payload) % 4)]
    return b"".join(out)


def pack_ir(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """An image record payload: IRHeader (+ float32 labels when `label` is a sequence) + encoded image."""
    if isinstance(label, int | float):
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + image
    labels = np.asarray(label, dtype="<f4")
    return struct.pack(IR_FORMAT, labels.size, 0.0, id, id2) + labels.tobytes() + image


class FaceRecWriter:
    """Write an insightface-style `train.rec` + `train.idx`: header record, images grouped by identity, identities.

    Images must arrive with non-decreasing integer labels 0, 1, 2, ...; close() adds one
    identity record per label, fills in the header record at key 0 (first in the file, as
    insightface writes it, so a truncated file keeps its header) and writes the index.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = "train") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rec_path, self.idx_path = self.folder / f"{name}.rec", self.folder / f"{name}.idx"
        self._f = open(self.rec_path, "wb")  # noqa: SIM115 - closed in close()
        self._starts: list[int] = []  # first image key of each identity
        self._pos = 0
        self._offsets: list[int] = [self._write(self._header(0, 0))]  # key 0, rewritten in place at close()

    @staticmethod
    def _header(n_keys: int, stop: int) -> bytes:
        return pack_ir([float(n_keys), float(stop)], b"")

    def _write(self, payload: bytes) -> int:
        data = encode_record(payload)
        off = self._pos
        self._f.write(data)
        self._pos += len(data)
        return off

    def add(self, label: int, image: bytes) -> int:
        """Append one image of identity `label`; returns its key."""
        expected = len(self._starts)
        if label not in (expected - 1, expected):
            raise ValueError(f"labels must be 0, 1, 2, ... in order; got {label} after {expected - 1}")
        key = len(self._offsets)
        if label == expected:
            self._starts.append(key)
        self._offsets.append(self._write(pack_ir(label, image, id=key)))
        return key

    def close(self) -> None:
        if self._f.closed:
            return
        n_keys = len(self._offsets)
        stops = self._starts[1:] + [n_keys]
        for start, stop in zip(self._starts, stops, strict=True):
            self._offsets.append(self._write(pack_ir([float(start), float(stop)], b"")))
        header = encode_record(self._header(n_keys, n_keys + len(self._starts)))
        if len(header) != len(encode_record(self._header(0, 0))):
            raise RecordIOError("header record changed size; cannot rewrite it in place")
        self._f.seek(0)
        self._f.write(header)
        self._f.close()
        with open(self.idx_path, "w") as idx:
            idx.writelines(f"{k}\t{off}\n" for k, off in enumerate(self._offsets))

    def __enter__(self) -> FaceRecWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
