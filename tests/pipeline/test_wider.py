"""WIDER FACE annotation parser: every field, zero-face entries, skipping, malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.readers.wider import ATTRIBUTES, SKIP_INVALID, SKIP_TOO_SMALL, ParseReport, WiderFormatError, parse

# Written by hand in the layout of wider_face_train_bbx_gt.txt (trailing spaces included).
GT = (
    "0--Parade/0_Parade_marchingband_1_849.jpg\n"
    "1\n"
    "449 330 122 149 0 0 0 0 0 0 \n"
    "0--Parade/0_Parade_Parade_0_904.jpg\n"
    "3\n"
    "361 98 263 339 2 1 1 0 2 1 \n"
    "10 20 8 40 1 0 0 0 1 0 \n"
    "100 200 50 60 0 1 0 1 0 0 \n"
    "0--Parade/0_Parade_marchingband_1_35.jpg\n"
    "0\n"
    "0 0 0 0 0 0 0 0 0 0 \n"
    "1--Handshaking/1_Handshaking_Handshaking_1_357.jpg\n"
    "2\n"
    "5 6 30 31 1 0 1 0 1 1\n"
    "40 50 25 25 0 1 0 0 2 0    \n"
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gt.txt"
    path.write_text(text)
    return path


def test_every_field_and_record(tmp_path: Path) -> None:
    report = ParseReport()
    records = list(parse(write(tmp_path, GT), min_size=10, report=report))
    assert [r.path for r in records] == [
        "0--Parade/0_Parade_marchingband_1_849.jpg",
        "0--Parade/0_Parade_Parade_0_904.jpg",
        "0--Parade/0_Parade_marchingband_1_35.jpg",
        "1--Handshaking/1_Handshaking_Handshaking_1_357.jpg",
    ]
    assert [r.line for r in records] == [1, 4, 9, 12]
    assert [r.n_annotated for r in records] == [1, 3, 0, 2]

    (first,) = records[0].faces
    assert first.box == (449, 330, 122, 149)
    assert first.attributes() == dict.fromkeys(ATTRIBUTES, 0)
    assert first.line == 3

    # Second image: one kept face with every attribute non-zero, one too small, one invalid.
    (kept,) = records[1].faces
    assert kept.box == (361, 98, 263, 339)
    assert kept.attributes() == {
        "blur": 2,
        "expression": 1,
        "illumination": 1,
        "invalid": 0,
        "occlusion": 2,
        "pose": 1,
    }
    assert records[2].faces == ()  # zero-face image, its line of zeros consumed
    a, b = records[3].faces
    assert (a.box, a.blur, a.expression, a.illumination, a.occlusion, a.pose) == ((5, 6, 30, 31), 1, 0, 1, 1, 1)
    assert (b.box, b.expression, b.occlusion, b.line) == ((40, 50, 25, 25), 1, 2, 15)

    assert report.as_dict() == {
        "images": 4,
        "faces": 6,
        "kept": 4,
        "skipped": {SKIP_TOO_SMALL: 1, SKIP_INVALID: 1},
    }


def test_min_size_is_configurable_and_invalid_can_be_kept(tmp_path: Path) -> None:
    path = write(tmp_path, GT)
    report = ParseReport()
    faces = [f for r in parse(path, min_size=30, report=report) for f in r.faces]
    # min side: 122, 263, (8), (invalid 50), 30, 25 -> keep 122, 263, 30
    assert [f.box[2] for f in faces] == [122, 263, 30]
    assert report.skipped == {SKIP_TOO_SMALL: 2, SKIP_INVALID: 1}

    with_invalid = [f for r in parse(path, min_size=0, keep_invalid=True) for f in r.faces]
    assert len(with_invalid) == 6
    assert sum(f.invalid for f in with_invalid) == 1


def test_zero_face_entry_at_end_and_without_zero_line(tmp_path: Path) -> None:
    text = "a/x.jpg\n0\nb/y.jpg\n1\n1 2 40 40 0 0 0 0 0 0 \nc/z.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n"
    records = list(parse(write(tmp_path, text)))
    assert [(r.path, len(r.faces)) for r in records] == [("a/x.jpg", 0), ("b/y.jpg", 1), ("c/z.jpg", 0)]


def test_windows_line_endings_and_blank_lines(tmp_path: Path) -> None:
    text = "a/x.jpg\r\n1\r\n1 2 40 40 0 0 1 0 0 0 \r\n\r\nb/y.jpg\r\n0\r\n0 0 0 0 0 0 0 0 0 0 \r\n"
    records = list(parse(write(tmp_path, text)))
    assert records[0].faces[0].illumination == 1
    assert [r.path for r in records] == ["a/x.jpg", "b/y.jpg"]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a.jpg\n2\n1 2 40 40 0 0 0 0 0 0\n", 4, "declares 2 faces but the file ends after 1"),
        ("a.jpg\n1\n1 2 40 40 0 0 0 0 0\n", 3, "needs 10 integers"),
        ("a.jpg\n1\n1 2 40 40 0 0 x 0 0 0\n", 3, "expected integers"),
        ("a.jpg\ntwo\n", 2, "face count"),
        ("a.jpg\n1\n1 2 40 40 3 0 0 0 0 0\n", 3, "blur=3"),
        ("a.jpg\n1\n1 2 40 40 0 0 0 0 3 0\n", 3, "occlusion=3"),
        ("a.jpg\n1\n1 2 -4 40 0 0 0 0 0 0\n", 3, "negative box size"),
        ("a.jpg\n1\n1 2 40 40 0 0 0 0 0 0\n5 5 40 40 0 0 0 0 0 0\n", 4, "expected an image path"),
        ("a.jpg\n", 2, "missing face count"),
    ],
)
def test_malformed_file_names_the_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(WiderFormatError) as info:
        list(parse(path))
    assert info.value.line == line
    assert f"{path}:{line}:" in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_and_bad_min_size(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(parse(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="min_size"):
        list(parse(write(tmp_path, GT), min_size=-1))
