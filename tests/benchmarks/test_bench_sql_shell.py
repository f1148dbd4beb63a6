"""benchmarks/sql_shell.py: lookups in the held shell print what a fresh `fiqa sql` prints, and far sooner."""

from __future__ import annotations

from benchmarks.sql_shell import run


def test_shell_lookups_match_fresh_processes_and_beat_them(tmp_path):
    report = run(samples=2000, lookups=20, peers=1, shard=1000, root=tmp_path / "ws")
    assert report["same_output"] and report["shell"]["n"] == 19 and report["peer_fresh_process"]["n"] == 1
    assert report["ratio"] > 2, report  # a process start against a held connection (about 90x at 100k samples)
