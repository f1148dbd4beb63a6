"""The quality methods of an evaluation: `ours`, stored scores (`scores:METHOD[@DATASET]`) and quality files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data_manifest import Workspace, catalog
from pipeline.evaluation.formats import PairList, QualityScores, read_quality_file
from pipeline.evaluation.verification_sets import Benchmark, pair_qualities, split_named

OURS = "ours"
OURS_LABEL = "CLIB-FIQA (ours)"
SCORES_PREFIX = "scores:"


def names_ours(specs: Sequence[str]) -> bool:
    """Whether our CLIB-FIQA checkpoint is one of the quality methods."""
    return any(split_named(q)[1] == OURS for q in specs)


def stored_scores(ws: Workspace, method: str, dataset: str | None = None, name: str | None = None) -> QualityScores:
    """A method's latest scores from the workspace's `scores` table, keyed by sample_id and by source.

    The source key lets benchmark keys find them: `lfw.bin#12` matches the .bin index
    12, `/data/lfw/A/A_0001.jpg` matches the pair-list key `A/A_0001`.
    """
    params = {"method": method, "dataset": dataset or None}
    rows = catalog.query(ws, catalog.bundled_sql("flows/stored_scores"), params).to_pylist()
    if not rows:
        where = f" of dataset {dataset!r}" if dataset else ""
        raise ValueError(f"no ok scores of method {method!r}{where} in workspace {ws.root} (run 'fiqa score')")
    keys = [r["sample_id"] for r in rows] + [r["source"] for r in rows]
    values = np.array([r["quality"] for r in rows] * 2, dtype=np.float64)
    return QualityScores(method=name or method, keys=keys, values=values, source=f"scores:{method}")


def parse_qualities(specs: Sequence[str], checkpoint: str | None,
                    ws: Workspace | None = None) -> tuple[bool, list[QualityScores]]:
    """Split quality specs into 'ours', stored scores and external files (all read before any work)."""
    ours = False
    files = []
    for spec in specs:
        name, raw = split_named(spec)
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


def method_pair_qualities(bench: Benchmark, keys: list[str], pairs: PairList, files: Sequence[QualityScores],
                          ours: np.ndarray | None, how: str) -> dict[str, Any]:
    """Per method (the benchmark's own, the quality files, ours): (pair quality, pairs missing a side)."""
    method_q = {name: pair_qualities(q, keys, pairs, how)
                for name, q in {**bench.qualities, **{f.method: f for f in files}}.items()}
    if ours is not None:
        method_q[OURS_LABEL] = pair_qualities(ours, keys, pairs, how)
    if not method_q:
        raise ValueError(f"no quality method to evaluate on {bench.name}: give --quality")
    return method_q
