"""Compacted snapshots of the latest views, kept as tables in catalog.duckdb.

`<table>` (latest row per key) and `labels` (one wide row per sample) are
computed from every shard of every run: a window over the whole history and a
factor pivot. At MS1MV2 size (5.8M samples, 29M factor rows per labelling) that
is 10-30 s a question. Instead each latest view is materialised once as
`snapshot_<table>` (and `snapshot_labels`), and every refresh folds only the
shards it has not seen yet into them:

- a fold reads the new shards, keeps their newest row per key, drops the rows
  older than what the snapshot already holds for that key, deletes the keys it
  replaces and inserts the rest, in sample-id ranges (every snapshot is kept
  in key order, so a range reads only its part of the snapshot), then
  recomputes the `labels` rows of exactly the samples it touched; its cost
  follows the size of the change;
- the class counts of `factors` and `labels` (`COUNTS`) are kept beside them,
  recounted by the refresh that changes their source;
- `snapshot_sources` records every folded shard (path relative to the root,
  size, mtime), so a shard that changed or vanished since is detected, and
  that table is rebuilt from its history;
- shards of a run that has not completed (running, or failed and not yet
  resumed) are not folded: queries see them as *pending* and overlay them on
  the snapshot exactly (`overlay_sql`), so a query always equals the window
  over the history, folded or not.

`fiqa compact` rebuilds every snapshot from the manifests, folding every shard
there is, so a workspace written before snapshots existed, or by another tool
that follows the manifest layout, gets them too. `<table>_history` is never
materialised: it keeps reading the shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from data_manifest.schemas import KEYS, SCHEMAS, duck_type
from data_manifest.sql_guard import escape_glob, sql_str  # noqa: F401  (sql_str: used by catalog too)
from data_manifest.vocabulary import FACTORS
from data_manifest.workspace import Workspace

FORMAT = 2  # bump when the snapshot tables change shape: a refresh then rebuilds them (2: fixed-size arrays)
SNAPSHOT_TABLES: tuple[str, ...] = ("samples", "faces", "factors", "anchors", "scores")
LABEL_INPUTS: tuple[str, ...] = ("samples", "faces", "factors", "anchors")  # what a `labels` row is made of
# Class counts kept next to the snapshots (view name -> the latest view it counts): a question over the whole
# dataset's classes reads a few hundred rows instead of scanning 210M factor rows (or 42M `labels` rows).
COUNTS: dict[str, str] = {"factor_class_counts": "factors", "label_class_counts": "labels"}
SOURCES = "snapshot_sources"
META = "snapshot_meta"
BUILT = "snapshot_tables"  # the snapshot tables built so far (a rebuild interrupted midway leaves none)
ENV_MEMORY = "FIQA_DUCKDB_MEMORY"  # memory limit of a snapshot build (DuckDB spills to disk beyond it)
DEFAULT_MEMORY = "4GB"
ENV_FOLD_MEMORY = "FIQA_FOLD_MEMORY"  # memory limit of an incremental fold step (it spills beyond it too)
DEFAULT_FOLD_MEMORY = "512MB"
ENV_FOLD_ROWS = "FIQA_FOLD_ROWS"  # rows of shards (and samples of `labels`) an incremental fold takes per step
FOLD_ROWS = int(os.environ.get(ENV_FOLD_ROWS, "131072"))


def snapshot_name(table: str) -> str:
    """The catalog.duckdb table that holds the latest rows of `table` (or `labels`)."""
    return f"snapshot_{table}"


def shard_files(ws: Workspace, table: str) -> list[Path]:
    """Every shard of a table, over all runs, in path order (in a store's workspace: the committed ones)."""
    return ws.committed([Path(p) for p in shard_paths(ws.manifests / table)])


def shard_paths(folder: Path) -> list[str]:
    """`folder/run=*/part-*.parquet` as strings, sorted on (run folder, file name): the order of sorting the paths
    on their components, and what `Path.glob` finds (a run folder may be a link to a folder).

    Two directory scans and string sorts: globbing and sorting Path objects cost about 3x as much at WebFace42M
    size (2,100 shards, listed on every query's connection)."""
    try:
        with os.scandir(folder) as it:
            runs = sorted(e.name for e in it if e.name.startswith("run=") and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    base, out = os.fspath(folder), []
    for run in runs:
        sub = os.path.join(base, run)
        try:
            with os.scandir(sub) as it:
                names = sorted(e.name for e in it if e.name.startswith("part-") and e.name.endswith(".parquet"))
        except OSError:
            continue  # gone or unreadable since the first scan: as Path.glob, no shards from it
        out.extend(f"{sub}/{n}" for n in names)
    return out


def rel(ws: Workspace, path: Path) -> str:
    """`path` relative to the workspace root, POSIX style (a string prefix where it is under it, as shards are)."""
    root = ws.root.as_posix().rstrip("/") + "/"
    s = path.as_posix()
    return s[len(root):] if path.is_absolute() == ws.root.is_absolute() and s.startswith(root) else (
        path.relative_to(ws.root).as_posix())


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when it is gone: a shard is replaced only by an atomic rename."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def run_of(path: Path) -> str:
    return path.parent.name.removeprefix("run=")


def run_completed(ws: Workspace, run_id: str, cache: dict[str, bool]) -> bool:
    """True when the run completed, or was written by another tool (no run record): its shards may be folded."""
    if run_id not in cache:
        p = ws.runs_dir / run_id / "run.json"
        try:
            cache[run_id] = json.loads(p.read_text()).get("status") == "completed"
        except FileNotFoundError:
            cache[run_id] = not p.parent.exists()
        except (OSError, ValueError):
            cache[run_id] = False
    return cache[run_id]


# ---------------------------------------------------------------- SQL shared by folds and queries


def key_list(table: str) -> str:
    return ", ".join(KEYS.get(table, ("sample_id",)))


def newest_first(table: str) -> str:
    """The QUALIFY clause that keeps the newest row per key (the definition of the latest views)."""
    return (f"QUALIFY row_number() OVER (PARTITION BY {key_list(table)} "
            f"ORDER BY created_at DESC, run_id DESC) = 1")


def labels_sql(samples: str = "samples", faces: str = "faces", factors: str = "factors",
               anchors: str = "anchors") -> str:
    """One wide row per sample: sample info, alignment, each factor's value/class/index/status, anchor.

    The arguments name the relations to read (the latest views, snapshot tables, or those restricted to some
    samples), so the view, the snapshot build and the snapshot fold are one query.
    """
    pivots = []
    for f in FACTORS:
        pivots += [f"max(value) FILTER (WHERE factor = '{f}') AS {f}_value",
                   f"max(class_name) FILTER (WHERE factor = '{f}') AS {f}_class",
                   f"max(class_index) FILTER (WHERE factor = '{f}') AS {f}_index",
                   f"max(status) FILTER (WHERE factor = '{f}') AS {f}_status"]
    return (
        "SELECT s.sample_id, s.dataset, s.source_kind, s.source, s.identity, s.identity_name, "
        "s.status AS sample_status, s.error AS sample_error, "
        "fc.status AS face_status, fc.error AS face_error, fc.n_faces, fc.crop_file, fc.crop_index, "
        + ", ".join(f"fx.{f}_value, fx.{f}_class, fx.{f}_index, fx.{f}_status" for f in FACTORS)
        + ", a.anchor, a.raw AS anchor_raw, a.model_id AS anchor_model "
        f"FROM {samples} s LEFT JOIN {faces} fc USING (sample_id) "
        f"LEFT JOIN (SELECT sample_id, {', '.join(pivots)} FROM {factors} GROUP BY sample_id) fx USING (sample_id) "
        f"LEFT JOIN {anchors} a USING (sample_id)"
    )


def counts_sql(name: str, source: str) -> str:
    """The class counts `name` (a key of COUNTS) of the relation `source`: rows of each class combination.

    `factor_class_counts`: latest factor rows per factor, class and status; `label_class_counts`: samples per
    combination of the five factor classes (NULL where a factor has no label).
    """
    cols = ("factor, class_index, class_name, status" if name == "factor_class_counts"
            else ", ".join(f"{f}_class" for f in FACTORS))
    return f"SELECT {cols}, count(*) AS n FROM {source} GROUP BY ALL"


def only(relation: str, ids: str) -> str:
    """`relation` restricted to the sample ids of the relation `ids` (a column sample_id)."""
    return f"(SELECT * FROM {relation} WHERE sample_id IN (SELECT sample_id FROM {ids}))"


def overlay_sql(table: str, snapshot: str, pending: str) -> str:
    """The latest view of `table` from its snapshot plus rows not folded yet, exactly as the history window.

    A key the pending rows do not name keeps its snapshot row; for a key they name, the newest of the
    snapshot row and the pending rows wins (pending rows may be older: a run that started earlier).
    """
    keys = key_list(table)
    return (f"WITH p AS (SELECT * FROM {pending} {newest_first(table)}), "
            f"w AS (SELECT * FROM (SELECT * FROM p UNION ALL SELECT s.* FROM {snapshot} s SEMI JOIN p USING ({keys})) "
            f"{newest_first(table)}) "
            f"SELECT * FROM {snapshot} ANTI JOIN p USING ({keys}) UNION ALL SELECT * FROM w")


def labels_overlay_sql(snapshot: str, changed_ids: str, sources: dict[str, str]) -> str:
    """`labels` from its snapshot, with the rows of the samples that pending rows touch recomputed."""
    restricted = {t: only(rel_, changed_ids) for t, rel_ in sources.items()}
    return (f"SELECT * FROM {snapshot} WHERE sample_id NOT IN (SELECT sample_id FROM {changed_ids}) "
            f"UNION ALL {labels_sql(**restricted)}")


# ---------------------------------------------------------------- what the snapshot holds


@dataclass
class TableState:
    """One table's snapshot against its shards: usable or not, and the shards it has not folded."""

    table: str
    usable: bool  # the snapshot exists and every shard it folded is still there, unchanged
    pending: list[Path] = field(default_factory=list)
    reason: str = ""


FoldedSources = dict[str, dict[str, tuple[int, int]]] | None  # table -> {relative path: (size, mtime_ns)}


def _folded(con: duckdb.DuckDBPyConnection, schema: str = "") -> FoldedSources:
    """table -> {relative path: (size, mtime_ns)} of every folded shard, or None without a current snapshot."""
    pre = f"{schema}." if schema else ""
    try:
        meta = dict(con.execute(f"SELECT key, value FROM {pre}{META}").fetchall())
        if meta.get("format") != str(FORMAT):
            return None
        rows = con.execute(f"SELECT tbl, path, size, mtime_ns FROM {pre}{SOURCES}").fetchall()
    except duckdb.CatalogException:
        return None
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for t, p, size, mtime in rows:
        out.setdefault(t, {})[p] = (size, mtime)
    built = {t for t, in con.execute(f"SELECT tbl FROM {pre}{BUILT}").fetchall()}
    return {t: out.get(t, {}) for t in built}


def table_states(ws: Workspace, con: duckdb.DuckDBPyConnection, schema: str = "", *,
                 files: dict[str, list[Path]] | None = None, folded: FoldedSources = None,
                 stamps: dict[Path, tuple[int, int]] | None = None) -> dict[str, TableState]:
    """The state of every snapshot table (and `labels`), read through `con` (catalog.duckdb attached as `schema`).

    `files` (table -> shard_files), `folded` (`_folded`) and `stamps` (shard -> `file_stamp`) save a second
    listing / read / stat when the caller has them.
    """
    folded = _folded(con, schema) if folded is None else folded
    states: dict[str, TableState] = {}
    for t in SNAPSHOT_TABLES:
        if folded is None or t not in folded:
            states[t] = TableState(t, False, reason="no snapshot")
            continue
        seen = folded[t]
        names = {rel(ws, p): p for p in (shard_files(ws, t) if files is None else files[t])}
        gone = [p for p in seen if p not in names or (stamps.get(names[p]) if stamps and names[p] in stamps
                                                      else file_stamp(names[p])) != seen[p]]
        if gone:
            states[t] = TableState(t, False, reason=f"{len(gone)} folded shard(s) changed or removed, e.g. {gone[0]}")
            continue
        states[t] = TableState(t, True, [p for r, p in names.items() if r not in seen])
    ok = all(states[t].usable for t in LABEL_INPUTS) and folded is not None and "labels" in folded
    states["labels"] = TableState("labels", ok, reason="" if ok else "a snapshot it is made of is not usable")
    for name, source in COUNTS.items():  # counted in the same transaction as their source's last change
        ok = states[source].usable and folded is not None and name in folded
        states[name] = TableState(name, ok, reason="" if ok else f"not counted since {source} last changed")
    return states


# ---------------------------------------------------------------- folding shards into the snapshot


@contextlib.contextmanager
def exclusive(ws: Workspace) -> Iterator[None]:
    """One catalog writer per workspace at a time (folds of two finishing runs queue here); not reentrant."""
    fd = os.open(ws.root / ".snapshots.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _configure(con: duckdb.DuckDBPyConnection, ws: Workspace) -> None:
    spill = ws.root / ".tmp" / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET temp_directory = ?", [spill.as_posix()])
    _use_limit(con, build=True)


def _use_limit(con: duckdb.DuckDBPyConnection, *, build: bool) -> None:
    """The memory limit of a build (`FIQA_DUCKDB_MEMORY`) or of an incremental step (`FIQA_FOLD_MEMORY`).

    A step's own working set is bounded by FOLD_ROWS; what a larger limit adds is DuckDB's cache of the
    snapshot blocks the step scans (a relabel's DELETE scans the keys of the whole table), so a step runs
    under a smaller limit: 1.8 GB -> 0.66 GB peak for a 100k relabel at 5.8M samples, +5% time.
    """
    limit = os.environ.get(ENV_MEMORY, DEFAULT_MEMORY) if build else os.environ.get(ENV_FOLD_MEMORY,
                                                                                     DEFAULT_FOLD_MEMORY)
    con.execute("SET VARIABLE fiqa_memory_limit = ?", [limit])
    con.execute("SET memory_limit = ?", [limit])


RELEASE_LIMIT = "16MB"  # what the memory limit drops to for a moment after each step (see _checkpoint)


def _checkpoint(con: duckdb.DuckDBPyConnection) -> None:
    """CHECKPOINT, then hand back what DuckDB kept from the step: a step's memory does not add up over steps.

    DuckDB keeps the blocks a step read in its buffer pool, and its allocator the memory a step freed, up to
    the memory limit: over the steps of a fold that grows with the change (404 MiB peak for 1M new rows
    against 235 MiB for 100k). Dropping the limit for a moment evicts them (unpinned blocks are re-read
    from the file when needed) and flushes the allocator; then the limit in use is set back.
    """
    con.execute("CHECKPOINT")
    limit = con.execute("SELECT getvariable('fiqa_memory_limit')").fetchone()[0] or DEFAULT_MEMORY
    try:
        con.execute("SET memory_limit = ?", [RELEASE_LIMIT])
    except duckdb.OutOfMemoryException:
        pass  # more than that is pinned (in use): nothing is lost, the step's memory just stays a while
    finally:
        con.execute("SET memory_limit = ?", [limit])


def _column_sql(table: str) -> str:
    return ", ".join(f"{f.name} {duck_type(f.type)}" for f in SCHEMAS[table])


def _file_list(files: Sequence[Path]) -> str:
    """A list literal of the files, each escaped so that DuckDB reads exactly it, never a glob pattern."""
    return "[" + ", ".join(sql_str(escape_glob(p.as_posix())) for p in files) + "]"


def read_shards_sql(table: str, files: Sequence[Path]) -> str:
    """SELECT of the schema's columns from some shards (a column an older shard lacks reads as NULL)."""
    present: set[str] = set()
    for p in files:
        present.update(pq.read_schema(p).names)
    def column(f: pa.Field) -> str:  # the schema's type, whatever the reader infers (FLOAT[4], not FLOAT[])
        if f.name not in present:
            return f"CAST(NULL AS {duck_type(f.type)}) AS {f.name}"
        return f"CAST({f.name} AS {duck_type(f.type)}) AS {f.name}" if pa.types.is_fixed_size_list(f.type) else f.name

    cols = ", ".join(column(f) for f in SCHEMAS[table])
    return (f"SELECT {cols} FROM read_parquet({_file_list(files)}, union_by_name = true, "
            "hive_partitioning = false)")


def _key_match(table: str, a: str, b: str) -> str:
    return " AND ".join(f"{a}.{k} = {b}.{k}" for k in KEYS[table])


BUILD_STAGE = "snapshot-build-stage"  # folder under <root>/.tmp: a build's shards, split by sample-id range
# Staged rows per range of a build: the range's window and sort stay well under the build's memory limit.
BUILD_PART_ROWS = 8_000_000
# Rows a partitioned write buffers per range before it writes them out (DuckDB's default, 524288, held for each
# of 27 ranges of 210M factor rows, is past the build's memory limit).
STAGE_FLUSH_ROWS = 131_072


def _build_table(con: duckdb.DuckDBPyConnection, ws: Workspace, table: str, files: Sequence[Path]) -> int:
    """Build snapshot_<table> from its shards; returns the rows kept.

    The shards are read once (no window, no sort) into Parquet files under <root>/.tmp/BUILD_STAGE, one folder
    per sample-id range of about BUILD_PART_ROWS rows; then the newest row per key is taken range by range,
    each range reading only its own folder, sorted, committed and checkpointed (`_build_in_ranges`), and the
    table swapped in with the record of its shards. One statement over every shard (the window and a sort of
    all rows at once) spilled past 40 GB and was still on the 210M factor rows of 42M samples after 19.5 min;
    ranges cut from one unsorted stage table read all of it for each range (27 x 210M rows at 42M samples).
    A table of one range is read straight from its shards (no stage). A build stopped midway leaves the
    folder, removed by the next build.
    """
    snap = snapshot_name(table)
    stage = ws.root / ".tmp" / BUILD_STAGE
    shutil.rmtree(stage, ignore_errors=True)
    src = read_shards_sql(table, files)
    n = con.execute(f"SELECT count(*) FROM read_parquet({_file_list(files)})").fetchone()[0]
    bounds = _bounds(con, f"(SELECT sample_id FROM read_parquet({_file_list(files)}))", -(-n // BUILD_PART_ROWS))
    cuts = [lo for lo, _ in bounds[1:]]
    selects: Iterable[str] = [f"SELECT * FROM ({src}) {newest_first(table)}"]  # one range: straight from the shards
    if cuts:
        part = ("CASE " + " ".join(f"WHEN sample_id < {sql_str(c)} THEN {i}" for i, c in enumerate(cuts))
                + f" ELSE {len(cuts)} END")
        con.execute("SET partitioned_write_flush_threshold = ?", [STAGE_FLUSH_ROWS])
        con.execute(f"COPY (SELECT *, {part} AS range_ FROM ({src})) TO {sql_str(stage.as_posix())} "
                    "(FORMAT parquet, PARTITION_BY (range_))")
        parts = [sorted((stage / f"range_={i}").glob("*.parquet")) for i in range(len(bounds))]
        selects = (f"SELECT * FROM ({read_shards_sql(table, p)}) {newest_first(table)}" for p in parts if p)
    _build_in_ranges(con, snap, f"SELECT * FROM ({src})", selects, key_list(table),
                     finish=lambda: _record(con, ws, table, files))
    shutil.rmtree(stage, ignore_errors=True)
    _checkpoint(con)
    return int(con.execute(f"SELECT count(*) FROM {snap}").fetchone()[0])


STAGE = "snapshot_fold_stage"  # the rows an incremental fold is folding: newest per key, in key order


def _fold_pending(con: duckdb.DuckDBPyConnection, ws: Workspace, table: str, files: Sequence[Path]) -> tuple[int, bool]:
    """Fold new shards into snapshot_<table> in sample-id ranges; (rows kept, whether the table is due a rewrite).

    The shards' newest row per key is staged once, in key order; then each range of about REWRITE_PART x
    FOLD_ROWS staged rows replaces the snapshot rows of its keys, in its own transaction, followed by a
    checkpoint. The snapshot is in key order (a build, a rewrite, and each range appended in order), so a
    range's matching scans only the row groups that can hold its ids: a fold reads the snapshot about once
    however many steps it takes (a step per shard scanned all of it each: 210M factor rows per step at 42M
    samples). The shards are recorded last; a fold stopped midway folds them again next time, which is
    harmless: a staged row equal to the snapshot's replaces it with itself.
    """
    snap = snapshot_name(table)
    with _transaction(con):
        con.execute(f"CREATE OR REPLACE TABLE {STAGE} AS {read_shards_sql(table, files)} {newest_first(table)} "
                    f"ORDER BY {key_list(table)}")
    staged = con.execute(f"SELECT count(*) FROM {STAGE}").fetchone()[0]
    kept = replaced = 0
    for lo, hi in _bounds(con, STAGE, -(-staged // (REWRITE_PART * FOLD_ROWS))):
        with _transaction(con):
            k, r = _fold_range(con, table, lo, hi)
            if k and table == COUNTS["factor_class_counts"]:  # stale until recounted at the end of the refresh
                con.execute(f"DELETE FROM {BUILT} WHERE tbl = 'factor_class_counts'")
        _checkpoint(con)
        kept, replaced = kept + k, replaced + r
    with _transaction(con):
        _record(con, ws, table, files)
        con.execute(f"DROP TABLE {STAGE}")
        due = bool(replaced) and _count_replaced(con, snap, replaced)
    _checkpoint(con)
    return kept, due


def _fold_range(con: duckdb.DuckDBPyConnection, table: str, lo: str | None, hi: str | None) -> tuple[int, int]:
    """Fold the staged rows with sample ids in [lo, hi) into snapshot_<table>: those older than the snapshot's
    row for their key are dropped, the rest replace it (the sample ids go to _changed). Returns the rows kept
    and the snapshot rows they replaced; the snapshot side is restricted to the range, so only the row groups
    whose sample-id statistics overlap it are read."""
    snap = snapshot_name(table)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _delta AS SELECT * FROM {STAGE} WHERE {_between(lo, hi)}")
    match = f"{_between(lo, hi, 's.sample_id')} AND {_key_match(table, 's', 'd')}"
    older = "s.created_at > d.created_at OR (s.created_at = d.created_at AND s.run_id > d.run_id)"
    con.execute(f"DELETE FROM _delta d USING {snap} s WHERE {match} AND ({older})")
    replaced = con.execute(f"DELETE FROM {snap} s USING _delta d WHERE {match}").fetchone()[0]
    con.execute(f"INSERT INTO {snap} SELECT * FROM _delta ORDER BY {key_list(table)}")
    n = con.execute("SELECT count(*) FROM _delta").fetchone()[0]
    if table in LABEL_INPUTS:
        con.execute("INSERT INTO _changed SELECT DISTINCT sample_id FROM _delta")
    con.execute("DROP TABLE _delta")
    return int(n), int(replaced)


REWRITE_FRACTION = 0.1  # rewrite a snapshot table once this share of its rows was replaced since it was written
# A rewrite goes in ranges of this many FOLD_ROWS: each range has a fixed cost (a checkpoint among others), so
# small ranges make it slow (29M factor rows under the step memory limit: 176 s in 131k-row ranges, 47 s in
# 524k-row ranges at 0.56 GB peak).
REWRITE_PART = 4


def _count_replaced(con: duckdb.DuckDBPyConnection, snap: str, replaced: int) -> bool:
    """Count rows replaced in a snapshot table; True once past REWRITE_FRACTION of it: `_rewrite` it.

    Replaced rows stay in the table file as deleted rows that every scan has to skip, and appended rows
    break the key order that point lookups prune on; an occasional rewrite keeps scans as fast as after a
    build, at a cost amortised over the folds that caused it (each pays in proportion to its change).
    """
    key = f"replaced_{snap}"
    got = con.execute(f"SELECT value FROM {META} WHERE key = ?", [key]).fetchone()
    total = int(got[0]) + replaced if got else replaced
    con.execute(f"INSERT OR REPLACE INTO {META} VALUES (?, ?)", [key, str(total)])
    return total > REWRITE_FRACTION * max(con.execute(f"SELECT count(*) FROM {snap}").fetchone()[0], 1)


def _rewrite(con: duckdb.DuckDBPyConnection, table: str, part_rows: int) -> None:
    """snapshot_<table> rewritten in key order, without its deleted rows."""
    snap = snapshot_name(table)
    _build_in_ranges(con, snap, f"SELECT * FROM {snap}",
                     [f"SELECT * FROM {snap} WHERE {cond}" for cond in _ranges(con, snap, part_rows)], key_list(table))


CUT_SAMPLE = 200_000  # sample ids drawn to cut a table into ranges (about 1% imbalance at 222 ranges)


def _bounds(con: duckdb.DuckDBPyConnection, source: str, parts: int) -> list[tuple[str | None, str | None]]:
    """About `parts` consecutive sample-id ranges [lo, hi) of even size over `source` (None: unbounded).

    The bounds come from a sample of the ids: exact quantiles of a 29M-row table would sort every id in memory
    (not spillable), and the ranges need only be about even; any bounds partition the ids all the same.
    """
    cuts = [] if parts <= 1 else con.execute(
        f"SELECT quantile_disc(sample_id, {[i / parts for i in range(1, parts)]}) FROM (SELECT sample_id "
        f"FROM {source} USING SAMPLE reservoir({CUT_SAMPLE} ROWS) REPEATABLE (1))").fetchone()[0]
    bounds = [None, *sorted({c for c in cuts if c is not None}), None]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _between(lo: str | None, hi: str | None, column: str = "sample_id") -> str:
    """`column` in [lo, hi) (None: unbounded) as a condition DuckDB checks against row-group statistics."""
    return " AND ".join([*([f"{column} >= {sql_str(lo)}"] if lo is not None else []),
                         *([f"{column} < {sql_str(hi)}"] if hi is not None else [])]) or "true"


def _ranges(con: duckdb.DuckDBPyConnection, source: str, part_rows: int) -> list[str]:
    """Conditions of consecutive sample-id ranges of about `part_rows` rows of `source` (`_bounds`)."""
    n = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
    return [_between(lo, hi) for lo, hi in _bounds(con, source, -(-n // part_rows))]


def _build_in_ranges(con: duckdb.DuckDBPyConnection, target: str, shape: str, selects: Iterable[str], keys: str,
                     finish: Callable[[], None] | None = None) -> None:
    """(Re)write table `target` (the columns of the query `shape`) from `selects`, one query per sample-id range
    in increasing order, each sorted by `keys`, committed and checkpointed on its own (so neither the sort nor
    the rows written stay in memory: the peak does not grow with the table); swapped in at the end, in one
    transaction with `finish()`."""
    nxt = f"{target}_next"
    with _transaction(con):
        con.execute(f"CREATE OR REPLACE TABLE {nxt} AS SELECT * FROM ({shape}) WHERE false")
    for select in selects:
        with _transaction(con):
            con.execute(f"INSERT INTO {nxt} {select} ORDER BY {keys}")
        _checkpoint(con)
    with _transaction(con):
        con.execute(f"DROP TABLE IF EXISTS {target}")
        con.execute(f"ALTER TABLE {nxt} RENAME TO {target}")
        con.execute(f"INSERT OR REPLACE INTO {META} VALUES (?, '0')", [f"replaced_{target}"])
        if finish is not None:
            finish()


def _record(con: duckdb.DuckDBPyConnection, ws: Workspace, table: str, files: Sequence[Path]) -> None:
    rows = []
    for p in files:
        stamp = file_stamp(p)
        if stamp is not None:
            rows.append((table, rel(ws, p), *stamp))
    if rows:
        con.executemany(f"INSERT INTO {SOURCES} VALUES (?, ?, ?, ?)", rows)


@dataclass
class FoldReport:
    """What a refresh did to the snapshots: per table, shards and rows folded, and whether it rebuilt."""

    tables: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "tables": self.tables}


def update(con: duckdb.DuckDBPyConnection, ws: Workspace, *, rebuild: bool = False,
           log: Callable[[str], None] | None = None) -> FoldReport:
    """Fold new shards into the snapshots on a read-write connection to catalog.duckdb.

    The caller holds `exclusive(ws)`. Shards of completed runs (and of runs no flow recorded) are folded;
    with `rebuild` every snapshot is recomputed from all shards there are, whatever their run's state
    (`fiqa compact`). A snapshot whose folded shards changed is rebuilt, as is any snapshot of an older format.
    """
    t0 = time.perf_counter()
    report = FoldReport()
    say = log or (lambda _m: None)
    _configure(con, ws)
    folded = None if rebuild else _folded(con)
    reset = rebuild or folded is None
    states = None if reset else table_states(ws, con, folded=folded)  # None: every table is built afresh
    with _transaction(con):  # `labels` is unusable until it is consistent with its inputs again
        _ensure_meta(con, reset=reset)
        con.execute(f"DELETE FROM {BUILT} WHERE tbl = 'labels'")
    con.execute("CREATE OR REPLACE TEMP TABLE _changed (sample_id VARCHAR)")
    done: dict[str, bool] = {}
    relabel_all = states is None or not states["labels"].usable
    for t in SNAPSHOT_TABLES:  # one transaction per table: a fold never holds all of them in memory
        st = None if states is None else states[t]
        fresh = st is None or not st.usable
        if fresh and st is not None and st.reason != "no snapshot":
            say(f"snapshot of {t}: {st.reason}; rebuilding it from its shards")
        if fresh:
            files = shard_files(ws, t) if rebuild else [
                p for p in shard_files(ws, t) if run_completed(ws, run_of(p), done)]
        else:
            files = [p for p in st.pending if run_completed(ws, run_of(p), done)]
        # A build (_build_table) and an incremental fold (_fold_pending) both go in sample-id ranges, each
        # committed and checkpointed, so neither the working set nor the rows written stay in memory: the peak
        # grows neither with the table nor with the change.
        _use_limit(con, build=fresh)
        if fresh:
            with _transaction(con):
                con.execute(f"CREATE OR REPLACE TABLE {snapshot_name(t)} ({_column_sql(t)})")
                con.execute(f"DELETE FROM {SOURCES} WHERE tbl = ?", [t])
                con.execute(f"DELETE FROM {META} WHERE key = ?", [f"replaced_{snapshot_name(t)}"])
                con.execute(f"INSERT OR IGNORE INTO {BUILT} VALUES (?)", [t])
                if t == COUNTS["factor_class_counts"]:  # stale until recounted at the end of the refresh
                    con.execute(f"DELETE FROM {BUILT} WHERE tbl = 'factor_class_counts'")
                relabel_all = relabel_all or t in LABEL_INPUTS  # so `labels` is rebuilt: _changed is not kept
            rows = _build_table(con, ws, t, files) if files else 0
        else:
            rows, due = _fold_pending(con, ws, t, files) if files else (0, False)
            if due:
                _rewrite(con, t, REWRITE_PART * FOLD_ROWS)
        report.tables[t] = {"shards": len(files), "rows": rows, "rebuilt": fresh}
    _use_limit(con, build=relabel_all)
    report.tables["labels"] = _update_labels(con, relabel_all)
    labels_changed = bool(report.tables["labels"]["samples"]) or relabel_all
    with _transaction(con):
        built = {t for t, in con.execute(f"SELECT tbl FROM {BUILT}").fetchall()}
        for name, source in COUNTS.items():
            if name not in built or (source == "labels" and labels_changed):
                report.tables[name] = {"counted_rows": _recount(con, name)}
        con.execute(f"INSERT OR IGNORE INTO {BUILT} VALUES ('labels')")
    _checkpoint(con)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


LABELS_PART = 1_000_000  # samples per pass of a full `labels` build (bounds the pivot's memory)


def _update_labels(con: duckdb.DuckDBPyConnection, rebuild: bool) -> dict:
    """Recompute the `labels` rows of the samples in _changed, or all of them (in sample-id ranges).

    A change past REWRITE_FRACTION of `labels` rebuilds it in ranges of FOLD_ROWS samples (what replacing
    its rows and then rewriting the table would cost, in one pass); a smaller one replaces its rows
    FOLD_ROWS samples a step (in sample-id ranges), each step committed and checkpointed.
    """
    lab = snapshot_name("labels")
    inputs = [snapshot_name(t) for t in LABEL_INPUTS]
    n_changed = 0
    large = False  # a change past REWRITE_FRACTION: rebuilt in ranges of FOLD_ROWS
    if not rebuild:
        con.execute("CREATE OR REPLACE TEMP TABLE _all_ids AS SELECT DISTINCT sample_id FROM _changed")
        n_changed = int(con.execute("SELECT count(*) FROM _all_ids").fetchone()[0])
        large = n_changed > REWRITE_FRACTION * max(con.execute(f"SELECT count(*) FROM {lab}").fetchone()[0], 1)
    if rebuild or large:
        _build_in_ranges(con, lab, labels_sql(*(f"(SELECT * FROM {t} WHERE false)" for t in inputs)),
                         [labels_sql(*(f"(SELECT * FROM {t} WHERE {cond})" for t in inputs))
                          for cond in _ranges(con, inputs[0], LABELS_PART if rebuild else FOLD_ROWS)], "sample_id")
        samples = n_changed if not rebuild else con.execute(f"SELECT count(*) FROM {lab}").fetchone()[0]
        return {"samples": int(samples), "rebuilt": rebuild}
    replaced = 0
    for lo, hi in _bounds(con, "_all_ids", -(-n_changed // FOLD_ROWS)):
        cond = _between(lo, hi)  # the snapshots are in key order: each step reads the row groups of its range
        with _transaction(con):
            con.execute(f"CREATE OR REPLACE TEMP TABLE _ids AS SELECT sample_id FROM _all_ids WHERE {cond}")
            replaced += con.execute(f"DELETE FROM {lab} WHERE {cond} AND sample_id IN (SELECT sample_id FROM _ids)"
                                    ).fetchone()[0]
            ranged = (only(f"(SELECT * FROM {t} WHERE {cond})", "_ids") for t in inputs)
            con.execute(f"INSERT INTO {lab} {labels_sql(*ranged)} ORDER BY sample_id")
        _checkpoint(con)
    if replaced:
        with _transaction(con):
            due = _count_replaced(con, lab, replaced)
        if due:
            _rewrite(con, "labels", REWRITE_PART * FOLD_ROWS)
    return {"samples": n_changed, "rebuilt": False}


def _recount(con: duckdb.DuckDBPyConnection, name: str) -> int:
    """snapshot_<name> counted afresh from the snapshot of its source (one scan of it) and marked built, in the
    caller's transaction, which also holds the source's last change; the rows it counted."""
    con.execute(f"CREATE OR REPLACE TABLE {snapshot_name(name)} AS "
                f"{counts_sql(name, snapshot_name(COUNTS[name]))} ORDER BY ALL")
    con.execute(f"INSERT OR IGNORE INTO {BUILT} VALUES (?)", [name])
    return int(con.execute(f"SELECT coalesce(sum(n), 0) FROM {snapshot_name(name)}").fetchone()[0])


def _ensure_meta(con: duckdb.DuckDBPyConnection, reset: bool) -> None:
    if reset:
        for t in (*SNAPSHOT_TABLES, "labels", *COUNTS):
            con.execute(f"DROP TABLE IF EXISTS {snapshot_name(t)}")
        con.execute(f"DROP TABLE IF EXISTS {SOURCES}")
        con.execute(f"DROP TABLE IF EXISTS {META}")
        con.execute(f"DROP TABLE IF EXISTS {BUILT}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {META} (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute(f"INSERT OR REPLACE INTO {META} VALUES ('format', '{FORMAT}')")
    con.execute(f"CREATE TABLE IF NOT EXISTS {SOURCES} (tbl VARCHAR, path VARCHAR, size BIGINT, mtime_ns BIGINT)")
    con.execute(f"CREATE TABLE IF NOT EXISTS {BUILT} (tbl VARCHAR PRIMARY KEY)")
