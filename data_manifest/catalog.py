"""The DuckDB catalog: `<table>_history` (all rows) and `<table>` (latest per key) views over the manifests.

Two ways in: `refresh(ws)` folds new shards into the snapshot tables of the
latest views and rewrites the views in `catalog.duckdb` (for the DuckDB CLI and
other tools), and `connect(ws)` / `query(ws, sql)` give an in-memory query
connection with no file access at all: the history views are Arrow datasets
registered from Python, the snapshots come from `catalog.duckdb` attached
read-only (data_manifest/snapshots.py), and the configuration is locked. User
SQL passes `sql_guard`'s checks first, which also read the files it names and
hand them in as tables, and runs under a time and a memory limit (see
docs/architecture.md, "Read-only inspection").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from data_manifest import snapshots, sql_guard
from data_manifest.schemas import SCHEMAS, TABLES, duck_type
from data_manifest.sql_guard import EXTERNAL_READ_HINT, ReadOnlyError
from data_manifest.workspace import Workspace

SQL_DIR = Path(__file__).with_name("sql")
__all__ = ["EXTERNAL_READ_HINT", "ReadOnlyError", "Session", "UserSQL", "connect", "query", "refresh"]


def history_sql(ws: Workspace, table: str) -> str:
    """SELECT over every committed shard of a table (an empty, typed relation when there is none)."""
    files = snapshots.shard_files(ws, table)
    if files:  # the files by name, never a pattern: a workspace path may hold glob characters
        return snapshots.read_shards_sql(table, files)
    cols = ", ".join(f"CAST(NULL AS {duck_type(f.type)}) AS {f.name}" for f in SCHEMAS[table])
    return f"SELECT {cols} WHERE false"


def latest_sql(table: str) -> str:
    """The latest view computed from the whole history (when there is no usable snapshot)."""
    return f"SELECT * FROM {table}_history {snapshots.newest_first(table)}"


VIEW_NAMES: frozenset[str] = frozenset([*TABLES, *(f"{t}_history" for t in TABLES), "labels", *snapshots.COUNTS])


def latest_statements(states: dict[str, snapshots.TableState], snap: str,
                      pending: Callable[[str, list[Path]], str]) -> list[str]:
    """CREATE VIEW statements of the latest views: from the snapshots where usable, else from the history.

    `snap` prefixes the snapshot tables (the attached catalog's alias and a dot, or nothing inside
    catalog.duckdb); `pending(table, files)` is a relation over shards the snapshot has not folded yet.
    """
    stmts = []
    for t in TABLES:
        st = states.get(t)
        if st is None or not st.usable:
            body = latest_sql(t)
        elif not st.pending:
            body = f"SELECT * FROM {snap}{snapshots.snapshot_name(t)}"
        else:
            body = snapshots.overlay_sql(t, snap + snapshots.snapshot_name(t), pending(t, st.pending))
        stmts.append(f"CREATE OR REPLACE VIEW {t} AS {body}")
    lab = states.get("labels")
    touched = [t for t in snapshots.LABEL_INPUTS if lab is not None and states[t].pending]
    if lab is None or not lab.usable:
        body = snapshots.labels_sql()
    elif not touched:
        body = f"SELECT * FROM {snap}{snapshots.snapshot_name('labels')}"
    else:
        ids = "(" + " UNION ".join(f"SELECT sample_id FROM {pending(t, states[t].pending)}" for t in touched) + ")"
        body = snapshots.labels_overlay_sql(snap + snapshots.snapshot_name("labels"), ids,
                                            {t: t for t in snapshots.LABEL_INPUTS})
    stmts.append(f"CREATE OR REPLACE VIEW labels AS {body}")
    for name, source in snapshots.COUNTS.items():  # the kept counts while their source is its snapshot as is
        st = states.get(name)
        kept = st is not None and st.usable and not (touched if source == "labels" else states[source].pending)
        counted = f"SELECT * FROM {snap}{snapshots.snapshot_name(name)}" if kept else snapshots.counts_sql(name, source)
        stmts.append(f"CREATE OR REPLACE VIEW {name} AS {counted}")
    return stmts


def view_statements(ws: Workspace, states: dict[str, snapshots.TableState] | None = None) -> list[str]:
    """CREATE OR REPLACE VIEW statements (reading the Parquet files and snapshot tables) for catalog.duckdb."""
    stmts = [f"CREATE OR REPLACE VIEW {t}_history AS {history_sql(ws, t)}" for t in TABLES]
    return stmts + latest_statements(states or {}, "",
                                     lambda t, files: f"({snapshots.read_shards_sql(t, files)})")


def history_dataset(ws: Workspace, table: str, shards: Sequence[Path] | None = None) -> pads.Dataset:
    """Shards of a table (default: all) as one Arrow dataset with the table schema (older shards: missing = null)."""
    files = [p.as_posix() for p in (snapshots.shard_files(ws, table) if shards is None else shards)]
    sch = SCHEMAS[table]
    if not files:
        return pads.dataset(sch.empty_table())
    return pads.FileSystemDataset.from_paths(files, schema=sch, format=pads.ParquetFileFormat(),
                                             filesystem=pafs.LocalFileSystem())


def connect(ws: Workspace, *, tables: dict[str, pa.Table] | None = None,
            memory: str | None = None, history: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory query connection: catalog views over Arrow datasets, no file access, locked configuration.

    `tables` are registered under their names (the files a user query reads, read by sql_guard); `memory`
    is DuckDB's memory limit (default: Limits.of()). `history=False` registers only the `<table>_history`
    views a latest view falls back on (a table without a usable snapshot), for a script that names no
    `_history` view (`names_history`). A moved or copied workspace first gets its catalog.duckdb views
    rewritten for where it now is (for the DuckDB CLI and other tools).
    """
    check_catalog_file(ws)
    refresh_if_moved(ws)
    con = duckdb.connect(":memory:")
    try:
        stamps: dict[Path, tuple[int, int]] = {}
        files = {t: checked_shards(ws, t, stamps) for t in TABLES}  # listed (and stat'ed) once per connection
        states = _attach_snapshots(con, ws, files, stamps)
        for t in TABLES:
            if history or t not in states or not states[t].usable:
                con.register(f"{t}_history", history_dataset(ws, t, files[t]))
        for t, st in states.items():
            if st.usable and st.pending:
                con.register(f"_pending_{t}", history_dataset(ws, t, st.pending))
        for stmt in latest_statements(states, f"{SNAPSHOT_ALIAS}.", lambda t, _files: f"_pending_{t}"):
            con.execute(stmt)
        for name, tbl in (tables or {}).items():
            con.register(name, tbl)
        _lock_down(con, memory or Limits.of().memory)
    except BaseException:
        con.close()
        raise
    return con


# a history view by name, or what lists the views: SHOW / DESCRIBE, information_schema, duckdb_*(), pragma_*()
_HISTORY_HINTS = ("_history", "show", "describe", "information_schema", "duckdb_", "pragma_")


def names_history(sql: str) -> bool:
    """Whether a script may read a `<table>_history` view or list the views (its text says so). Conservative:
    a comment, a string or a longer word with one of the hints in it counts too."""
    low = sql.lower()
    return any(h in low for h in _HISTORY_HINTS)


def check_catalog_file(ws: Workspace) -> None:
    """Refuse a catalog.duckdb that is a symlink (or not a regular file): it would read, and compact rewrite,
    a file outside the workspace."""
    p = ws.catalog_path
    if p.is_symlink() or (p.exists() and not p.is_file()):
        what = f"a symlink to {os.readlink(p)!r}" if p.is_symlink() else "not a regular file"
        raise ValueError(f"refused: {p} is {what}; the catalog must be a file of the workspace itself "
                         "(remove it and run 'fiqa compact' to rebuild it from the manifests)")


def checked_shards(ws: Workspace, table: str, stamps: dict[Path, tuple[int, int]] | None = None) -> list[Path]:
    """Every shard of a table, each resolved with its symlinks; a shard that leads outside the workspace is refused.

    Each run folder is resolved and checked once, and a shard file itself only when it is a link: the same
    verdict as resolving every shard (a part-*.parquet name is neither '.' nor '..'), at one lstat a shard
    instead of one per path component. That lstat (a stat for a link) also gives each shard's
    `snapshots.file_stamp`, put in `stamps` when given.
    """
    root = os.path.realpath(ws.root)
    folders: dict[str, str | None] = {}  # run folder -> its real path when that lies outside the root, else None
    out = snapshots.shard_files(ws, table)
    for p in out:
        path = os.fspath(p)
        try:
            st: os.stat_result | None = os.lstat(path)
        except OSError:
            st = None  # gone since it was listed: file_stamp says so later
        if st is not None and stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if not sql_guard.inside(real, root):
                raise ValueError(f"refused: shard {p} resolves to {real}, outside the workspace {root}")
            got = snapshots.file_stamp(p)
            if stamps is not None and got is not None:
                stamps[p] = got
            continue
        folder, name = os.path.split(path)
        if folder not in folders:
            real_folder = os.path.realpath(folder)
            folders[folder] = None if sql_guard.inside(real_folder, root) else real_folder
        if folders[folder] is not None:
            raise ValueError(f"refused: shard {p} resolves to {os.path.join(folders[folder], name)}, outside the "
                             f"workspace {root}")
        if stamps is not None and st is not None:
            stamps[p] = (st.st_size, st.st_mtime_ns)
    return out


SNAPSHOT_ALIAS = "snapshot"  # catalog.duckdb, attached read-only to a query connection


def _attach_snapshots(con: duckdb.DuckDBPyConnection, ws: Workspace, files: dict[str, list[Path]],
                      stamps: dict[Path, tuple[int, int]] | None = None,
                      retries: int = 8, wait_s: float = 0.25) -> dict[str, snapshots.TableState]:
    """Attach catalog.duckdb read-only and say which snapshots a query can use ({} without one).

    While a flow folds new shards into it the file is locked for writing: the query waits briefly,
    then answers from the shards themselves (exact, only slower), with a warning.
    """
    if not ws.catalog_path.is_file():
        return {}
    for attempt in range(retries):
        try:
            con.execute(f"ATTACH {snapshots.sql_str(str(ws.catalog_path))} AS {SNAPSHOT_ALIAS} (READ_ONLY)")
            break
        except duckdb.Error as e:
            if "lock" in str(e).lower() and attempt < retries - 1:
                time.sleep(wait_s)
                continue
            warnings.warn(f"catalog {ws.catalog_path} cannot be read now ({type(e).__name__}: {e}); answering "
                          "from the manifest shards, which is slower on a large workspace", stacklevel=3)
            return {}
    return snapshots.table_states(ws, con, SNAPSHOT_ALIAS, files=files, stamps=stamps)


_BUSY = ("lock", "already attached", "in use")  # another process, or a query connection of this one, has the file


def _open_catalog(ws: Workspace, retries: int, wait_s: float) -> tuple[duckdb.DuckDBPyConnection, Path | None] | None:
    """catalog.duckdb opened read-write: (connection, None); or, while queries hold it open read-only, a copy of it
    to write and swap in: (connection, copy path). None (with a warning) if a writer keeps it busy.

    A query attaches catalog.duckdb read-only for as long as it runs, which would keep a writer out; instead the
    writer folds into a copy and renames it over the file. The open queries keep reading the file they opened
    (the old inode), new ones read the new file: a running `fiqa sql` never blocks a flow or `fiqa compact`.
    """
    for attempt in range(retries):
        try:
            return duckdb.connect(str(ws.catalog_path)), None
        except duckdb.Error as e:
            busy = any(w in str(e).lower() for w in _BUSY)
            if not busy and not isinstance(e, duckdb.IOException):
                raise
            if not busy:
                warnings.warn(f"catalog {ws.catalog_path} not refreshed: {e}", stacklevel=3)
                return None
            copy = _copy_if_only_read(ws)
            if copy is not None:
                return duckdb.connect(str(copy)), copy
            if attempt == retries - 1:
                warnings.warn(f"catalog {ws.catalog_path} not refreshed: {e}", stacklevel=3)
                return None
            time.sleep(wait_s)
    return None


def _swap_path(ws: Workspace) -> Path:
    return ws.catalog_path.with_name(ws.catalog_path.name + ".swap")


def _copy_if_only_read(ws: Workspace) -> Path | None:
    """A copy of catalog.duckdb (and its WAL) when only readers hold it (it opens read-only); else None."""
    try:
        duckdb.connect(str(ws.catalog_path), read_only=True).close()
    except duckdb.Error:
        return None  # a writer outside the project's lock (a DuckDB CLI, say) has it
    swap = _swap_path(ws)
    for p in (swap, Path(f"{swap}.wal")):
        p.unlink(missing_ok=True)
    shutil.copyfile(ws.catalog_path, swap)
    wal = Path(f"{ws.catalog_path}.wal")
    if wal.exists():
        shutil.copyfile(wal, f"{swap}.wal")
    return swap


def _swap_in(ws: Workspace, copy: Path) -> None:
    """Rename the written copy over catalog.duckdb; the old file's WAL was replayed into the copy."""
    os.replace(copy, ws.catalog_path)
    Path(f"{ws.catalog_path}.wal").unlink(missing_ok=True)


def history_connection(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """A connection whose latest views are computed from the shards alone (the definition the snapshots must equal;
    what every question cost before them). For checks and benchmarks, not for user SQL: nothing is locked down."""
    con = duckdb.connect(":memory:")
    for t in TABLES:
        con.register(f"{t}_history", history_dataset(ws, t))
    for stmt in latest_statements({}, "", lambda t, _files: ""):
        con.execute(stmt)
    return con


def refresh(ws: Workspace, retries: int = 20, wait_s: float = 0.25, *, fold: bool = True, rebuild: bool = False,
            log: Callable[[str], None] | None = None, folds: list[snapshots.FoldReport] | None = None) -> bool:
    """Fold new shards into the snapshots and rewrite the views in catalog.duckdb.

    `log` receives what the fold has to say (a snapshot rebuilt, and why); `folds` gets its FoldReport.
    Returns False, with a warning, when catalog.duckdb could not be brought up to date: a writer kept it
    busy, or the fold or the view rewrite failed (disk full, out of memory). The shards are committed
    either way and queries answer exactly from them; the next refresh or `fiqa compact` repairs it.
    With `rebuild`, every snapshot is recomputed from all shards (what `fiqa compact` does); its failure raises.
    """
    check_catalog_file(ws)
    with snapshots.exclusive(ws):  # one writer at a time: folds of two finishing runs queue here
        opened = _open_catalog(ws, retries, wait_s)
        if opened is None:
            return False
        con, copy = opened
        try:
            if fold or rebuild:
                report = snapshots.update(con, ws, rebuild=rebuild, log=log)
                if folds is not None:
                    folds.append(report)
            for stmt in view_statements(ws, snapshots.table_states(ws, con)):
                con.execute(stmt)
            con.close()  # checkpointed and released before a copy is renamed over the file
            if copy is not None:
                _swap_in(ws, copy)
            tmp = ws.catalog_root_path.with_name(ws.catalog_root_path.name + ".tmp")
            tmp.write_text(str(ws.root) + "\n", encoding="utf-8")
            os.replace(tmp, ws.catalog_root_path)
        except (duckdb.Error, OSError) as e:
            if rebuild:
                raise
            warnings.warn(f"catalog {ws.catalog_path} not brought up to date ({type(e).__name__}: {e}); queries "
                          "read the new shards directly until the next refresh or 'fiqa compact'", stacklevel=2)
            return False
        finally:
            con.close()
            if copy is not None:
                for p in (copy, Path(f"{copy}.wal")):
                    p.unlink(missing_ok=True)
    return True


def catalog_moved(ws: Workspace) -> bool:
    """True when catalog.duckdb exists but its views were written for another location (a moved or copied
    workspace, or one written before the location was recorded): its absolute paths would read the old place."""
    if not ws.catalog_path.is_file():
        return False
    try:
        recorded = ws.catalog_root_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return True
    return recorded != str(ws.root)


def refresh_if_moved(ws: Workspace) -> bool:
    """Rewrite catalog.duckdb's views when the workspace was moved or copied; True when it rewrote them.

    A workspace that cannot be written (a read-only copy) keeps its stale file, with a warning;
    queries through `connect` never read that file, so they are unaffected.
    """
    if not catalog_moved(ws):
        return False
    try:
        return refresh(ws, fold=False)
    except (OSError, duckdb.Error) as e:
        warnings.warn(f"catalog {ws.catalog_path} was written for another location and could not be "
                      f"rewritten here: {e}", stacklevel=2)
        return False


# ---------------------------------------------------------------- user SQL: checked, file-free, bounded

ENV_TIMEOUT = "FIQA_SQL_TIMEOUT"  # seconds a user query may run (fiqa sql --timeout, --sql-timeout of flows)
ENV_MEMORY = "FIQA_SQL_MEMORY"  # memory a user query may use (fiqa sql --memory, --sql-memory of flows)


@contextlib.contextmanager
def query_limits(timeout: float | None = None, memory: str | None = None) -> Iterator[None]:
    """While a command runs, these (when given) are the limits of every user query of the process and of the
    workers it starts (through $FIQA_SQL_TIMEOUT / $FIQA_SQL_MEMORY); afterwards they are as before."""
    given = {env: str(v) for env, v in ((ENV_TIMEOUT, timeout), (ENV_MEMORY, memory)) if v is not None}
    before = {env: os.environ.get(env) for env in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for env, old in before.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_QUERY_MEMORY = "4GB"


class QueryLimitError(ValueError):
    """A user query ran past its time or memory limit and was stopped."""


@dataclass(frozen=True)
class Limits:
    """What one user query may take: seconds of wall-clock time and DuckDB memory."""

    timeout_s: float
    memory: str

    @classmethod
    def of(cls, timeout_s: float | None = None, memory: str | None = None) -> Limits:
        """Explicit values, else $FIQA_SQL_TIMEOUT / $FIQA_SQL_MEMORY, else the defaults (300 s, 4GB)."""
        if timeout_s is None:
            raw = os.environ.get(ENV_TIMEOUT, "")
            try:
                timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
            except ValueError:
                raise ValueError(f"${ENV_TIMEOUT} must be a number of seconds, got {raw!r}") from None
        if not timeout_s > 0:
            raise ValueError(f"the query time limit must be more than 0 seconds, got {timeout_s}")
        return cls(float(timeout_s), memory or os.environ.get(ENV_MEMORY) or DEFAULT_QUERY_MEMORY)


class _Deadline:
    """One clock for everything a user query runs: each connection is interrupted when the time is up."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.end = time.monotonic() + limits.timeout_s

    @contextlib.contextmanager
    def watch(self, con: duckdb.DuckDBPyConnection) -> Iterator[None]:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error()
        timer = threading.Timer(left, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            yield
        except duckdb.InterruptException:
            raise self.error() from None
        except duckdb.OutOfMemoryException:
            raise QueryLimitError(f"the query needs more than {self.limits.memory} of memory and was stopped "
                                  f"(raise the limit with --memory / --sql-memory or ${ENV_MEMORY})") from None
        finally:
            timer.cancel()

    def error(self) -> QueryLimitError:
        return QueryLimitError(f"the query was stopped after {self.limits.timeout_s:g} s, its time limit "
                               f"(raise it with --timeout / --sql-timeout or ${ENV_TIMEOUT})")


def _lock_down(con: duckdb.DuckDBPyConnection, memory: str, allowed_files: Sequence[str] = ()) -> None:
    try:
        con.execute("SET memory_limit = ?", [memory])
    except duckdb.Error as e:
        raise ValueError(f"bad memory limit {memory!r}: {str(e).splitlines()[0]}") from None
    if allowed_files:
        con.execute("SET allowed_paths = ?", [list(allowed_files)])
    for s in sql_guard.LOCKDOWN:
        con.execute(s)


def _read_with(limits: Limits, deadline: _Deadline) -> Callable[[list[str], str], pa.Table]:
    """How a file reference is read: its reader statement on its own connection, allowed exactly its files."""
    def run(files: list[str], sql: str) -> pa.Table:
        con = duckdb.connect(":memory:")
        try:
            _lock_down(con, limits.memory, sorted({*files, *map(sql_guard.escape_glob, files)}))  # as DuckDB names them
            with deadline.watch(con):
                try:
                    return con.sql(sql).to_arrow_table()
                except (duckdb.InterruptException, duckdb.OutOfMemoryException):
                    raise
                except duckdb.Error as e:
                    raise ValueError(f"cannot read {', '.join(files[:3])}: {str(e).splitlines()[0]}") from None
        finally:
            con.close()
    return run


@contextlib.contextmanager
def _watched(con: duckdb.DuckDBPyConnection, deadline: _Deadline) -> Iterator[None]:
    """Run on `con` until the deadline; limit and file-access errors become clear ones."""
    try:
        with deadline.watch(con):
            yield
    except duckdb.PermissionException as e:  # a file access that got past the checks meets the closed door
        raise ReadOnlyError(f"refused: the query tried to reach a file ({str(e).splitlines()[0]}); "
                            f"{EXTERNAL_READ_HINT}") from e


def _run_script(con: duckdb.DuckDBPyConnection, statements: list[str], params: list | dict | None) -> pa.Table:
    """Run checked statements in order; the last one's result as Arrow (`params` bind to it)."""
    for s in statements[:-1]:
        con.execute(s)
        con.complete()
    return con.sql(statements[-1], params=params).to_arrow_table()


class UserSQL:
    """A checked user script on its own connection: `statements` read no file (sql_guard rewrote their file
    reads into registered tables) and `con` has no file access at all. Run them inside `watch()`; close it."""

    def __init__(self, ws: Workspace, sql: str, *, allow_external_read: bool = False,
                 timeout_s: float | None = None, memory: str | None = None, history: bool = True) -> None:
        """`history=False`: the connection runs nothing but `statements`, so it registers only the history views
        they name or a latest view needs (`names_history`); a caller that runs SQL of its own keeps them all."""
        limits = Limits.of(timeout_s, memory)
        self.deadline = _Deadline(limits)
        planned = sql_guard.plan(ws, sql, VIEW_NAMES, allow_external_read=allow_external_read,
                                 reader=_read_with(limits, self.deadline))
        self.statements = planned.statements
        self.con = connect(ws, tables=planned.tables, memory=limits.memory, history=history or names_history(sql))

    @contextlib.contextmanager
    def watch(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection, interrupted at the time limit; limit and file-access errors become clear ones."""
        with _watched(self.con, self.deadline):
            yield self.con

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> UserSQL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One query connection held for many scripts (the interactive shell): each script passes exactly the checks
    of `query` (sql_guard, the files it names read for it and registered only while it runs) and runs under
    its own time limit on the same locked connection, so a repeated query pays no start-up. Close it."""

    def __init__(self, ws: Workspace, *, allow_external_read: bool = False, timeout_s: float | None = None,
                 memory: str | None = None) -> None:
        self.ws, self.allow_external_read = ws, allow_external_read
        self.limits = Limits.of(timeout_s, memory)
        self.con = connect(ws, memory=self.limits.memory)

    def query(self, sql: str, params: list | dict | None = None) -> pa.Table:
        """The last statement's result of a checked script, as Arrow (ReadOnlyError / ValueError / duckdb.Error)."""
        deadline = _Deadline(self.limits)
        planned = sql_guard.plan(self.ws, sql, VIEW_NAMES, allow_external_read=self.allow_external_read,
                                 reader=_read_with(self.limits, deadline))
        for name, tbl in planned.tables.items():
            self.con.register(name, tbl)
        try:
            with _watched(self.con, deadline):
                return _run_script(self.con, planned.statements, params)
        finally:
            for name in planned.tables:
                self.con.unregister(name)

    def reopen(self) -> None:
        """A new connection over the catalog as it is now (shards committed since, a compacted snapshot)."""
        con = connect(self.ws, memory=self.limits.memory)
        self.con.close()
        self.con = con

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(ws: Workspace, sql: str, params: list | dict | None = None, *, allow_external_read: bool = False,
          timeout_s: float | None = None, memory: str | None = None) -> pa.Table:
    """Run read-only SQL against the catalog views; the result of the last statement as Arrow.

    Every statement passes the same checks and runs in order; `params` bind to the last one. The whole script
    runs under one time limit and one memory limit (`Limits.of`); past either it stops with QueryLimitError.
    """
    with UserSQL(ws, sql, allow_external_read=allow_external_read, timeout_s=timeout_s,
                 memory=memory, history=False) as q, q.watch() as con:
        return _run_script(con, q.statements, params)


def selection_sql(base: str, where: str | None = None, query: str | None = None, *, on_labels: bool = True) -> str:
    """Rows of `base` (or of a user `query`) filtered by a SQL `where`, ordered by sample_id.

    With on_labels, `where` is a condition on the `labels` view (any label, anchor or
    sample column); otherwise on the columns of `base` itself.
    """
    if query is not None:
        if where is not None:
            raise ValueError("give either --query or --where, not both")
        return f"SELECT * FROM ({query}) AS t ORDER BY sample_id"
    if where is not None and not where.strip():
        raise ValueError("--where is empty")
    sql = f"SELECT * FROM ({base}) AS t"
    if where:
        sql += f" WHERE sample_id IN (SELECT sample_id FROM labels WHERE {where})" if on_labels else f" WHERE {where}"
    return sql + " ORDER BY sample_id"


def check_where(where: str) -> None:
    """Check a `--where` condition on the `labels` view with the SQL guard, without running it (deploy time)."""
    sql_guard.check(selection_sql("SELECT sample_id FROM labels", where or ""), VIEW_NAMES)  # spliced as flows do


def bundled_sql(name: str) -> str:
    """Text of a bundled query from data_manifest/sql/<name>.sql."""
    p = SQL_DIR / f"{name}.sql"
    if not p.exists():
        known = sorted(x.stem for x in SQL_DIR.glob("*.sql"))
        raise FileNotFoundError(f"no bundled query {name!r}; known: {known}")
    return p.read_text()
