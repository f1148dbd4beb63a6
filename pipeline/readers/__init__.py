"""Lazy, shardable dataset readers: ImageFolder, insightface RecordIO, verification .bin, CSV/TSV lists.

Every reader splits its dataset into a deterministic plan of shards (the same
dataset always gives the same plan, which is what makes an ingest resumable),
keeps only a compact index in memory, and reads a shard's encoded bytes only
when that shard is read. `rank`/`world_size` select every world_size-th shard.

`open_source(row)` re-opens the encoded bytes of one `samples` row from its
`source_kind` and `source`; `pipeline.images.decode` turns them into RGB.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.readers.base import DEFAULT_SHARD_SIZE, KINDS, DatasetReader, Record, Shard, SourceReadError, read_file
from pipeline.readers.folder import IMAGE_EXTENSIONS, FolderReader
from pipeline.readers.lists import ListReader
from pipeline.readers.recordio import RecordIOReader
from pipeline.readers.recordio_format import (
    RECORDIO_MAGIC,
    DatasetError,
    IRHeader,
    pread_file,
    read_record,
    unpack_ir,
)
from pipeline.readers.verification_bin import (
    BinReader,
    UnsafePickleError,
    VerificationSet,
    cached_verification_bin,
    load_verification_bin,
)

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
    "load_verification_bin", "open_reader", "open_source", "read_file", "read_record", "unpack_ir",
    "RECORDIO_MAGIC", "parse_bytes_source", "cached_verification_bin", "IMAGE_EXTENSIONS", "DEFAULT_SHARD_SIZE",
    "READERS",
]
