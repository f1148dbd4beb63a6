"""WIDER FACE ground-truth reader (`wider_face_{train,val}_bbx_gt.txt`).

The format: a relative image path line, a face-count line, then one line per
face `x1 y1 w h blur expression illumination invalid occlusion pose` (usually
with a trailing space). An image with zero faces is followed by one line of
ten zeros. Attribute meanings (Yang et al., CVPR 2016):
blur 0 clear / 1 normal / 2 heavy; expression 0 typical / 1 exaggerated;
illumination 0 normal / 1 extreme; invalid 0 valid / 1 invalid;
occlusion 0 none / 1 partial / 2 heavy; pose 0 typical / 1 atypical.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Attribute columns in file order, with the values each may take.
ATTRIBUTES: tuple[str, ...] = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
ATTRIBUTE_VALUES: dict[str, tuple[int, ...]] = {
    "blur": (0, 1, 2),
    "expression": (0, 1),
    "illumination": (0, 1),
    "invalid": (0, 1),
    "occlusion": (0, 1, 2),
    "pose": (0, 1),
}
N_FIELDS = 4 + len(ATTRIBUTES)  # x1 y1 w h + six attributes
DEFAULT_MIN_SIZE = 20  # pixels; faces whose shorter box side is below this carry no usable attribute cue

# The release layout: <root>/WIDER_<split>/images/<event>/<file>.jpg and <root>/wider_face_split/<gt file>.
SPLITS: tuple[str, ...] = ("train", "val")
SPLIT_DIRS: dict[str, str] = {"train": "WIDER_train", "val": "WIDER_val"}
GT_FILES: dict[str, str] = {"train": "wider_face_train_bbx_gt.txt", "val": "wider_face_val_bbx_gt.txt"}

SKIP_INVALID = "invalid"
SKIP_TOO_SMALL = "too_small"


class WiderFormatError(ValueError):
    """A WIDER FACE annotation file that does not follow the format, with the offending line."""

    def __init__(self, path: str | os.PathLike[str], line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True)
class WiderFace:
    """One annotated face: box (x, y, w, h) in image pixels and the six attribute integers."""

    box: tuple[int, int, int, int]
    blur: int
    expression: int
    illumination: int
    invalid: int
    occlusion: int
    pose: int
    line: int = 0  # 1-based line number in the annotation file

    def attributes(self) -> dict[str, int]:
        """The six attributes by name."""
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclass(frozen=True)
class WiderImage:
    """One image record: its path relative to the split's `images/` folder and its kept faces."""

    path: str
    faces: tuple[WiderFace, ...]
    line: int = 0  # line number of the file-name line
    n_annotated: int = 0  # faces in the file before skipping


@dataclass
class ParseReport:
    """What a parse saw and skipped; filled in while `parse` iterates."""

    images: int = 0
    faces: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        """Plain-dict form for run records and reports."""
        return {"images": self.images, "faces": self.faces, "kept": self.kept, "skipped": dict(self.skipped)}


def split_layout(root: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """(annotation file, images folder) of a split in the WIDER FACE release layout under `root`."""
    if split not in SPLITS:
        raise ValueError(f"unknown WIDER FACE split {split!r}; choose one of {SPLITS}")
    root = Path(root)
    return root / "wider_face_split" / GT_FILES[split], root / SPLIT_DIRS[split] / "images"


def _ints(text: str, path: Path, lineno: int, what: str) -> list[int]:
    try:
        return [int(tok) for tok in text.split()]
    except ValueError as e:
        raise WiderFormatError(path, lineno, f"expected integers for {what}, got {text.strip()!r}") from e


def _face(text: str, path: Path, lineno: int) -> WiderFace:
    values = _ints(text, path, lineno, "a face line")
    if len(values) != N_FIELDS:
        raise WiderFormatError(
            path, lineno, f"a face line needs {N_FIELDS} integers (x1 y1 w h {' '.join(ATTRIBUTES)}), got {len(values)}"
        )
    x, y, w, h, *attrs = values
    if w < 0 or h < 0:
        raise WiderFormatError(path, lineno, f"negative box size w={w} h={h}")
    for name, value in zip(ATTRIBUTES, attrs, strict=True):
        if value not in ATTRIBUTE_VALUES[name]:
            raise WiderFormatError(
                path, lineno, f"{name}={value} is outside its allowed values {ATTRIBUTE_VALUES[name]}"
            )
    return WiderFace((x, y, w, h), *attrs, line=lineno)


def _is_zero_line(text: str) -> bool:
    tokens = text.split()
    return len(tokens) == N_FIELDS and all(t.lstrip("-").isdigit() and int(t) == 0 for t in tokens)


def skip_reason(face: WiderFace, min_size: int, keep_invalid: bool = False) -> str | None:
    """Why a face is not used for training (None: keep it)."""
    if face.invalid and not keep_invalid:
        return SKIP_INVALID
    if min(face.box[2], face.box[3]) < min_size:
        return SKIP_TOO_SMALL
    return None


def parse(
    path: str | os.PathLike[str],
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    keep_invalid: bool = False,
    report: ParseReport | None = None,
) -> Iterator[WiderImage]:
    """Yield one `WiderImage` per image of a WIDER FACE ground-truth file.

    Invalid faces (unless `keep_invalid`) and faces whose shorter box side is
    below `min_size` pixels are dropped; how many and why is counted in
    `report` (pass a `ParseReport` to read it) and logged at the end.
    Raises `WiderFormatError` naming the line of the first malformed entry.
    """
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    path = Path(path)
    report = report if report is not None else ParseReport()
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"cannot open WIDER FACE annotation file {path}: {e}") from e
    with handle:
        lines = enumerate(handle, start=1)
        pending: tuple[int, str] | None = None

        def next_line() -> tuple[int, str] | None:
            nonlocal pending
            if pending is not None:
                item, pending = pending, None
                return item
            for lineno, raw in lines:
                text = raw.strip()
                if text:
                    return lineno, text
            return None

        while (item := next_line()) is not None:
            name_line, name = item
            if name.split()[0].lstrip("-").isdigit() and len(name.split()) > 1:
                raise WiderFormatError(path, name_line, f"expected an image path, got a face line {name!r}")
            count_item = next_line()
            if count_item is None:
                raise WiderFormatError(path, name_line + 1, f"missing face count after {name!r} (file ends)")
            count_line, count_text = count_item
            counts = _ints(count_text, path, count_line, f"the face count of {name!r}")
            if len(counts) != 1 or counts[0] < 0:
                raise WiderFormatError(path, count_line, f"expected one non-negative face count, got {count_text!r}")
            n = counts[0]
            faces: list[WiderFace] = []
            if n == 0:
                # The zero-face entry carries one line of zeros; tolerate files that omit it.
                filler = next_line()
                if filler is not None and not _is_zero_line(filler[1]):
                    pending = filler
            for k in range(n):
                face_item = next_line()
                if face_item is None:
                    raise WiderFormatError(
                        path, count_line + k + 1, f"{name!r} declares {n} faces but the file ends after {k}"
                    )
                faces.append(_face(face_item[1], path, face_item[0]))
            report.images += 1
            report.faces += n
            kept = []
            for face in faces:
                reason = skip_reason(face, min_size, keep_invalid)
                if reason is None:
                    kept.append(face)
                else:
                    report.skipped[reason] += 1
            report.kept += len(kept)
            yield WiderImage(name, tuple(kept), line=name_line, n_annotated=n)
    log.info(
        "parsed %s: %d images, %d faces, kept %d, skipped %s",
        path,
        report.images,
        report.faces,
        report.kept,
        dict(report.skipped) or "none",
    )
