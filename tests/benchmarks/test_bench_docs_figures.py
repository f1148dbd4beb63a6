"""The cheap docs figures reproduce (`benchmarks.docs_figures`), and an altered doc value is caught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import docs_figures as D

ROOT = Path(__file__).resolve().parents[2]
# Recomputed here (about 20 s on 2 cores); the validity rows stay in `python -m benchmarks.docs_figures`.
IN_TESTS = ("lighting-calibration", "blur-calibration")  # the validity tables: `make docs-check` (CI)


def _doc(figure_id: str) -> str:
    return (ROOT / D.FIGURES[figure_id].doc).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, Any]]:
    from models.fit_data.face_sets import FaceSetError

    try:
        return {fid: D.FIGURES[fid].compute() for fid in IN_TESTS}
    except FaceSetError as e:  # the calibrations fit on the face-api photos (`make setup` fetches them)
        pytest.skip(f"face-api photos not available: {e}")


def test_figures_md_lists_exactly_the_covered_figures() -> None:
    text = (ROOT / "docs" / "figures.md").read_text(encoding="utf-8")
    table = D.find_table(text, "docs/figures.md", ("figure", "doc"))
    listed = {row[0].strip("`"): row for row in table.rows}
    assert set(listed) == set(D.FIGURES)
    for fid, fig in D.FIGURES.items():
        assert listed[fid][table.column("doc")].strip("`") == fig.doc
        assert fig.command in listed[fid][table.column("command that prints it")], fid
        assert fig.command in _doc(fid) or fig.command.split(" --")[0] in _doc(fid), f"{fig.doc} names no command"


@pytest.mark.slow
@pytest.mark.parametrize("figure_id", IN_TESTS)
def test_doc_figure_reproduces(figure_id: str, reports: dict[str, dict[str, Any]]) -> None:
    result = D.check_figure(figure_id, _doc(figure_id), reports[figure_id])
    assert len(result["checks"]) >= 10
    assert result["ok"], [c for c in result["checks"] if not c["ok"]]


@pytest.mark.slow
@pytest.mark.parametrize(("figure_id", "old", "new"), [
    ("lighting-calibration", "| darker skin (albedo x 0.25), same light | 0.15 |",
     "| darker skin (albedo x 0.25), same light | 0.20 |"),
    ("blur-calibration", "| x4 | 0 / 0.005 / 0.037 |", "| x4 | 0 / 0.008 / 0.037 |"),
    ("blur-calibration", "not clear for 26 / 27", "not clear for 27 / 27"),
])
def test_an_altered_doc_value_is_caught(figure_id: str, old: str, new: str,
                                        reports: dict[str, dict[str, Any]]) -> None:
    text = _doc(figure_id)
    assert text.count(old) == 1, old
    result = D.check_figure(figure_id, text.replace(old, new), reports[figure_id])
    assert not result["ok"]
    assert len([c for c in result["checks"] if not c["ok"]]) == 1  # the altered cell, and only it


def test_a_missing_table_or_row_fails_the_figure() -> None:
    report = {"faces": 9, "balanced_accuracy": {}, "checks": []}
    assert not D.check_figure("label-validity-package", "no table here", report)["ok"]
    text = _doc("label-validity-package").replace("| package (9) | after |", "| package (9) | later |")
    result = D.check_figure("label-validity-package", text, report)
    assert not result["ok"] and "0 rows" in result["checks"][0]["error"]


def test_number_matches_reads_the_printed_precision() -> None:
    assert D.number_matches("0.11", 0.1111) and not D.number_matches("0.12", 0.1111)
    assert D.number_matches("0", 0.004, decimals=2) and not D.number_matches("0", 0.3, decimals=2)
    assert D.number_matches("0.96", 0.9592) and not D.number_matches("0.95", 0.9592)
    assert D.number_matches("0.056", 0.0566, 3, D.CPBD_SLACK) and not D.number_matches("0.055", 0.0566, 3, D.CPBD_SLACK)
