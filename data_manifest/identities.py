"""The identity map of a dataset: identity folder name -> number, append-only, so a number never moves.

A folder dataset's identities are numbered by this map, not by their sorted position: an identity folder
added later (one that sorts first included) gets the next free number and every existing one keeps its
own. The map of a dataset ingested before maps existed is seeded from the numbers its latest `samples`
rows carry, so the next ingest (a refresh) migrates the workspace. One JSON file per dataset under
`<workspace>/identities/`, rewritten atomically under an flock; entries are only ever added.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from data_manifest import catalog
from data_manifest.sql_guard import sql_str
from data_manifest.workspace import Workspace
from data_manifest.writer import atomic_write

SEED_SQL = ("SELECT identity_name, arg_max(identity, created_at) AS identity FROM samples WHERE dataset = {} "
            "AND identity_name IS NOT NULL AND identity >= 0 GROUP BY identity_name ORDER BY identity, identity_name")


def map_path(ws: Workspace, dataset: str) -> Path:
    """The map file of a dataset (its name quoted into one safe file name)."""
    return ws.root / "identities" / f"{quote(dataset, safe='')}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def read_map(ws: Workspace, dataset: str) -> dict[str, int]:
    """The dataset's map as stored (empty when it has none yet)."""
    path = map_path(ws, dataset)
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def seed(ws: Workspace, dataset: str) -> dict[str, int]:
    """The numbers the dataset's latest `samples` rows carry, per identity name (a workspace from before maps)."""
    if not (ws.manifests / "samples").is_dir():
        return {}
    rows = catalog.query(ws, SEED_SQL.format(sql_str(dataset))).to_pylist()
    return {r["identity_name"]: int(r["identity"]) for r in rows}


def assign(ws: Workspace, dataset: str, names: Sequence[str]) -> dict[str, int]:
    """Numbers for `names`: mapped ones keep theirs, new ones get the next free numbers in the order given.

    Returns the whole map after the additions; the file is written only when something was added (or seeded).
    """
    path = map_path(ws, dataset)
    with _locked(path):
        current = read_map(ws, dataset) if path.exists() else seed(ws, dataset)
        before = len(current) if path.exists() else -1
        taken = set(current.values())
        nxt = max(taken, default=-1) + 1
        for name in names:
            if name not in current:
                current[name] = nxt
                nxt += 1
        if len(current) != before:
            text = json.dumps(current, indent=0, ensure_ascii=False)
            atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return current
