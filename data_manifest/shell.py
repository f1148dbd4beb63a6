"""The interactive SQL shell of `fiqa sql` (no query given): one held read-only connection, many statements.

The shell holds one `catalog.Session`: the catalog views are set up once, and every
statement typed passes exactly the checks of `fiqa sql` (sql_guard; a refused one
prints the same message and the shell goes on), so a repeated point lookup pays
no start-up. A statement ends with `;` and may span lines; a line starting with
`.` is a command (`.help` lists them). Results are rendered by the caller's
`render(table, mode)` (the output formats of `fiqa sql`). With a terminal the
shell has line editing and a history file (`$FIQA_SQL_HISTORY`, default
`~/.cache/fiqa/sql_history`); Ctrl-C drops the line being typed or stops the
running statement, Ctrl-D / `.quit` leaves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TextIO

import duckdb
import pyarrow as pa

from data_manifest import sql_guard
from data_manifest.catalog import SQL_DIR, VIEW_NAMES, Session, bundled_sql
from data_manifest.workspace import Workspace

HISTORY_ENV = "FIQA_SQL_HISTORY"  # the history file; set but empty: no history file
HISTORY_LENGTH = 2000
PROMPT, MORE = "fiqa> ", "   ...> "
# What a statement or a command may fail with and the shell reports, going on: bad or refused SQL, a limit,
# a file it cannot read, DuckDB's own errors.
ERRORS = (ValueError, OSError, RuntimeError, duckdb.Error)

HELP = """\
SQL statements end with ';' and may span several lines; each is checked as in 'fiqa sql' (read-only).
.tables              the catalog views
.schema VIEW         the columns of a view and their types
.mode [MODE]         show or set the output format ({modes})
.timer on|off        print each statement's run time
.questions [NAME]    list the bundled questions, or run one by its name
.reload              reopen the catalog (to see runs committed since the shell started)
.help                this text
.quit / .exit        leave (Ctrl-D too); Ctrl-C drops the current line or stops a running statement"""


@contextlib.contextmanager
def main_thread_takes_ctrl_c() -> Iterator[None]:
    """Threads started meanwhile (DuckDB's, the shell's worker) block SIGINT, so Ctrl-C always reaches the main
    thread: one delivered to another thread would not wake the main thread waiting in `input()`."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def history_path() -> Path | None:
    """$FIQA_SQL_HISTORY (empty: no history), else $XDG_CACHE_HOME/fiqa/sql_history (~/.cache by default)."""
    raw = os.environ.get(HISTORY_ENV)
    if raw is not None:
        return Path(raw).expanduser() if raw else None
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fiqa" / "sql_history"


def questions() -> dict[str, str]:
    """The bundled questions (data_manifest/sql/*.sql) by name, each with its first comment line."""
    out = {}
    for p in sorted(SQL_DIR.glob("*.sql")):
        first = next((ln for ln in p.read_text().splitlines() if ln.strip()), "")
        out[p.stem] = first.strip().removeprefix("--").strip() if first.lstrip().startswith("--") else ""
    return out


def complete(text: str) -> bool:
    """True when the text ends with a ';' outside any string, quoted name or comment: a statement to run."""
    i, n, last = 0, len(text), ""
    while i < n:
        c = text[i]
        if c in "'\"":
            j = i + 1
            while j < n and not (text[j] == c and text[j + 1:j + 2] != c):
                j += 2 if text[j] == c else 1  # a doubled quote is one quote inside
            if j >= n:
                return False  # still inside the string
            i, last = j + 1, c
            continue
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                return False
            i = j + 2
            continue
        if not c.isspace():
            last = c
        i += 1
    return last == ";"


class Shell:
    """Reads lines from `stdin` and answers on `stdout` (errors on `stderr`) until `.quit` or end of input.

    `render(table, mode)` is the text of a result in one of `modes`. With `interactive` (default: stdin is
    the process's terminal) lines are read with `input()` (readline's editing and history) and prompted.
    """

    def __init__(self, session: Session, render: Callable[[pa.Table, str], str], modes: Sequence[str], *,
                 mode: str = "table", stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, interactive: bool | None = None) -> None:
        if mode not in modes:
            raise ValueError(f"the shell shows {', '.join(modes)}; format {mode!r} needs a query (and --output)")
        self.session, self.render, self.modes, self.mode = session, render, tuple(modes), mode
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.interactive = (self.stdin is sys.stdin and sys.stdin.isatty()) if interactive is None else interactive
        self.timer = False
        self.buffer: list[str] = []
        self.worker: ThreadPoolExecutor | None = None
        self.ctrl_c = False  # SIGINT is blocked on the main thread outside `ctrl_c_window`
        self.commands: dict[str, Callable[[list[str]], bool | None]] = {
            ".tables": self.do_tables, ".schema": self.do_schema, ".mode": self.do_mode, ".timer": self.do_timer,
            ".questions": self.do_questions, ".reload": self.do_reload, ".help": self.do_help,
            ".quit": self.do_quit, ".exit": self.do_quit}

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        """Read and answer until `.quit` / end of input; 0."""
        if not (self.interactive and hasattr(signal, "pthread_sigmask")):
            return self.loop()
        with main_thread_takes_ctrl_c():  # and only while it waits (`ctrl_c_window`): threads started meanwhile
            self.ctrl_c = True  # never take it from it
            try:
                return self.loop()
            finally:
                self.ctrl_c = False

    @contextlib.contextmanager
    def ctrl_c_window(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) unblocked on the main thread while it waits for a line or an answer."""
        if not self.ctrl_c:
            yield
            return
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def loop(self) -> int:
        if self.interactive:
            self.say(f"fiqa SQL shell on {self.session.ws.root} (read-only). End statements with ';'; "
                     ".help for commands, .quit to leave.")
        while True:
            try:
                line = self.read(MORE if self.buffer else PROMPT)
                if line is None:
                    if self.buffer:  # end of input after an unterminated statement: run it
                        self.feed(";")
                    break
                if not self.feed(line):
                    break
            except KeyboardInterrupt:  # Ctrl-C: drop what was typed (or stop what ran), stay in the shell
                self.buffer.clear()
                if self.interactive:
                    self.say("")
        if self.interactive:
            self.say("")
        return 0

    def read(self, prompt: str) -> str | None:
        if self.interactive:
            try:
                with self.ctrl_c_window():
                    return input(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        return line.removesuffix("\n") if line else None

    def feed(self, line: str) -> bool:
        """One input line: a command (when no statement is open), or part of a statement; False: leave."""
        if not self.buffer:
            if not line.strip():
                return True
            if line.lstrip().startswith("."):
                return self.command(line.strip())
        self.buffer.append(line)
        text = "\n".join(self.buffer)
        if complete(text):
            self.buffer.clear()
            self.execute(text)
        return True

    def command(self, line: str) -> bool:
        name, *args = line.split()
        handler = self.commands.get(name.lower())
        if handler is None:
            self.error(f"unknown command {name!r}; .help lists the commands")
            return True
        try:
            return handler(args) is not False
        except ERRORS as e:
            self.error(str(e))
            return True

    def execute(self, sql: str) -> None:
        """Each statement of the text in turn: checked, run on the held connection, rendered."""
        try:
            statements = [text for text, _ in sql_guard.split(sql)]
            if len(statements) > 1:  # as `fiqa sql` does: every statement passes the checks before any runs
                sql_guard.check(sql, VIEW_NAMES)
        except ValueError as e:
            self.error(str(e))
            return
        for text in statements:
            if not self.show(text):
                return  # a failed statement stops the rest of the line

    def show(self, sql: str) -> bool:
        start = time.perf_counter()
        try:
            tbl = self.query(sql)
            took = time.perf_counter() - start
            self.say(self.render(tbl, self.mode).removesuffix("\n"))
        except ERRORS as e:
            self.error(str(e))
            return False
        except KeyboardInterrupt:
            self.error("cancelled")
            return False
        if self.timer:
            self.say(f"Run Time: {took * 1000:.2f} ms")
        return True

    def query(self, sql: str) -> pa.Table:
        """The session's answer, computed on the shell's one worker thread (its parser connection made once):
        the main thread stays free for Ctrl-C, which interrupts the connection (DuckDB's own check of the
        signal can wait for a long-running task to end)."""
        if self.worker is None:
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fiqa-shell")
        with main_thread_takes_ctrl_c():  # the worker thread starts on the first submit
            answer = self.worker.submit(self.session.query, sql)
        try:
            with self.ctrl_c_window():
                return answer.result()
        except KeyboardInterrupt:
            while not answer.done():  # again until it ends: the first may come before the query started
                self.session.con.interrupt()
                wait([answer], timeout=0.1)
            raise

    def close(self) -> None:
        """Stop the worker thread (the session is the caller's to close)."""
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None

    def say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        self.stdout.flush()
        self.stderr.write(f"error: {text}\n")
        self.stderr.flush()

    # ------------------------------------------------------------ dot commands

    def do_help(self, args: list[str]) -> None:
        self.say(HELP.format(modes="|".join(self.modes)))

    def do_quit(self, args: list[str]) -> bool:
        return False

    def do_tables(self, args: list[str]) -> None:
        self.say("\n".join(sorted(VIEW_NAMES)))

    def do_schema(self, args: list[str]) -> None:
        if len(args) != 1:
            raise ValueError("usage: .schema VIEW (.tables lists the views)")
        view = args[0].lower()
        if view not in VIEW_NAMES:
            raise ValueError(f"no view {args[0]!r}; the views: {', '.join(sorted(VIEW_NAMES))}")
        self.show(f"SELECT column_name, column_type FROM (DESCRIBE {view})")

    def do_mode(self, args: list[str]) -> None:
        if not args:
            self.say(self.mode)
        elif len(args) == 1 and args[0].lower() in self.modes:
            self.mode = args[0].lower()
        else:
            raise ValueError(f"usage: .mode {'|'.join(self.modes)}")

    def do_timer(self, args: list[str]) -> None:
        if not args:
            self.say("on" if self.timer else "off")
        elif len(args) == 1 and args[0].lower() in ("on", "off"):
            self.timer = args[0].lower() == "on"
        else:
            raise ValueError("usage: .timer on|off")

    def do_questions(self, args: list[str]) -> None:
        known = questions()
        if not args:
            width = max(map(len, known), default=0)
            self.say("\n".join(f"{name.ljust(width)}  {about}".rstrip() for name, about in known.items()))
        elif len(args) == 1 and args[0] in known:
            self.show(bundled_sql(args[0]))
        else:
            raise ValueError(f"usage: .questions [NAME]; the questions: {', '.join(known)}")

    def do_reload(self, args: list[str]) -> None:
        with main_thread_takes_ctrl_c():
            self.session.reopen()
        self.say("catalog reopened")


def load_history(path: Path | None) -> Callable[[], None]:
    """Read the history file into readline (when there is readline); returns what saves it at the end."""
    try:
        import readline
    except ImportError:  # no line editing on this platform: the shell still works
        return lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    if path is None:
        return lambda: None
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # none yet

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            print(f"warning: cannot write the shell history {path}: {e.strerror or e}", file=sys.stderr)
    return save


def run(ws: Workspace, render: Callable[[pa.Table, str], str], modes: Sequence[str], *, mode: str = "table",
        allow_external_read: bool = False, timeout_s: float | None = None, memory: str | None = None) -> int:
    """The shell on the process's stdin/stdout, with line editing and history on a terminal."""
    with main_thread_takes_ctrl_c():
        sql_guard.parser()  # this thread's parser connection (it splits each input), its DuckDB threads too
        session = Session(ws, allow_external_read=allow_external_read, timeout_s=timeout_s, memory=memory)
    with session:
        shell = Shell(session, render, modes, mode=mode)
        save = load_history(history_path()) if shell.interactive else (lambda: None)
        try:
            return shell.run()
        finally:
            save()
            shell.close()
