"""`fiqa evaluate`: EDC / ERC evaluation of quality methods on verification benchmarks.

A benchmark is one of:

- an insightface verification ``.bin`` (lfw.bin, cfp_fp.bin, ...: aligned crops, pair k = images 2k, 2k+1);
- a pair list (LFW ``pairs.txt`` or ``key_a key_b is_same``) whose images are aligned crops under
  ``--images-root`` (default: the list's folder);
- a comparison table (CSV / Parquet: ``key_a, key_b, mated`` and optionally ``similarity``);
- the EDC example JSON (similarities and per-algorithm qualities given).

Embeddings come from ``--fr-model`` (any spec of :func:`models.recognition.build_recognizer`)
and are cached in the manifest ``embeddings`` table, or from ``--embeddings`` (Parquet:
``sample_key, embedding``). Qualities come from ``--quality ours`` (a CLIB-FIQA checkpoint,
``--checkpoint``) and from quality files of any method (``--quality [NAME=]scores.csv``).
Outputs under ``<workspace>/reports/evaluate/<run_id>/``: ``results.parquet`` and ``results.md``
(benchmark x method x protocol x FMR -> pAUC / AUC), ``curves.parquet`` and one PNG per
benchmark and FMR; plus Prefect table and markdown artifacts.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (Prefect defaults before prefect is imported)
from data_manifest import ShardWriter, Workspace, catalog
from flows.runtime import add_common_args, main_for, tracked_run
from pipeline import evaluation as ev
from pipeline.benchmarks_io import (
    IMAGE_EXTENSIONS,
    PairList,
    QualityScores,
    bin_pairs,
    match_keys,
    read_edc_json,
    read_pair_list,
    read_quality_file,
)

OURS = "ours"
SCORES_PREFIX = "scores:"
PROTOCOLS = ("edc", "erc")
_KEY_A = ("key_a", "a", "sample_a", "left", "image_a", "path_a")
_KEY_B = ("key_b", "b", "sample_b", "right", "image_b", "path_b")
_MATED = ("mated", "is_same", "issame", "same", "label", "genuine")
_SIM = ("similarity", "score", "sim", "cosine")


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


def _split_named(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path -> (None, PATH)."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and "\\" not in name:
        return name, rest
    return None, spec


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._") or "benchmark"


def _column(names: Sequence[str], candidates: Sequence[str], what: str, src: Path) -> str:
    lowered = {c.lower(): c for c in names}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    raise ValueError(f"{src}: no {what} column (expected one of {list(candidates)}); columns: {list(names)}")


def _read_comparison_table(path: Path) -> tuple[PairList, np.ndarray | None]:
    """Comparisons from CSV / Parquet: key_a, key_b, mated and an optional similarity column."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if path.suffix.lower() in (".parquet", ".pq") else pacsv.read_csv(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read comparison table {path}: {e}") from e
    names = table.column_names
    a = [str(k) for k in table.column(_column(names, _KEY_A, "first-sample key", path)).to_pylist()]
    b = [str(k) for k in table.column(_column(names, _KEY_B, "second-sample key", path)).to_pylist()]
    raw = table.column(_column(names, _MATED, "mated flag", path)).to_pylist()
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


def _read_bin(path: Path) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and issame flags of an insightface verification .bin (restricted unpickler)."""
    from pipeline.readers import load_verification_bin

    vs = load_verification_bin(path)
    return list(vs.images), np.asarray(vs.issame, dtype=bool)


def load_benchmark(spec: str, images_root: str | None = None) -> Benchmark:
    """Open a benchmark from ``[NAME=]PATH``; the kind follows the file suffix."""
    name, raw = _split_named(spec)
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {path} does not exist")
    suffix = path.suffix.lower()
    bname = name or path.stem
    if suffix == ".bin":
        images, issame = _read_bin(path)
        if len(images) != 2 * issame.size:
            raise ValueError(f"{path}: {len(images)} images for {issame.size} pairs (expected 2 per pair)")
        return Benchmark(bname, "bin", path, bin_pairs(issame), images=images)
    if suffix == ".json":
        data = read_edc_json(path)
        return Benchmark(bname, "edc-json", path, data.pairs, similarity=data.similarity, qualities=data.qualities)
    if suffix in (".csv", ".parquet", ".pq"):
        pairs, sims = _read_comparison_table(path)
        root = Path(images_root) if images_root else path.parent
        return Benchmark(bname, "table", path, pairs, similarity=sims, images_root=root)
    pairs = read_pair_list(path)
    root = Path(images_root) if images_root else path.parent
    return Benchmark(bname, "pairs", path, pairs, images_root=root)


def _image_bytes(bench: Benchmark, key: str) -> bytes:
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


def _load_crop(bench: Benchmark, key: str) -> tuple[np.ndarray | None, str | None]:
    """Decode one sample to a 112x112 RGB crop (resized when the file is another size) or give the reason."""
    import cv2

    from pipeline.images import OK, decode

    try:
        data = _image_bytes(bench, key)
    except (OSError, KeyError, IndexError, ValueError) as e:
        return None, f"missing: {e}"
    img = decode(data)
    if img.status != OK or img.rgb is None:
        return None, f"{img.status}: {img.error}"
    rgb = img.rgb
    if rgb.shape[:2] != (112, 112):
        rgb = cv2.resize(rgb, (112, 112), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb), None


def _cached_embeddings(ws: Workspace, ids: list[str], model_id: str) -> dict[str, np.ndarray]:
    """Latest OK embeddings of these samples for this model from the manifest."""
    if not ids:
        return {}
    tbl = catalog.query(
        ws,
        "SELECT sample_id, embedding FROM embeddings WHERE model_id = ? AND status = 'ok' "
        "AND embedding IS NOT NULL",
        [model_id],
    )
    wanted = set(ids)
    out = {}
    for sid, emb in zip(tbl.column("sample_id").to_pylist(), tbl.column("embedding").to_pylist(), strict=True):
        if sid in wanted:
            out[sid] = np.asarray(emb, dtype=np.float32)
    return out


def _read_embeddings_file(path: Path, keys: list[str]) -> Embedded:
    """Precomputed embeddings (Parquet: sample_key, embedding) for the wanted keys."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read embeddings file {path}: {e}") from e
    kc = _column(table.column_names, ("sample_key", "key", "sample_id", "path"), "key", path)
    ec = _column(table.column_names, ("embedding", "embeddings", "feature", "features"), "embedding", path)
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


def _crop_batches(
    bench: Benchmark, keys: list[str], indices: list[int], batch_size: int
) -> Iterator[tuple[list[int], np.ndarray | None, dict[int, str]]]:
    """Decoded crops in batches: (indices decoded, their (n, 112, 112, 3) stack, {index: failure reason})."""
    for start in range(0, len(indices), batch_size):
        ok_idx: list[int] = []
        crops: list[np.ndarray] = []
        failed: dict[int, str] = {}
        for i in indices[start : start + batch_size]:
            crop, err = _load_crop(bench, keys[i])
            if crop is None:
                failed[i] = err or "unreadable"
            else:
                ok_idx.append(i)
                crops.append(crop)
        yield ok_idx, (np.stack(crops) if crops else None), failed


def embed_benchmark(
    bench: Benchmark,
    keys: list[str],
    *,
    ws: Workspace,
    run_id: str,
    fr_model: str,
    device: str = "auto",
    batch_size: int = 64,
    use_cache: bool = True,
) -> Embedded:
    """Embed every sample, reusing embeddings cached in the manifest and writing the new ones (failures too)."""
    from models.recognition import build_recognizer
    from pipeline.ids import sample_id

    recognizer = build_recognizer(fr_model, device=device)
    dim = recognizer.embedding_dim
    sids = [sample_id(f"eval:{bench.name}", k) for k in keys]
    cache = _cached_embeddings(ws, sids, recognizer.model_id) if use_cache else {}
    cache = {s: v for s, v in cache.items() if v.size == dim}
    vectors = np.full((len(keys), dim), np.nan, dtype=np.float32)
    for i, s in enumerate(sids):
        if s in cache:
            vectors[i] = cache[s]
    failures: dict[str, str] = {}
    writer = ShardWriter(ws, "embeddings", run_id)
    todo = [i for i, s in enumerate(sids) if s not in cache]
    for n, (ok_idx, batch, failed) in enumerate(_crop_batches(bench, keys, todo, batch_size)):
        rows = []
        for i, reason in failed.items():
            failures[keys[i]] = reason
            rows.append({"sample_id": sids[i], "model_id": recognizer.model_id, "status": "error", "error": reason})
        if batch is not None:
            emb = recognizer.embed(batch)
            vectors[ok_idx] = emb
            rows += [{"sample_id": sids[i], "model_id": recognizer.model_id, "embedding": e.tolist(),
                      "status": "ok", "error": None} for i, e in zip(ok_idx, emb, strict=True)]
        writer.write(f"{_safe(bench.name)}-{n:05d}", rows)
    return Embedded(keys=keys, vectors=vectors, failures=failures, model_id=recognizer.model_id, cached=len(cache))


def score_benchmark(
    bench: Benchmark, keys: list[str], *, checkpoint: str, device: str = "auto", batch_size: int = 64
) -> np.ndarray:
    """Our CLIB-FIQA quality per sample key (NaN where the image cannot be read)."""
    from models.scorer import load

    scorer = load(checkpoint, device=device, batch_size=batch_size)
    out = np.full(len(keys), np.nan)
    for ok_idx, batch, _ in _crop_batches(bench, keys, list(range(len(keys))), batch_size):
        if batch is not None:
            out[ok_idx] = scorer.score(batch).score
    return out


def cosine_similarity(emb: Embedded, pairs: PairList) -> np.ndarray:
    """Cosine similarity per pair (NaN where either side has no embedding)."""
    pos = {k: i for i, k in enumerate(emb.keys)}
    a = emb.vectors[[pos[k] for k in pairs.a]]
    b = emb.vectors[[pos[k] for k in pairs.b]]
    return np.sum(a.astype(np.float64) * b, axis=1)


def _pair_q(scores: QualityScores | np.ndarray, keys: list[str], pairs: PairList, how: str) -> tuple[np.ndarray, int]:
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


def compute_metrics(
    bench: str,
    fr_model: str,
    sims: np.ndarray,
    mated: np.ndarray,
    qualities: dict[str, tuple[np.ndarray, int]],
    *,
    fmrs: Sequence[float],
    starting_errors: Sequence[float],
    protocols: Sequence[str],
    pauc_limit: float,
    auc_limit: float,
    excluded: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Result rows, curve points and curve objects (for plots) of every method, protocol and operating point."""
    rows: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    base = {"benchmark": bench, "fr_model": fr_model, "mated_pairs": n_mated, "nonmated_pairs": n_non,
            "excluded_pairs": excluded}
    settings: list[tuple[str, float | None, float | None]] = []
    if n_non:
        settings += [("edc", f, None) for f in fmrs]
    settings += [("edc", None, s) for s in starting_errors]
    if "erc" in protocols and n_non:
        settings += [("erc", f, None) for f in fmrs]
    for protocol, fmr, se in settings:
        if protocol not in protocols:
            continue
        label = f"{protocol}_fmr{fmr:g}" if fmr is not None else f"{protocol}_se{se:g}"
        curves[label] = {}
        for method, (pq, missing) in qualities.items():
            row = {**base, "method": method, "protocol": protocol, "fmr": fmr, "starting_error_target": se,
                   "missing_quality_pairs": missing, "pauc_limit": pauc_limit, "auc_limit": auc_limit}
            if protocol == "edc":
                c = ev.edc(sims, pq, mated=mated, fmr=fmr, starting_error=se)
                row.update(threshold=c.threshold, starting_error=c.starting_error, pauc=c.pauc(pauc_limit),
                           pauc_minus_best=c.pauc(pauc_limit, minus_theoretical_best=True),
                           pauc_normalized=c.pauc(pauc_limit, minus_theoretical_best=True, normalize=True),
                           auc=c.pauc(auc_limit), curve_points=int(c.discard.size))
                xs, ys = c.discard, c.error
            else:
                c = ev.erc(sims, pq, mated, fmr=fmr)  # type: ignore[arg-type]
                row.update(threshold=float(c.thresholds[0]), starting_error=float(c.error[0]),
                           pauc=c.auc(pauc_limit), pauc_minus_best=None, pauc_normalized=None,
                           auc=c.auc(auc_limit), curve_points=int(c.discard.size))
                xs, ys = c.discard, c.error
            rows.append(row)
            curves[label][method] = c
            points += [{"benchmark": bench, "method": method, "curve": label, "discard": float(x), "error": float(y)}
                       for x, y in zip(xs, ys, strict=True)]
    return rows, points, curves


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def results_markdown(rows: list[dict[str, Any]], plots: list[str]) -> str:
    """The results as a markdown report: one table per benchmark, lower pAUC/AUC is better."""
    out = ["# Quality evaluation (EDC / ERC)", "",
           "Lower is better. `pauc`: area under the EDC (stepwise) or ERC (trapezoid) on [0, pauc_limit]; "
           "`auc`: the same on [0, auc_limit]; `pauc-best`: minus the theoretical best area; "
           "`norm`: 0 = theoretical best, 1 = no better than random discarding.", ""]
    cols = ["method", "protocol", "fmr", "starting_error_target", "threshold", "starting_error", "pauc",
            "pauc_minus_best", "pauc_normalized", "auc", "missing_quality_pairs"]
    heads = ["method", "protocol", "FMR", "start. err. target", "threshold", "FNMR@0", "pAUC",
             "pAUC-best", "norm", "AUC", "no quality"]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        sub = [r for r in rows if r["benchmark"] == bench]
        first = sub[0]
        out += [f"## {bench}", "",
                f"FR model `{first['fr_model']}`; {first['mated_pairs']} mated, {first['nonmated_pairs']} "
                f"non-mated pairs ({first['excluded_pairs']} excluded: no embedding); pAUC limit "
                f"{first['pauc_limit']:g}, AUC limit {first['auc_limit']:g}.", "",
                "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in sub]
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"- `{p}`" for p in plots] + [""]
    return "\n".join(out)


load_t = task(load_benchmark, name="load-benchmark", retries=1, cache_policy=NO_CACHE)
embed_t = task(embed_benchmark, name="embed-benchmark", cache_policy=NO_CACHE)
score_t = task(score_benchmark, name="score-benchmark", cache_policy=NO_CACHE)
metrics_t = task(compute_metrics, name="compute-metrics", cache_policy=NO_CACHE)


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_manifest.writer import atomic_write

    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _artifacts(rows: list[dict[str, Any]], md: str, run_id: str) -> None:
    """Table and markdown artifacts on the flow run (only inside a Prefect run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:  # outside a flow run there is nothing to attach to
        return
    key = "evaluate-" + re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    slim = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(slim, key=f"{key}-results"[:100], description="EDC/ERC results")
    create_markdown_artifact(md, key=f"{key}-report"[:100], description="EDC/ERC report")


def stored_scores(ws: Workspace, method: str, dataset: str | None = None, name: str | None = None) -> QualityScores:
    """A method's latest scores from the workspace's `scores` table, keyed by sample_id and by source.

    The source key lets benchmark keys find them: `lfw.bin#12` matches the .bin index
    12, `/data/lfw/A/A_0001.jpg` matches the pair-list key `A/A_0001`.
    """
    sql = ("SELECT sc.sample_id, s.source, sc.quality FROM scores sc JOIN samples s USING (sample_id) "
           "WHERE sc.method = $method AND sc.status = 'ok' AND sc.quality IS NOT NULL")
    params: dict[str, Any] = {"method": method}
    if dataset:
        sql += " AND s.dataset = $dataset"
        params["dataset"] = dataset
    rows = catalog.query(ws, sql, params).to_pylist()
    if not rows:
        where = f" of dataset {dataset!r}" if dataset else ""
        raise ValueError(f"no ok scores of method {method!r}{where} in workspace {ws.root} (run 'fiqa score')")
    keys = [r["sample_id"] for r in rows] + [r["source"] for r in rows]
    values = np.array([r["quality"] for r in rows] * 2, dtype=np.float64)
    return QualityScores(method=name or method, keys=keys, values=values, source=f"scores:{method}")


def _parse_qualities(specs: Sequence[str], checkpoint: str | None,
                     ws: Workspace | None = None) -> tuple[bool, list[QualityScores]]:
    """Split quality specs into 'ours', stored scores and external files (all read before any work)."""
    ours = False
    files = []
    for spec in specs:
        name, raw = _split_named(spec)
        if raw == OURS:
            ours = True
        elif raw.startswith(SCORES_PREFIX):
            method, _, dataset = raw.removeprefix(SCORES_PREFIX).partition("@")
            if not method:
                raise ValueError(f"--quality {spec!r}: give a method, e.g. scores:clib-fiqa[@DATASET]")
            files.append(stored_scores(ws or Workspace(), method, dataset or None, name))
        else:
            files.append(read_quality_file(raw, method=name))
    if ours and checkpoint is None:
        raise ValueError("--quality ours needs --checkpoint PATH (a CLIB-FIQA checkpoint)")
    return ours, files


@flow(name="evaluate", log_prints=True)
def evaluate(
    benchmarks: list[str],
    qualities: list[str],
    workspace: str | None = None,
    fr_model: str = "dlib",
    checkpoint: str | None = None,
    fmrs: list[float] | None = None,
    starting_errors: list[float] | None = None,
    protocols: list[str] | None = None,
    pauc_limit: float = 0.3,
    auc_limit: float = 0.95,
    pair_quality: str = "min",
    images_root: str | None = None,
    embeddings: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    use_cache: bool = True,
    run_id: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """EDC / ERC evaluation of quality methods on verification benchmarks (see the module docstring)."""
    from pipeline.plots import plot_edc, plot_erc

    fmrs = list(fmrs) if fmrs else [1e-3]
    starting_errors = list(starting_errors or [])
    protocols = list(protocols) if protocols else list(PROTOCOLS)

    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; use {', '.join(PROTOCOLS)}")
    for lim in (pauc_limit, auc_limit):
        if not 0 < lim <= 1:
            raise ValueError(f"discard limits must lie in (0, 1], got {lim!r}")
    if not benchmarks:
        raise ValueError("give at least one --benchmark")
    ws = Workspace(workspace)
    ours, files = _parse_qualities(qualities, checkpoint, ws)
    params = {"benchmarks": benchmarks, "qualities": qualities, "fr_model": fr_model, "checkpoint": checkpoint,
              "fmrs": list(fmrs), "starting_errors": list(starting_errors), "protocols": list(protocols),
              "pauc_limit": pauc_limit, "auc_limit": auc_limit, "pair_quality": pair_quality,
              "embeddings": embeddings}

    with tracked_run(ws, "evaluate", params, run_id) as state:
        rid = state["run_id"]
        out_dir = Path(output) if output else ws.reports / "evaluate" / rid
        out_dir.mkdir(parents=True, exist_ok=True)
        all_rows: list[dict[str, Any]] = []
        all_points: list[dict[str, Any]] = []
        plots: list[str] = []
        counts: dict[str, int] = {"benchmarks": 0, "pairs": 0, "excluded_pairs": 0, "failed_samples": 0}
        for spec in benchmarks:
            bench = load_t(spec, images_root)
            keys = bench.pairs.keys()
            ours_q = None
            model_label = fr_model
            if bench.similarity is not None:
                sims = bench.similarity
                model_label = "given"
                failures: dict[str, str] = {}
                if ours and bench.kind != "table":
                    raise ValueError(f"benchmark {bench.name} gives similarities, not images: cannot score 'ours'")
                if ours:
                    ours_q = score_t(bench, keys, checkpoint=checkpoint, device=device, batch_size=batch_size)
            else:
                if embeddings is not None:
                    emb = _read_embeddings_file(Path(embeddings), keys)
                else:
                    emb = embed_t(bench, keys, ws=ws, run_id=rid, fr_model=fr_model, device=device,
                                  batch_size=batch_size, use_cache=use_cache)
                model_label = emb.model_id
                sims = cosine_similarity(emb, bench.pairs)
                failures = emb.failures
                if ours:
                    ours_q = score_t(bench, keys, checkpoint=checkpoint, device=device, batch_size=batch_size)
            ok = np.isfinite(sims)
            excluded = int((~ok).sum())
            pairs = PairList(a=[k for k, g in zip(bench.pairs.a, ok, strict=True) if g],
                             b=[k for k, g in zip(bench.pairs.b, ok, strict=True) if g], mated=bench.pairs.mated[ok])
            method_q: dict[str, tuple[np.ndarray, int]] = {}
            for name, q in {**bench.qualities, **{f.method: f for f in files}}.items():
                method_q[name] = _pair_q(q, keys, pairs, pair_quality)
            if ours_q is not None:
                method_q["CLIB-FIQA (ours)"] = _pair_q(ours_q, keys, pairs, pair_quality)
            if not method_q:
                raise ValueError(f"no quality method to evaluate on {bench.name}: give --quality")
            if pairs.mated.sum() == 0:
                raise ValueError(f"benchmark {bench.name} has no usable mated pair")
            if pairs.mated.all() and not starting_errors:
                raise ValueError(f"benchmark {bench.name} has only mated comparisons: an FMR threshold needs "
                                 "non-mated ones; give --starting-error (e.g. 0.05)")
            rows, points, curves = metrics_t(bench.name, model_label, sims[ok], pairs.mated, method_q, fmrs=fmrs,
                                             starting_errors=starting_errors, protocols=protocols,
                                             pauc_limit=pauc_limit, auc_limit=auc_limit, excluded=excluded)
            for label, by_method in curves.items():
                png = out_dir / f"{_safe(bench.name)}_{label}.png"
                title = f"{bench.name} - {label.replace('_', ' ')} - {model_label}"
                if label.startswith("edc"):
                    plot_edc(by_method, png, limit=pauc_limit, title=title)
                else:
                    plot_erc(by_method, png, limit=auc_limit, title=title)
                plots.append(str(png))
            all_rows += rows
            all_points += points
            counts["benchmarks"] += 1
            counts["pairs"] += len(bench.pairs)
            counts["excluded_pairs"] += excluded
            counts["failed_samples"] += len(failures)
        results = _write_parquet(all_rows, out_dir / "results.parquet")
        _write_parquet(all_points, out_dir / "curves.parquet")
        md = results_markdown(all_rows, [Path(p).name for p in plots])
        (out_dir / "results.md").write_text(md, encoding="utf-8")
        _artifacts(all_rows, md, rid)
        state["counts"] = counts
        state["metrics"] = {f"{r['benchmark']}/{r['method']}/{r['protocol']}/"
                            f"{'fmr' if r['fmr'] is not None else 'se'}"
                            f"{r['fmr'] if r['fmr'] is not None else r['starting_error_target']:g}/pauc": r["pauc"]
                            for r in all_rows}
    return {"run_id": rid, "output": str(out_dir), "results": str(results), "plots": plots, "rows": all_rows,
            "counts": counts}


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Options of `fiqa evaluate`."""
    p.add_argument("--benchmark", action="append", required=True, metavar="[NAME=]PATH",
                   help="lfw.bin, a pair list, a comparison CSV/Parquet or an EDC JSON (repeatable)")
    p.add_argument("--quality", action="append", default=[], metavar="ours|[NAME=]FILE|scores:METHOD[@DATASET]",
                   help="'ours' (needs --checkpoint), scores:METHOD[@DATASET] (stored scores of the workspace, "
                        "e.g. scores:clib-fiqa) or a CSV/TSV/Parquet quality file (repeatable; "
                        "an EDC JSON benchmark brings its own)")
    p.add_argument("--fr-model", default="dlib", help="recognition backend spec (default: dlib)")
    p.add_argument("--checkpoint", default=None, help="CLIB-FIQA checkpoint for --quality ours")
    p.add_argument("--embeddings", default=None, help="precomputed embeddings Parquet (sample_key, embedding)")
    p.add_argument("--images-root", default=None, help="folder of aligned crops for pair-list benchmarks")
    p.add_argument("--fmr", type=float, action="append", default=None, help="target FMR (repeatable; default 1e-3)")
    p.add_argument("--starting-error", type=float, action="append", default=None,
                   help="also an EDC with the threshold at this starting FNMR (repeatable)")
    p.add_argument("--protocol", choices=PROTOCOLS, action="append", default=None,
                   help="edc (ISO/IEC 29794-1) and/or erc (CR-FIQA compatible); default both")
    p.add_argument("--pauc-limit", type=float, default=0.3)
    p.add_argument("--auc-limit", type=float, default=0.95)
    p.add_argument("--pair-quality", default="min", choices=["min", "max", "mean", "product", "geometric"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-cache", action="store_true", help="recompute embeddings even when cached")
    p.add_argument("--output", default=None, help="report folder (default: <workspace>/reports/evaluate/<run_id>)")
    add_common_args(p, runner=False)


def run_cli(args: argparse.Namespace) -> int:
    """Run the evaluate flow from parsed options and print where the report went."""
    result = evaluate(
        benchmarks=args.benchmark, qualities=args.quality, workspace=args.workspace, fr_model=args.fr_model,
        checkpoint=args.checkpoint, fmrs=args.fmr or [1e-3], starting_errors=args.starting_error or [],
        protocols=args.protocol or list(PROTOCOLS), pauc_limit=args.pauc_limit, auc_limit=args.auc_limit,
        pair_quality=args.pair_quality, images_root=args.images_root, embeddings=args.embeddings,
        device=args.device, batch_size=args.batch_size, use_cache=not args.no_cache, run_id=args.run_id,
        output=args.output,
    )
    print(json.dumps({k: result[k] for k in ("run_id", "output", "results", "plots", "counts")}, indent=1))
    return 0


main = main_for(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
