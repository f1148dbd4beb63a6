"""benchmarks/fuzz_inputs.py: the input fuzz harness still drives the real ingest code."""

from __future__ import annotations

import json


def test_fuzz_harness_runs_the_current_ingest_path_without_failures(capsys):
    """A few seeded cases per format through the fuzz harness: it must keep calling the real ingest code."""
    from benchmarks import fuzz_inputs

    assert fuzz_inputs.main(["--cases", "8", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["cases"] == 32 and report["total"]["rows"] > 0
    assert report["total"]["crashes"] == 0 and report["failures"] == []
