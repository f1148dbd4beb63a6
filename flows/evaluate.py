"""`fiqa evaluate`: EDC / ERC evaluation of quality methods on verification benchmarks.

Benchmarks (`.bin`, pair lists, comparison tables, the EDC example JSON), embeddings (`--fr-model`, cached
in `embeddings`, or `--embeddings`) and qualities (`--quality ours|scores:METHOD|FILE`) are read by
pipeline.evaluation; results, curves and plots go to `<workspace>/reports/evaluate/<run_id>/` and to
Prefect artifacts. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_manifest import Workspace
from flows import command
from flows.bookkeeping import publish_artifacts
from flows.command import add_common_args, main_for
from flows.runtime import tracked_run
from pipeline.evaluation.benchmark_embedding import embed_benchmark, score_benchmark
from pipeline.evaluation.plots import plot_curves
from pipeline.evaluation.quality_specs import method_pair_qualities, names_ours, parse_qualities
from pipeline.evaluation.report import PROTOCOLS, compute_metrics, pauc_summary, results_markdown, write_rows
from pipeline.evaluation.verification_sets import (
    Benchmark,
    cosine_similarity,
    finite_pairs,
    load_benchmark,
    read_embeddings_file,
    safe_name,
)

PAIR_QUALITY = ("min", "max", "mean", "product", "geometric")
__all__ = ["EvaluateOptions", "evaluate", "evaluate_run"]


@dataclass(frozen=True)
class EvaluateOptions:
    """Everything one `evaluate` run needs: the defaults live here only, validated once."""

    benchmarks: tuple[str, ...] = ()  # [NAME=]PATH of each benchmark
    qualities: tuple[str, ...] = ()  # ours | [NAME=]FILE | scores:METHOD[@DATASET]
    workspace: str | None = None
    run_id: str | None = None
    fr_model: str = "dlib"  # recognition backend spec
    checkpoint: str | None = None  # CLIB-FIQA checkpoint for --quality ours
    fmrs: tuple[float, ...] = (1e-3,)  # target FMRs
    starting_errors: tuple[float, ...] = ()  # EDC thresholds at these starting FNMRs too
    protocols: tuple[str, ...] = PROTOCOLS
    pauc_limit: float = 0.3
    auc_limit: float = 0.95
    pair_quality: str = "min"  # how two sample qualities make a pair quality
    images_root: str | None = None  # aligned crops of pair-list benchmarks (default: the list's folder)
    embeddings: str | None = None  # precomputed embeddings Parquet (sample_key, embedding)
    device: str = "auto"
    batch_size: int = 64
    use_cache: bool = True  # reuse embeddings cached in the manifest
    output: str | None = None  # report folder (default: <workspace>/reports/evaluate/<run_id>)

    def __post_init__(self) -> None:
        for name in ("benchmarks", "qualities", "fmrs", "starting_errors", "protocols"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if not self.fmrs:
            object.__setattr__(self, "fmrs", (1e-3,))
        if not self.protocols:
            object.__setattr__(self, "protocols", PROTOCOLS)
        if not self.benchmarks:
            raise ValueError("give at least one --benchmark")
        for p in self.protocols:
            if p not in PROTOCOLS:
                raise ValueError(f"unknown protocol {p!r}; use {', '.join(PROTOCOLS)}")
        for lim in (self.pauc_limit, self.auc_limit):
            if not 0 < lim <= 1:
                raise ValueError(f"discard limits must lie in (0, 1], got {lim!r}")
        if self.pair_quality not in PAIR_QUALITY:
            raise ValueError(f"unknown pair quality {self.pair_quality!r}; use {', '.join(PAIR_QUALITY)}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.ours and self.checkpoint is None:
            raise ValueError("--quality ours needs --checkpoint PATH (a CLIB-FIQA checkpoint)")

    @property
    def ours(self) -> bool:
        """Whether our CLIB-FIQA checkpoint is one of the methods."""
        return names_ours(self.qualities)


load_t = task(load_benchmark, name="load-benchmark", retries=1, cache_policy=NO_CACHE)
embed_t = task(embed_benchmark, name="embed-benchmark", cache_policy=NO_CACHE)
score_t = task(score_benchmark, name="score-benchmark", cache_policy=NO_CACHE)
metrics_t = task(compute_metrics, name="compute-metrics", cache_policy=NO_CACHE)


def _similarities(opts: EvaluateOptions, bench: Benchmark, keys: list[str], ws: Workspace,
                  rid: str) -> tuple[np.ndarray, str, dict[str, str]]:
    """(similarity per pair, FR model label, failed samples): given with the benchmark, from a file or embedded."""
    if bench.similarity is not None:
        if opts.ours and bench.kind != "table":
            raise ValueError(f"benchmark {bench.name} gives similarities, not images: cannot score 'ours'")
        return bench.similarity, "given", {}
    if opts.embeddings is not None:
        emb = read_embeddings_file(Path(opts.embeddings), keys)
    else:
        emb = embed_t(bench, keys, ws=ws, run_id=rid, fr_model=opts.fr_model, device=opts.device,
                      batch_size=opts.batch_size, use_cache=opts.use_cache)
    return cosine_similarity(emb, bench.pairs), emb.model_id, emb.failures


@flow(name="evaluate", log_prints=True)
def evaluate_run(opts: EvaluateOptions) -> dict[str, Any]:
    """Per benchmark: read, similarities, pair qualities, EDC / ERC metrics, plots; then the report."""
    ws = Workspace(opts.workspace)
    _, files = parse_qualities(opts.qualities, opts.checkpoint, ws)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()
              if k not in ("workspace", "run_id", "device", "batch_size", "use_cache", "output", "images_root")}
    with tracked_run(ws, "evaluate", params, opts.run_id) as state:
        rid = state["run_id"]
        out_dir = Path(opts.output) if opts.output else ws.reports / "evaluate" / rid
        out_dir.mkdir(parents=True, exist_ok=True)
        all_rows: list[dict[str, Any]] = []
        all_points: list[dict[str, Any]] = []
        plots: list[str] = []
        counts: dict[str, int] = {"benchmarks": 0, "pairs": 0, "excluded_pairs": 0, "failed_samples": 0}
        for spec in opts.benchmarks:
            bench = load_t(spec, opts.images_root)
            keys = bench.pairs.keys()
            sims, model_label, failures = _similarities(opts, bench, keys, ws, rid)
            ours_q = None
            if opts.ours:
                ours_q = score_t(bench, keys, checkpoint=opts.checkpoint, device=opts.device,
                                 batch_size=opts.batch_size)
            ok = np.isfinite(sims)
            excluded = int((~ok).sum())
            pairs = finite_pairs(bench.pairs, sims)
            method_q = method_pair_qualities(bench, keys, pairs, files, ours_q, opts.pair_quality)
            if pairs.mated.sum() == 0:
                raise ValueError(f"benchmark {bench.name} has no usable mated pair")
            if pairs.mated.all() and not opts.starting_errors:
                raise ValueError(f"benchmark {bench.name} has only mated comparisons: an FMR threshold needs "
                                 "non-mated ones; give --starting-error (e.g. 0.05)")
            rows, points, curves = metrics_t(bench.name, model_label, sims[ok], pairs.mated, method_q,
                                             fmrs=opts.fmrs, starting_errors=opts.starting_errors,
                                             protocols=opts.protocols, pauc_limit=opts.pauc_limit,
                                             auc_limit=opts.auc_limit, excluded=excluded)
            plots += plot_curves(curves, bench.name, model_label, out_dir, pauc_limit=opts.pauc_limit,
                                 auc_limit=opts.auc_limit, file_stem=safe_name(bench.name))
            all_rows += rows
            all_points += points
            counts["benchmarks"] += 1
            counts["pairs"] += len(bench.pairs)
            counts["excluded_pairs"] += excluded
            counts["failed_samples"] += len(failures)
        results = write_rows(all_rows, out_dir / "results.parquet")
        write_rows(all_points, out_dir / "curves.parquet")
        md = results_markdown(all_rows, [Path(p).name for p in plots])
        (out_dir / "results.md").write_text(md, encoding="utf-8")
        publish_artifacts("EDC/ERC results", markdown={f"evaluate-{rid}-report": md},
                          tables={f"evaluate-{rid}-results": all_rows})
        state["counts"] = counts
        state["metrics"] = pauc_summary(all_rows)
    return {"run_id": rid, "output": str(out_dir), "results": str(results), "plots": plots, "rows": all_rows,
            "counts": counts}


def evaluate(**kwargs: Any) -> dict[str, Any]:
    """Run the `evaluate` flow from keyword options (the fields of EvaluateOptions)."""
    return evaluate_run(EvaluateOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Options of `fiqa evaluate`."""
    p.add_argument("--benchmark", dest="benchmarks", action="append", required=True, metavar="[NAME=]PATH",
                   help="lfw.bin, a pair list, a comparison CSV/Parquet or an EDC JSON (repeatable)")
    p.add_argument("--quality", dest="qualities", action="append", default=None,
                   metavar="ours|[NAME=]FILE|scores:METHOD[@DATASET]",
                   help="'ours' (needs --checkpoint), scores:METHOD[@DATASET] (stored scores of the workspace, "
                        "e.g. scores:clib-fiqa) or a CSV/TSV/Parquet quality file (repeatable; "
                        "an EDC JSON benchmark brings its own)")
    p.add_argument("--fr-model", default="dlib", help="recognition backend spec (default: dlib)")
    p.add_argument("--checkpoint", default=None, help="CLIB-FIQA checkpoint for --quality ours")
    p.add_argument("--embeddings", default=None, help="precomputed embeddings Parquet (sample_key, embedding)")
    p.add_argument("--images-root", default=None, help="folder of aligned crops for pair-list benchmarks")
    p.add_argument("--fmr", dest="fmrs", type=float, action="append", default=None,
                   help="target FMR (repeatable; default 1e-3)")
    p.add_argument("--starting-error", dest="starting_errors", type=float, action="append", default=None,
                   help="also an EDC with the threshold at this starting FNMR (repeatable)")
    p.add_argument("--protocol", dest="protocols", choices=PROTOCOLS, action="append", default=None,
                   help="edc (ISO/IEC 29794-1) and/or erc (CR-FIQA compatible); default both")
    p.add_argument("--pauc-limit", type=float, default=0.3)
    p.add_argument("--auc-limit", type=float, default=0.95)
    p.add_argument("--pair-quality", default="min", choices=PAIR_QUALITY)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="recompute embeddings even when cached")
    p.add_argument("--output", default=None, help="report folder (default: <workspace>/reports/evaluate/<run_id>)")
    add_common_args(p, runner=False)


def run_cli(args: argparse.Namespace) -> int:
    """Run the evaluate flow from parsed options and print where the report went."""
    result = evaluate_run(command.options_from_args(EvaluateOptions, args))
    print(json.dumps({k: result[k] for k in ("run_id", "output", "results", "plots", "counts")}, indent=1))
    return 0


main = main_for(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
