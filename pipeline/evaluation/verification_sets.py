"""Verification benchmarks for quality evaluation: open one, find its images, embed-ready crops, similarities.

A benchmark is one of: an insightface verification ``.bin`` (aligned crops, pair k = images 2k, 2k+1);
a pair list (LFW ``pairs.txt`` or ``key_a key_b is_same``) whose images are aligned crops under an
images root; a comparison table (CSV / Parquet: ``key_a, key_b, mated`` and optionally ``similarity``);
the EDC example JSON (similarities and per-algorithm qualities given). Pure reading and numpy: no
manifest, no Prefect.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.evaluation import metrics as ev
from pipeline.evaluation.formats import (
    IMAGE_EXTENSIONS,
    PairList,
    QualityScores,
    bin_pairs,
    match_keys,
    read_edc_json,
    read_pair_list,
)

_KEY_A = ("key_a", "a", "sample_a", "left", "image_a", "path_a")
_KEY_B = ("key_b", "b", "sample_b", "right", "image_b", "path_b")
_MATED = ("mated", "is_same", "issame", "same", "label", "genuine")
_SIM = ("similarity", "score", "sim", "cosine")
CROP_SIZE = 112


@dataclass
class Benchmark:
    """One benchmark's comparisons and where its images (or given similarities) come from."""

    name: str
    kind: str  # bin | pairs | table | edc-json
    path: Path
    pairs: PairList
    similarity: np.ndarray | None = None
    images: list[bytes] | None = None  # .bin: encoded image per integer key
    images_root: Path | None = None  # pair lists: aligned crops on disk
    qualities: dict[str, QualityScores] = field(default_factory=dict)  # given with the benchmark


@dataclass
class Embedded:
    """Embeddings (rows aligned with ``keys``; NaN rows = failed samples) and per-sample failures."""

    keys: list[str]
    vectors: np.ndarray
    failures: dict[str, str]
    model_id: str = ""
    cached: int = 0


def split_named(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path -> (None, PATH)."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and "\\" not in name:
        return name, rest
    return None, spec


def safe_name(name: str) -> str:
    """A file-name-safe form of a benchmark name."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._") or "benchmark"


def pick_column(names: Sequence[str], candidates: Sequence[str], what: str, src: Path) -> str:
    lowered = {c.lower(): c for c in names}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    raise ValueError(f"{src}: no {what} column (expected one of {list(candidates)}); columns: {list(names)}")


def read_comparison_table(path: Path) -> tuple[PairList, np.ndarray | None]:
    """Comparisons from CSV / Parquet: key_a, key_b, mated and an optional similarity column."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if path.suffix.lower() in (".parquet", ".pq") else pacsv.read_csv(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read comparison table {path}: {e}") from e
    names = table.column_names
    a = [str(k) for k in table.column(pick_column(names, _KEY_A, "first-sample key", path)).to_pylist()]
    b = [str(k) for k in table.column(pick_column(names, _KEY_B, "second-sample key", path)).to_pylist()]
    raw = table.column(pick_column(names, _MATED, "mated flag", path)).to_pylist()
    try:
        mated = np.array([bool(int(v)) if not isinstance(v, bool) else v for v in raw], dtype=bool)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the mated column must hold 0/1 or booleans: {e}") from e
    sim_col = next((c for c in names if c.lower() in _SIM), None)
    sims = None
    if sim_col is not None:
        values = table.column(sim_col).to_pylist()
        if any(v is None for v in values):
            raise ValueError(f"{path}: similarity column {sim_col!r} has empty values")
        sims = np.asarray(values, dtype=np.float64)
    return PairList(a=a, b=b, mated=mated), sims


def read_bin(path: Path) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and issame flags of an insightface verification .bin (restricted unpickler)."""
    from pipeline.readers import load_verification_bin

    vs = load_verification_bin(path)
    return list(vs.images), np.asarray(vs.issame, dtype=bool)


def load_benchmark(spec: str, images_root: str | None = None) -> Benchmark:
    """Open a benchmark from ``[NAME=]PATH``; the kind follows the file suffix."""
    name, raw = split_named(spec)
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {path} does not exist")
    suffix = path.suffix.lower()
    bname = name or path.stem
    if suffix == ".bin":
        images, issame = read_bin(path)
        if len(images) != 2 * issame.size:
            raise ValueError(f"{path}: {len(images)} images for {issame.size} pairs (expected 2 per pair)")
        return Benchmark(bname, "bin", path, bin_pairs(issame), images=images)
    if suffix == ".json":
        data = read_edc_json(path)
        return Benchmark(bname, "edc-json", path, data.pairs, similarity=data.similarity, qualities=data.qualities)
    if suffix in (".csv", ".parquet", ".pq"):
        pairs, sims = read_comparison_table(path)
        root = Path(images_root) if images_root else path.parent
        return Benchmark(bname, "table", path, pairs, similarity=sims, images_root=root)
    pairs = read_pair_list(path)
    root = Path(images_root) if images_root else path.parent
    return Benchmark(bname, "pairs", path, pairs, images_root=root)


def image_bytes(bench: Benchmark, key: str) -> bytes:
    """The encoded image of one sample key (OSError / KeyError when it cannot be found)."""
    if bench.images is not None:
        return bench.images[int(key)]
    root = bench.images_root or bench.path.parent
    base = root / key
    candidates = [base] + [base.with_name(base.name + ext) for ext in IMAGE_EXTENSIONS]
    for c in candidates:
        if c.is_file():
            return c.read_bytes()
    raise FileNotFoundError(f"no image for key {key!r} under {root}")


def load_crop(bench: Benchmark, key: str) -> tuple[np.ndarray | None, str | None]:
    """Decode one sample to a 112x112 RGB crop (resized when the file is another size) or give the reason."""
    import cv2

    from pipeline.images import OK, decode

    try:
        data = image_bytes(bench, key)
    except (OSError, KeyError, IndexError, ValueError) as e:
        return None, f"missing: {e}"
    img = decode(data)
    if img.status != OK or img.rgb is None:
        return None, f"{img.status}: {img.error}"
    rgb = img.rgb
    if rgb.shape[:2] != (CROP_SIZE, CROP_SIZE):
        rgb = cv2.resize(rgb, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb), None


def crop_batches(
    bench: Benchmark, keys: list[str], indices: list[int], batch_size: int
) -> Iterator[tuple[list[int], np.ndarray | None, dict[int, str]]]:
    """Decoded crops in batches: (indices decoded, their (n, 112, 112, 3) stack, {index: failure reason})."""
    for start in range(0, len(indices), batch_size):
        ok_idx: list[int] = []
        crops: list[np.ndarray] = []
        failed: dict[int, str] = {}
        for i in indices[start : start + batch_size]:
            crop, err = load_crop(bench, keys[i])
            if crop is None:
                failed[i] = err or "unreadable"
            else:
                ok_idx.append(i)
                crops.append(crop)
        yield ok_idx, (np.stack(crops) if crops else None), failed


def read_embeddings_file(path: Path, keys: list[str]) -> Embedded:
    """Precomputed embeddings (Parquet: sample_key, embedding) for the wanted keys."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read embeddings file {path}: {e}") from e
    kc = pick_column(table.column_names, ("sample_key", "key", "sample_id", "path"), "key", path)
    ec = pick_column(table.column_names, ("embedding", "embeddings", "feature", "features"), "embedding", path)
    avail = [str(k) for k in table.column(kc).to_pylist()]
    vecs = table.column(ec).to_pylist()
    idx = match_keys(keys, avail)
    dim = len(next(v for v in vecs if v is not None))
    out = np.full((len(keys), dim), np.nan, dtype=np.float32)
    failures = {}
    for j, i in enumerate(idx):
        if i < 0 or vecs[i] is None:
            failures[keys[j]] = f"no embedding in {path.name}"
        else:
            v = np.asarray(vecs[i], dtype=np.float32)
            out[j] = v / max(float(np.linalg.norm(v)), 1e-12)
    return Embedded(keys=keys, vectors=out, failures=failures, model_id=f"file:{path.name}")


def cosine_similarity(emb: Embedded, pairs: PairList) -> np.ndarray:
    """Cosine similarity per pair (NaN where either side has no embedding)."""
    pos = {k: i for i, k in enumerate(emb.keys)}
    a = emb.vectors[[pos[k] for k in pairs.a]]
    b = emb.vectors[[pos[k] for k in pairs.b]]
    return np.sum(a.astype(np.float64) * b, axis=1)


def finite_pairs(pairs: PairList, similarity: np.ndarray) -> PairList:
    """The comparisons with a finite similarity (a pair with a failed sample has NaN)."""
    ok = np.isfinite(similarity)
    return PairList(a=[k for k, g in zip(pairs.a, ok, strict=True) if g],
                    b=[k for k, g in zip(pairs.b, ok, strict=True) if g], mated=pairs.mated[ok])


def pair_qualities(scores: QualityScores | np.ndarray, keys: list[str], pairs: PairList,
                   how: str) -> tuple[np.ndarray, int]:
    """Pair quality; a pair with a missing side gets -inf (discarded first) and is counted."""
    if isinstance(scores, QualityScores):
        per_key = dict(zip(keys, scores.lookup(keys), strict=True))
    else:
        per_key = dict(zip(keys, scores, strict=True))
    qa = np.array([per_key[k] for k in pairs.a], dtype=np.float64)
    qb = np.array([per_key[k] for k in pairs.b], dtype=np.float64)
    missing = np.isnan(qa) | np.isnan(qb)
    pq = ev.pair_quality(np.nan_to_num(qa, nan=-np.inf), np.nan_to_num(qb, nan=-np.inf), how=how)  # type: ignore[arg-type]
    pq[missing] = -np.inf
    return pq, int(missing.sum())
