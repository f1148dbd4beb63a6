"""A workspace on object storage (``s3://bucket/prefix``): a local cache with the workspace layout, synced with it.

Every writer writes into the cache folder exactly as into a local workspace; nothing is renamed in the store.
`Store.push` uploads files, then a small commit marker, ``_commits/<time>-<id>.json``, listing each file with its
size and modification time. `Store.pull` reads the markers it has not seen yet and downloads the files they
list, so a file in the store without a marker (a worker killed between its files and its marker) is never
read. Markers accumulate (one or two per shard); `Store.checkpoint` writes one marker listing every committed
file and the names of the markers it stands for, so a new client reads the newest checkpoint and the markers it
does not cover instead of every marker (markers stay in the store: a client that listed them may still read
them); `Store.committed` is what the markers list, and the catalog reads only those shards (a file written into
the cache but never committed stays invisible too). The DuckDB catalog is a file of the cache only, rebuilt
from the synced manifests: any number of clients read one workspace, each with its own cache.

The store is reached with pyarrow's S3 file system: credentials from the usual AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or ~/.aws), the endpoint of an S3-compatible
server from FIQA_S3_ENDPOINT, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, the region from AWS_REGION or
AWS_DEFAULT_REGION. The cache lies under $FIQA_CACHE (default ~/.cache/fiqa/workspaces), one folder per store
URL and endpoint (see docs/operations.md, "Running on a cluster").
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pyarrow import fs as pafs

ENV_CACHE = "FIQA_CACHE"
ENV_ENDPOINT = "FIQA_S3_ENDPOINT"
DEFAULT_CACHE = "~/.cache/fiqa/workspaces"
COMMITS = "_commits"  # the commit markers, in the store and (those seen) in the cache
# A checkpoint marker (`fiqa compact`): every committed file, and the names of the markers it stands for.
CHECKPOINT = "-checkpoint.json"
# Files of the cache only: the catalog (rebuilt from the manifests), locks; dot files (temporaries) neither.
LOCAL_ONLY = frozenset({"catalog.duckdb", "catalog.duckdb.wal", "catalog.duckdb.swap", "catalog.root", "lock"})
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CHUNK = 8 << 20
ENV_TRANSFERS = "FIQA_S3_TRANSFERS"
DEFAULT_TRANSFERS = 16  # files moved at once by a push or pull: each is a request's round trip to the store

Stamp = tuple[int, int]  # (size, mtime_ns) of a file, as committed


class StoreError(OSError):
    """The workspace URL is malformed, or its store cannot be reached or has no such bucket."""


def is_url(value: object) -> bool:
    """True for a workspace given as a URL (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and "://" in value


def endpoint() -> str | None:
    """The S3-compatible endpoint the environment names, or None for AWS itself."""
    for name in (ENV_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of an ``s3://bucket[/prefix]`` URL; StoreError naming the URL otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise StoreError(f"workspace URL {url!r}: unsupported scheme {parts.scheme!r}; use s3://bucket/prefix "
                         "or a local path")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise StoreError(f"workspace URL {url!r}: use s3://bucket/prefix, without credentials, '?' or '#'")
    if not _BUCKET.match(parts.netloc or ""):
        raise StoreError(f"workspace URL {url!r}: {parts.netloc!r} is not a valid bucket name (3-63 characters: "
                         "lower-case letters, digits, '.' and '-')")
    prefix = [p for p in parts.path.split("/") if p]
    if any(p in (".", "..") for p in prefix):
        raise StoreError(f"workspace URL {url!r}: the prefix may not contain '.' or '..'")
    return parts.netloc, "/".join(prefix)


def cache_root(url: str) -> Path:
    """The local cache folder of a store URL (under $FIQA_CACHE), one per URL and endpoint."""
    base = Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE).expanduser()
    key = hashlib.sha256(f"{endpoint() or 'aws'} {url}".encode()).hexdigest()[:16]
    return (base / key).resolve()


def _filesystem(bucket: str) -> tuple[pafs.S3FileSystem, str]:
    """pyarrow's S3 file system for the environment's endpoint, and that endpoint in words."""
    ep = endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kw: dict = {"connect_timeout": 5, "request_timeout": 60,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if ep:
        split = urlsplit(ep if "://" in ep else f"https://{ep}")
        kw.update(endpoint_override=split.netloc, scheme=split.scheme or "https")
    elif not region:
        with contextlib.suppress(OSError, ValueError):
            region = pafs.resolve_s3_region(bucket)
    return pafs.S3FileSystem(region=region or "us-east-1", **kw), ep or "AWS S3"


def _safe_rel(url: str, rel: str) -> str:
    """A relative path from a marker, refused if it would leave the cache or overwrite a local-only file."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(x in ("", ".", "..") for x in p.parts) or not _pushable(p.parts):
        raise StoreError(f"workspace {url}: a commit marker lists {rel!r}, which is not a workspace file")
    return p.as_posix()


def _pushable(parts: tuple[str, ...]) -> bool:
    return parts[0] != COMMITS and parts[-1] not in LOCAL_ONLY and not any(x.startswith(".") for x in parts)


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


_SYNC = contextvars.ContextVar("fiqa_store_sync", default=True)


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Workspaces opened inside do not pull on opening (a shard task pulls only what it reads)."""
    token = _SYNC.set(False)
    try:
        yield
    finally:
        _SYNC.reset(token)


def syncing() -> bool:
    return _SYNC.get()


class Store:
    """One ``s3://bucket/prefix`` workspace store: push files then a commit marker; pull what markers list."""

    _open: dict[tuple[str, str | None], Store] = {}
    _open_lock = threading.Lock()

    @classmethod
    def of(cls, url: str) -> Store:
        """The store of a URL for this environment's endpoint (checked once per process)."""
        bucket, prefix = parse_url(url)
        key = (f"s3://{bucket}/{prefix}".rstrip("/"), endpoint())
        with cls._open_lock:
            if key not in cls._open:
                cls._open[key] = cls(key[0])
            return cls._open[key]

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.fs, self.endpoint = _filesystem(self.bucket)
        self._lock = threading.Lock()
        self._state: dict[Path, tuple[frozenset[str], dict[str, Stamp]]] = {}
        self._bodies: dict[str, bytes] = {}  # commit markers read from the store, by key
        self._covers: dict[Path, frozenset[str]] = {}  # what a checkpoint of a cache stands for, by its path
        try:
            info = self.fs.get_file_info(self.bucket)
        except OSError as e:
            raise StoreError(f"workspace {self.url}: cannot reach the object store at {self.endpoint}: {e}") from e
        if info.type == pafs.FileType.NotFound:
            raise StoreError(f"workspace {self.url}: bucket {self.bucket!r} does not exist at {self.endpoint} "
                             "(create it first)")

    def key(self, rel: str) -> str:
        return "/".join(x for x in (self.bucket, self.prefix, rel) if x)

    def _error(self, what: str, e: OSError) -> StoreError:
        return StoreError(f"workspace {self.url} ({self.endpoint}): {what}: {e}")

    # ------------------------------------------------------------------ the markers seen by this cache

    def committed(self, root: Path) -> dict[str, Stamp]:
        """Every committed file (relative path -> its stamp) as the markers in the cache say, newest marker last."""
        folder = root / COMMITS
        names = frozenset(n for n in os.listdir(folder) if n.endswith(".json")) if folder.is_dir() else frozenset()
        with self._lock:
            known_names, known = self._state.get(root, (frozenset(), {}))
        if known_names == names:
            return known
        added = names - known_names
        if known_names <= names and min(added) > max(known_names, default=""):
            state = dict(known)  # markers sort by time: the new ones only update what is known
        else:  # a checkpoint lists every file its markers list: folded in their place
            state, added = {}, names - self._covered(folder, names)
        for name in sorted(added):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                state.update({rel: (int(s), int(m)) for rel, (s, m) in
                              json.loads((folder / name).read_text())["files"].items()})
        with self._lock:
            self._state[root] = (names, state)
        return state

    def _covered(self, folder: Path, names: Iterable[str]) -> frozenset[str]:
        """The markers that the cache's checkpoints among `names` stand for."""
        out: set[str] = set()
        for name in names:
            if name.endswith(CHECKPOINT):
                path = folder / name
                with self._lock:
                    covers = self._covers.get(path)
                if covers is None:
                    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                        covers = frozenset(json.loads(path.read_text())["covers"])
                        with self._lock:
                            self._covers[path] = covers
                out |= covers or frozenset()
        return frozenset(out)

    def checkpoint(self, root: Path) -> dict[str, Any]:
        """Commit one marker that lists every committed file and the markers it stands for (every marker this
        cache has seen, after a pull): a new client reads it and the newer markers only."""
        self.pull(root, repair=False)
        folder = root / COMMITS
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if folder.is_dir() else []
        covers = sorted(self._covered(folder, names) | set(names))
        state = self.committed(root)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{CHECKPOINT}"
        body = json.dumps({"files": {rel: list(st) for rel, st in state.items()}, "covers": covers,
                           "host": socket.gethostname(), "pid": os.getpid(), "committed_at": time.time()}).encode()
        try:
            with self.fs.open_output_stream(self.key(f"{COMMITS}/{name}")) as out:
                out.write(body)
        except OSError as e:
            raise self._error("writing a checkpoint marker failed", e) from e
        _write(folder / name, body)
        return {"checkpoint": name, "markers_covered": len(covers), "files": len(state)}

    # ------------------------------------------------------------------ push: files first, then the marker

    def _changed(self, root: Path, rels: Iterable[str] | None) -> dict[str, Stamp]:
        if rels is None:
            rels = []
            for d, dirs, files in os.walk(root):
                top = Path(d).relative_to(root).parts
                dirs[:] = sorted(x for x in dirs if _pushable((*top, x)))
                rels += [PurePosixPath(*top, f).as_posix() for f in sorted(files) if _pushable((*top, f))]
        state = self.committed(root)
        out = {}
        for rel in rels:
            st = _stamp(root / rel)
            if st is not None and state.get(rel) != st:
                out[rel] = st
        return out

    def push(self, root: Path, rels: Iterable[str] | None = None) -> int:
        """Upload the files of the cache (default: all) that differ from their last commit, then their marker.

        Returns the number of files committed. A reader sees none of them before the marker exists.
        """
        changed = self._changed(root, rels)
        if not changed:
            return 0
        def upload(rel: str) -> None:
            with open(root / rel, "rb") as src, self.fs.open_output_stream(self.key(rel)) as out:
                shutil.copyfileobj(src, out, _CHUNK)

        try:
            each(upload, list(changed))  # every file before the marker
            marker = {"files": {rel: list(st) for rel, st in changed.items()}, "host": socket.gethostname(),
                      "pid": os.getpid(), "committed_at": time.time()}
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
            body = json.dumps(marker).encode()
            with self.fs.open_output_stream(self.key(f"{COMMITS}/{name}")) as out:
                out.write(body)
        except OSError as e:
            raise self._error(f"uploading {len(changed)} file(s) failed", e) from e
        _write(root / COMMITS / name, body)
        return len(changed)

    # ------------------------------------------------------------------ pull: only what markers list

    def pull(self, root: Path, under: str | None = None, *, repair: bool = True) -> int:
        """Download the files that markers not seen yet list (and, with `repair`, committed files missing here);
        returns how many.

        With `under` (a relative folder or file), only the committed files below it (or it), and the markers stay
        unseen.
        """
        folder = self.key(COMMITS)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            seen = self.committed(root)
            local = set(os.listdir(root / COMMITS)) if (root / COMMITS).is_dir() else set()
            local |= self._covered(root / COMMITS, local)
            new = sorted(i.base_name for i in infos if i.base_name.endswith(".json") and i.base_name not in local)
            if checkpoints := [n for n in new if n.endswith(CHECKPOINT)]:  # the newest stands for the markers it
                covers = set(json.loads(self._marker(f"{folder}/{checkpoints[-1]}"))["covers"])  # lists
                new = [n for n in new if n not in covers]
            markers = dict(zip(new, each(lambda n: self._marker(f"{folder}/{n}"), new), strict=True))
            wanted = dict(seen) if repair else {}
            for body in markers.values():
                wanted.update({_safe_rel(self.url, r): (int(s), int(m))
                               for r, (s, m) in json.loads(body)["files"].items()})
            todo = []
            for rel, st in wanted.items():
                if under is not None and rel != under and not rel.startswith(under.rstrip("/") + "/"):
                    continue
                have = _stamp(root / rel)
                if have is None or (have != st and seen.get(rel) != st):
                    todo.append((rel, st))
            each(lambda item: self._download(item[0], root / item[0], item[1]), todo)
            count = len(todo)
        except OSError as e:
            raise self._error("reading the store failed", e) from e
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"workspace {self.url}: a commit marker is unreadable: {e}") from e
        if under is None:
            for name, body in markers.items():  # after their files: an interrupted pull reads them again
                _write(root / COMMITS / name, body)
        return count

    def _marker(self, key: str) -> bytes:
        """A commit marker's body, read once per process (markers never change; a worker's pulls of single
        folders or files leave them unseen in its cache, so it reads them again on every pull)."""
        with self._lock:
            body = self._bodies.get(key)
        if body is None:
            body = self._read(key)
            with self._lock:
                self._bodies[key] = body
        return body

    def _read(self, key: str) -> bytes:
        with self.fs.open_input_stream(key) as src:
            return src.read()

    def _download(self, rel: str, dest: Path, st: Stamp) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.pull-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with self.fs.open_input_stream(self.key(rel)) as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            os.utime(tmp, ns=(st[1], st[1]))  # its stamp as committed: a later push sees it unchanged
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def transfers() -> int:
    """How many files a push or pull moves at once ($FIQA_S3_TRANSFERS, default DEFAULT_TRANSFERS)."""
    raw = os.environ.get(ENV_TRANSFERS, str(DEFAULT_TRANSFERS))
    if not raw.isdigit() or int(raw) < 1:
        raise StoreError(f"{ENV_TRANSFERS} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def each(fn: Any, items: list[Any]) -> list[Any]:
    """fn over items, `transfers()` at a time on threads (pyarrow's S3 file system is thread-safe), in order;
    the first error is raised once every started transfer has ended."""
    if len(items) <= 1 or transfers() == 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(transfers(), len(items)), thread_name_prefix="fiqa-s3") as pool:
        return list(pool.map(fn, items))


def _write(path: Path, body: bytes) -> None:
    """A marker into the cache, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(body)
    os.replace(tmp, path)
