"""benchmarks/sql_fuzz.py: generated hostile SQL through the read-only query path changes no file."""

from __future__ import annotations

import pytest

from benchmarks.sql_fuzz import file_hashes, fuzz_setting, fuzz_statements, run_fuzz


@pytest.mark.slow
def test_generated_hostile_sql_changes_nothing(tmp_path):
    ws, outside, values = fuzz_setting(tmp_path)
    before = file_hashes(ws.root, outside)
    statements = fuzz_statements(600, values)
    counts = run_fuzz(ws, statements)
    assert file_hashes(ws.root, outside) == before
    assert counts["refused"] > 300 and counts["ran"] > 0, counts

