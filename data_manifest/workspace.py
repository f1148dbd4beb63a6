"""The workspace directory: where every manifest, crop pack, checkpoint and report of a run lives.

A workspace is a local folder, or an object-storage URL (``s3://bucket/prefix``): then `root` is its local
cache with the same layout, synced with the store (data_manifest/store.py).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WORKSPACE = "workspace"
ENV_WORKSPACE = "FIQA_WORKSPACE"


class Workspace:
    """A workspace root with its fixed layout (see docs/architecture.md, "Workspace")."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, create: bool = True) -> None:
        from data_manifest import store  # store imports the writer, which imports this module

        raw = root if root is not None else os.environ.get(ENV_WORKSPACE, DEFAULT_WORKSPACE)
        self.store = store.Store.of(raw) if store.is_url(raw) else None
        self.root = store.cache_root(self.store.url) if self.store else Path(raw).expanduser().resolve()
        self.location = self.store.url if self.store else str(self.root)  # what a worker opens it by
        if "?" in str(self.root):  # DuckDB reads "?" in a database path as the start of URI options
            raise ValueError(f"workspace path {self.root} contains '?', which DuckDB cannot open catalog.duckdb "
                             "under; choose a path without it")
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"workspace {self.root} exists and is not a directory")
        if create:
            for d in (self.manifests, self.crops, self.checkpoints, self.reports, self.runs_dir):
                d.mkdir(parents=True, exist_ok=True)
        if self.store and store.syncing():
            self.pull()

    def pull(self, under: str | None = None, *, repair: bool = True) -> int:
        """A store's workspace: bring the cache up to the store's committed files (those `under` a folder only;
        without `repair`, only those committed since the last pull, not any missing here)."""
        if self.store is None:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        return self.store.pull(self.root, under, repair=repair)

    def push(self, rels: list[str] | None = None) -> int:
        """A store's workspace: commit the cache's new or changed files (default: all) to the store."""
        return self.store.push(self.root, rels) if self.store else 0

    def share(self, path: str | os.PathLike[str]) -> str:
        """A file the flow's process hands to its shard tasks, as they open it with `local`: its path in a local
        workspace (a shared file system); in a store's workspace, its path relative to the root, committed (a
        file from outside the workspace, e.g. a checkpoint, is copied under checkpoints/imported/ first)."""
        src = Path(path).expanduser().resolve()
        if self.store is None:
            return str(src)
        if not src.is_relative_to(self.root):
            import hashlib
            import shutil

            with open(src, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
            dest = self.checkpoints / "imported" / digest / src.parent.name / src.name  # keeps parent/name
            if not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            src = dest
        rel = src.relative_to(self.root).as_posix()
        self.push([rel])
        return rel

    def local(self, ref: str | os.PathLike[str]) -> Path:
        """The local path of a file `share` handed over, or of any file under this root (a store's: pulled into
        this cache when missing, e.g. written by another worker)."""
        path = Path(ref)
        if path.is_absolute():
            if self.store is None or not path.is_relative_to(self.root):
                return path
            ref = path.relative_to(self.root).as_posix()
        path = self.root / ref
        if not path.is_file():
            self.pull(ref)
        return path

    def committed(self, paths: list[Path]) -> list[Path]:
        """The paths a reader may see: all of them locally; in a store's workspace, only the committed ones."""
        if self.store is None:
            return paths
        done = self.store.committed(self.root)
        return [p for p in paths if p.relative_to(self.root).as_posix() in done]

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def crops(self) -> Path:
        return self.root / "crops"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def catalog_root_path(self) -> Path:
        """The workspace root the views in catalog.duckdb were written for (their paths are absolute)."""
        return self.root / "catalog.root"

    def table_dir(self, table: str, run_id: str) -> Path:
        """Directory holding one run's shards of a table (hive-partitioned by run)."""
        return self.manifests / table / f"run={run_id}"

    def check_output(self, output: str | os.PathLike[str], option: str = "output") -> None:
        """Refuse an output path that would overwrite the workspace's data: manifests, crops, runs or the catalog."""
        real = Path(os.path.realpath(output))
        for d in (self.manifests, self.crops, self.runs_dir):
            d_real = Path(os.path.realpath(d))
            if real == d_real or d_real in real.parents:
                raise ValueError(f"refused: {option} {output} is inside the workspace's {d.name}/, which only "
                                 "flows write")
        files = (self.catalog_path, Path(f"{self.catalog_path}.wal"), self.catalog_root_path)
        if any(real == Path(os.path.realpath(f)) for f in files):
            raise ValueError(f"refused: {option} {output} is the workspace's catalog, which only flows write")

    def __repr__(self) -> str:
        return f"Workspace({self.location!r})"


def check_path(path: str | os.PathLike[str] | None) -> None:
    """Refuse a workspace path that is, or lies under, something other than a directory, or a store URL that is
    malformed or cannot be reached (before Prefect starts)."""
    from data_manifest import store

    raw = path if path is not None else os.environ.get(ENV_WORKSPACE, DEFAULT_WORKSPACE)
    if store.is_url(raw):
        store.Store.of(str(raw))
        return
    p = Path(raw).expanduser().absolute()
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                what = "is not a directory" if q == p else f"lies under {q}, which is not a directory"
                raise NotADirectoryError(f"workspace {p} {what}")
            return
