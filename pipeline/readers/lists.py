"""CSV / TSV / text lists of image paths with identities, relative to the list's folder."""

from __future__ import annotations

import csv
import hashlib
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import images
from pipeline.readers.base import (
    DatasetReader,
    Record,
    Shard,
    file_record,
    utf8_text,
)
from pipeline.readers.recordio_format import (
    DatasetError,
)

_UTF8_BOM = b"\xef\xbb\xbf"

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
        key = utf8_text(f"{self.path.name}:{lineno}")[0]
        if not self._usable(fields):
            shown, _ = utf8_text(text)
            return Record(self.kind, shown, key, -1, None, None, images.BAD_ENTRY,
                          f"line {lineno}: expected 'path{self._delim_name()}identity', got {shown!r}")
        rel = fields[0]
        first = self.repeats.get(self._digest(rel)) if self.repeats else None
        if first is not None and first != lineno:
            shown = utf8_text(self._full_path(rel))[0]
            return Record(self.kind, shown, key, -1, None, None, images.BAD_ENTRY,
                          f"line {lineno}: {utf8_text(rel)[0]!r} is listed already on line {first}; read once")
        name = fields[1] if len(fields) == 2 and fields[1] else None
        if name is None:
            label = -1
        elif self.labels is not None:
            label = self.labels[name]
        else:
            label = int(name)
        path = Path(rel) if os.path.isabs(rel) else self.root / rel
        return file_record(self.kind, path, rel, label, name, self.max_bytes)

    def _delim_name(self) -> str:
        return "<TAB>" if self.delimiter == "\t" else ","


def _is_int(s: str) -> bool:
    """An integer identity that fits the int64 `identity` column."""
    try:
        return -(2**63) <= int(s) < 2**63
    except ValueError:
        return False
