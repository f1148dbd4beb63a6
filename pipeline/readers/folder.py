"""ImageFolder datasets: one sub-folder per identity, symlinks followed only inside the root."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline import images
from pipeline.readers.base import (
    DatasetReader,
    Record,
    Shard,
    file_record,
    utf8_text,
)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif",
)


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
    """ImageFolder tree: root/<identity>/**/<image>; identity label = index of the sorted sub-folder names, or
    the number `use_labels` gives (ingest numbers them by the workspace's identity map: data_manifest.identities).

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
        self.labels: dict[str, int] | None = None  # identity name -> number (None: sorted position)
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
        """Sorted identity sub-folder names; the label of each is its position unless use_labels gave one."""
        return self._scan_root()[0]

    def use_labels(self, labels: dict[str, int]) -> None:
        """Number the identities by `labels` (name -> number, e.g. a workspace's identity map), not by position."""
        missing = [n for n in self.identities() if n not in labels]
        if missing:
            raise ValueError(f"no identity number for folder(s) {missing[:5]}")
        self.labels, self._plan = dict(labels), None

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
        labels = self.labels or {}
        groups = [("", -1)] + [(name, labels.get(name, i)) for i, name in enumerate(self.identities())]
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
                    yield file_record(self.kind, self.path / rel, rel, label, name, self.max_bytes)
                else:
                    source, key = utf8_text(str(self.path / rel))[0], utf8_text(rel)[0]
                    yield Record(self.kind, source, key, label, None if name is None else utf8_text(name)[0], None,
                                 images.BAD_ENTRY, utf8_text(reason)[0])
