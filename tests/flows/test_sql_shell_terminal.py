"""`fiqa sql` with no query on a terminal: the prompt, a query's rows, `.timer`, Ctrl-C, and the history file.

The terminal is driven from a fresh Python process (this file run as a script): a pseudo-terminal is opened with
fork(), and forking the test process, whose other tests may have started native threads (the S3 client's), can
crash the child before it runs anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_shell_on_a_terminal(workspace, write_train_catalog, tmp_path):
    import pytest

    pytest.importorskip("pexpect")
    write_train_catalog(workspace, n=4)
    history = tmp_path / "cache" / "sql_history"
    out = subprocess.run([sys.executable, __file__, str(workspace.root), str(history)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = history.read_text().splitlines()
    assert "SELECT count(*) AS n FROM faces;" in lines and ".quit" in lines
    assert not (workspace.root / "x.csv").exists()


def drive(workspace: str, history: str) -> None:
    """The terminal session; an assertion or pexpect error exits non-zero with its traceback."""
    import pexpect

    env = {**os.environ, "FIQA_SQL_HISTORY": history, "HF_HUB_OFFLINE": "1", "TERM": "dumb",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = pexpect.spawn(sys.executable, ["-m", "flows.cli", "sql", "--workspace", workspace],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=30, dimensions=(40, 200))
    try:
        child.expect_exact("fiqa> ")
        child.sendline("SELECT sample_id, dataset FROM samples")
        child.expect_exact("...> ")  # no ';' yet
        child.sendline("WHERE sample_id = 'gen-002';")
        child.expect(r"gen-002\s+gen")
        child.expect_exact("(1 row)")
        child.expect_exact("fiqa> ")
        child.sendline(".timer on")
        child.expect_exact("fiqa> ")
        child.sendline("SELECT count(*) AS n FROM faces;")
        child.expect(r"\n5\s*\r?\n")
        child.expect(r"Run Time: \d+\.\d+ ms")
        child.expect_exact("fiqa> ")
        child.sendline("SELECT sum(hash(a)) FROM range(20000000000) t(a);")  # minutes of work
        child.expect_exact("t(a);\r\n")  # the line was read: the statement runs
        time.sleep(0.3)
        child.sendintr()  # Ctrl-C stops the running statement, not the shell
        child.expect_exact("error: cancelled", timeout=5)
        child.expect_exact("fiqa> ")
        child.sendline("COPY samples TO 'x.csv';")
        child.expect_exact("error: refused: COPY statement")
        child.expect_exact("fiqa> ")
        child.sendline(".quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


if __name__ == "__main__":
    drive(*sys.argv[1:3])
