"""Evaluation inputs: verification pair lists, quality score files of any FIQA method, and key matching.

Formats read here:

- Pair lists. LFW ``pairs.txt`` style (optional ``<folds> <pairs>`` header; mated
  lines ``name i j``; non-mated lines ``name1 i name2 j``; keys become
  ``name/name_000i``) and the plain style ``key_a key_b is_same`` (the
  ``pair_list.txt`` of the CR-FIQA scripts), whitespace- or comma-separated.
- Quality score files: CSV / TSV / whitespace text (``key quality`` per line,
  header optional) or Parquet, one file per method, so several methods are
  compared on the same pairs.
- The EDC example JSON of the quality-assessment-evaluation project
  (mated similarity scores by ``"a-b"`` pair ids, qualities per algorithm).

Keys are matched after :func:`normalise_key` (``\\`` -> ``/``, image
extension dropped) and, failing an exact match, by their longest unambiguous
path suffix, so ``Aaron/Aaron_0001`` matches ``/data/lfw/Aaron/Aaron_0001.jpg``
and the ``.bin`` image index ``12`` matches ``images/12.jpg`` and ``lfw.bin#12``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
KEY_COLUMNS = ("sample_key", "key", "sample_id", "sample", "path", "image", "file", "filename", "name")
QUALITY_COLUMNS = ("quality", "quality_score", "score", "q", "value")
_MAX_SUFFIX = 4


@dataclass
class PairList:
    """Comparisons of a verification benchmark: sample keys of both sides and the mated flag."""

    a: list[str]
    b: list[str]
    mated: np.ndarray  # bool, one per pair
    fold: np.ndarray | None = None  # LFW fold index per pair when the header gives folds

    def __post_init__(self) -> None:
        self.mated = np.asarray(self.mated, dtype=bool)
        if not len(self.a) == len(self.b) == self.mated.size:
            raise ValueError(f"pair list sides differ: {len(self.a)}, {len(self.b)}, {self.mated.size} entries")

    def __len__(self) -> int:
        return len(self.a)

    def keys(self) -> list[str]:
        """Distinct sample keys in first-seen order."""
        return list(dict.fromkeys([*self.a, *self.b]))


@dataclass
class QualityScores:
    """Quality scores of one method, keyed by sample key (NaN = the method failed on that sample)."""

    method: str
    keys: list[str]
    values: np.ndarray
    source: str = ""
    _index: dict[str, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if len(self.keys) != self.values.size:
            raise ValueError(f"{self.method}: {len(self.keys)} keys but {self.values.size} values")

    def lookup(self, wanted: Sequence[str]) -> np.ndarray:
        """Quality per wanted key (NaN where the file has no such sample)."""
        idx = match_keys(wanted, self.keys)
        out = np.full(len(wanted), np.nan)
        found = idx >= 0
        out[found] = self.values[idx[found]]
        return out


def normalise_key(key: str) -> str:
    """Canonical sample key: forward slashes ('#' of ``file.bin#12`` too), no leading './', no image extension."""
    k = str(key).strip().replace("\\", "/").replace("#", "/")
    while k.startswith("./"):
        k = k[2:]
    stem, ext = os.path.splitext(k)
    return stem if ext.lower() in IMAGE_EXTENSIONS else k


def _suffixes(key: str) -> Iterable[str]:
    """Path suffixes of a normalised key, longest (the whole key) first."""
    parts = [p for p in key.split("/") if p]
    for n in range(len(parts), 0, -1):
        if n <= _MAX_SUFFIX or n == len(parts):
            yield "/".join(parts[-n:])


def match_keys(wanted: Sequence[str], available: Sequence[str]) -> np.ndarray:
    """Index into ``available`` for each wanted key (-1 when absent or ambiguous)."""
    exact: dict[str, int] = {}
    by_suffix: dict[str, int] = {}
    for i, key in enumerate(available):
        norm = normalise_key(key)
        exact.setdefault(norm, i)
        for s in _suffixes(norm):
            prev = by_suffix.get(s)
            by_suffix[s] = i if prev is None or prev == i else -1
    out = np.full(len(wanted), -1, dtype=np.int64)
    for j, key in enumerate(wanted):
        norm = normalise_key(key)
        hit = exact.get(norm)
        if hit is None:
            for s in _suffixes(norm):
                cand = by_suffix.get(s)
                if cand is not None:
                    hit = cand  # -1 when ambiguous: shorter suffixes cannot be less ambiguous
                    break
        out[j] = -1 if hit is None else hit
    return out


# --------------------------------------------------------------------------- pair lists


def _tokens(line: str) -> list[str]:
    """Split a pair-list line on commas or whitespace."""
    return [t for t in (line.replace(",", " ").replace("\t", " ")).split(" ") if t]


def _is_int(token: str) -> bool:
    return token.lstrip("+-").isdigit()


def _lfw_key(name: str, index: str, ext: str) -> str:
    return f"{name}/{name}_{int(index):04d}{ext}"


def read_pair_list(path: str | os.PathLike[str], fmt: str = "auto", ext: str = "") -> PairList:
    """Read a pair list; ``fmt`` is ``lfw``, ``simple`` or ``auto`` (LFW when it has the header or 4-token lines)."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read pair list {p}: {e}") from e
    rows = [(n + 1, _tokens(ln)) for n, ln in enumerate(lines) if ln and not ln.startswith("#")]
    if not rows:
        raise ValueError(f"pair list {p} is empty")
    header: tuple[int, int] | None = None
    if len(rows[0][1]) == 2 and all(_is_int(t) for t in rows[0][1]):
        header = (int(rows[0][1][0]), int(rows[0][1][1]))
        rows = rows[1:]
    if fmt == "auto":
        fmt = "lfw" if header is not None or any(len(t) == 4 for _, t in rows) else "simple"
    if fmt not in ("lfw", "simple"):
        raise ValueError(f"unknown pair list format {fmt!r}; use lfw, simple or auto")
    a: list[str] = []
    b: list[str] = []
    mated: list[bool] = []
    for lineno, t in rows:
        if fmt == "lfw" and len(t) == 3 and _is_int(t[1]) and _is_int(t[2]):
            a.append(_lfw_key(t[0], t[1], ext))
            b.append(_lfw_key(t[0], t[2], ext))
            mated.append(True)
        elif fmt == "lfw" and len(t) == 4 and _is_int(t[1]) and _is_int(t[3]):
            a.append(_lfw_key(t[0], t[1], ext))
            b.append(_lfw_key(t[2], t[3], ext))
            mated.append(False)
        elif fmt == "simple" and len(t) == 3 and t[2] in ("0", "1", "True", "False", "true", "false"):
            a.append(t[0])
            b.append(t[1])
            mated.append(t[2] in ("1", "True", "true"))
        else:
            raise ValueError(f"{p}:{lineno}: not a {fmt} pair line: {' '.join(t)!r}")
    fold = None
    if header is not None:
        folds, per_fold = header
        if per_fold > 0 and folds * per_fold * 2 == len(a):
            fold = np.arange(len(a)) // (2 * per_fold)
    return PairList(a=a, b=b, mated=np.asarray(mated), fold=fold)


def write_pair_list(path: str | os.PathLike[str], pairs: PairList) -> Path:
    """Write the plain ``key_a key_b is_same`` format (keys must not contain whitespace)."""
    p = Path(path)
    bad = [k for k in pairs.keys() if not k or any(c.isspace() for c in k)]
    if bad:
        raise ValueError(f"pair keys with whitespace cannot be written to a pair list: {bad[:3]}")
    text = "".join(f"{x} {y} {int(m)}\n" for x, y, m in zip(pairs.a, pairs.b, pairs.mated, strict=True))
    p.write_text(text, encoding="utf-8")
    return p


def bin_pairs(issame: Sequence[bool] | np.ndarray) -> PairList:
    """Pairs of an insightface verification ``.bin``: images 2k and 2k+1 form pair k; keys are image indices."""
    flags = np.asarray(issame, dtype=bool)
    idx = np.arange(flags.size)
    return PairList(a=[str(i) for i in 2 * idx], b=[str(i) for i in 2 * idx + 1], mated=flags)


# --------------------------------------------------------------------------- quality files


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, src: Path) -> str:
    """Choose the key or quality column: the one asked for, else the first known name present."""
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{src}: no {what} column {wanted!r}; columns: {list(columns)}")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    raise ValueError(f"{src}: cannot tell the {what} column among {list(columns)}; name it explicitly")


def _to_float(token: str, src: Path, lineno: int) -> float:
    t = token.strip()
    if t == "" or t.lower() in ("nan", "na", "none", "null"):
        return float("nan")
    try:
        return float(t)
    except ValueError as e:
        raise ValueError(f"{src}:{lineno}: quality {token!r} is not a number") from e


def read_quality_file(
    path: str | os.PathLike[str],
    *,
    method: str | None = None,
    key_column: str | None = None,
    quality_column: str | None = None,
) -> QualityScores:
    """Read one method's quality scores from CSV / TSV / text or Parquet (method name defaults to the file stem)."""
    p = Path(path)
    name = method or p.stem
    if not p.is_file():
        raise FileNotFoundError(f"quality file {p} does not exist")
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise ValueError(f"cannot read Parquet quality file {p}: {e}") from e
        kc = _pick(table.column_names, key_column, KEY_COLUMNS, "key", p)
        qc = _pick(table.column_names, quality_column, QUALITY_COLUMNS, "quality", p)
        keys = [str(k) for k in table.column(kc).to_pylist()]
        values = np.array([np.nan if v is None else float(v) for v in table.column(qc).to_pylist()])
        return QualityScores(method=name, keys=keys, values=values, source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read quality file {p}: {e}") from e
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if "," in first:
        rows = list(csv.reader(text.splitlines()))
    elif "\t" in first:
        rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    else:
        rows = [ln.split() for ln in text.splitlines()]
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"quality file {p} is empty")
    head = [c.strip() for c in rows[0]]
    has_header = bool(key_column or quality_column) or (len(head) >= 2 and not _looks_numeric(head[1]))
    if has_header:
        kc = _pick(head, key_column, KEY_COLUMNS, "key", p)
        qc = _pick(head, quality_column, QUALITY_COLUMNS, "quality", p)
        ki, qi, body, offset = head.index(kc), head.index(qc), rows[1:], 2
    else:
        ki, qi, body, offset = 0, 1, rows, 1
    keys, values = [], []
    for n, r in enumerate(body):
        if len(r) <= max(ki, qi):
            raise ValueError(f"{p}:{n + offset}: expected a key and a quality, got {r!r}")
        keys.append(r[ki].strip())
        values.append(_to_float(r[qi], p, n + offset))
    return QualityScores(method=name, keys=keys, values=np.asarray(values), source=str(p))


def _looks_numeric(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return token.strip().lower() in ("nan", "")
    return True


def write_quality_file(path: str | os.PathLike[str], scores: QualityScores) -> Path:
    """Write ``sample_key,quality`` CSV or Parquet (by suffix): the format other methods' scores are read in."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"sample_key": scores.keys, "quality": scores.values}), p)
        return p
    with p.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_key", "quality"])
        for k, v in zip(scores.keys, scores.values, strict=True):
            w.writerow([k, "" if np.isnan(v) else repr(float(v))])
    return p


# --------------------------------------------------------------------------- EDC example JSON


@dataclass
class ScoredComparisons:
    """Comparisons with given similarity scores plus per-method sample qualities (the EDC example format)."""

    pairs: PairList
    similarity: np.ndarray
    qualities: dict[str, QualityScores]


def read_edc_json(path: str | os.PathLike[str]) -> ScoredComparisons:
    """Read the quality-assessment-evaluation example JSON (``similarity_scores`` + per-algorithm qualities)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        block = data["similarity_scores"]
        kind = str(block["type"]).lower().replace("-", "").replace("_", "")
        scores = block["scores_by_pair_ids"]
        per_method = data["quality_scores_by_sample_id_per_algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is not an EDC example JSON file: {e}") from e
    if kind not in ("mated", "nonmated"):
        raise ValueError(f"{p}: similarity score type must be mated or non-mated, got {block['type']!r}")
    a, b = [], []
    for pair_id in scores:
        left, sep, right = str(pair_id).partition("-")
        if not sep:
            raise ValueError(f"{p}: pair id {pair_id!r} is not 'sampleA-sampleB'")
        a.append(left)
        b.append(right)
    pairs = PairList(a=a, b=b, mated=np.full(len(a), kind == "mated"))
    qualities = {
        name: QualityScores(method=name, keys=list(q), values=np.array(list(q.values()), dtype=np.float64),
                            source=str(p))
        for name, q in per_method.items()
    }
    sims = np.array(list(scores.values()), dtype=np.float64)
    return ScoredComparisons(pairs=pairs, similarity=sims, qualities=qualities)
