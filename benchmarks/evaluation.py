"""EDC figures and timings as JSON.

``python -m benchmarks.evaluation --example`` prints, for the EDC example data
(10,000 mated comparisons, five quality algorithms), in starting-error mode
0.05 and 0.1: each algorithm's threshold, pAUC at 0.2 and 0.3 with and
without the theoretical best, and the FNMR at each 5 % discard step.

``python -m benchmarks.evaluation [--pairs 1000000]`` times EDC and the ERC
compatibility mode on synthetic comparisons, against a plain ``np.argsort``
of the same quality array (the peer: the sort every EDC needs), as a ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.evaluation.formats import read_edc_json
from pipeline.evaluation.metrics import edc, erc, pair_quality

EXAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "edc" / "example_data.json"
STEPS = np.round(np.arange(0.0, 1.0, 0.05), 2)


def example_figures(path: Path = EXAMPLE) -> dict:
    """Must-show EDC figures on the example data."""
    data = read_edc_json(path)
    out: dict = {"data": str(path.name), "comparisons": len(data.pairs), "discard_steps": STEPS.tolist(), "results": {}}
    for se in (0.05, 0.1):
        block: dict = {}
        for method, q in data.qualities.items():
            pq = pair_quality(q.lookup(data.pairs.a), q.lookup(data.pairs.b))
            curve = edc(data.similarity, pq, starting_error=se)
            block[method] = {
                "threshold": curve.threshold,
                "starting_error": curve.starting_error,
                "curve_points": int(curve.discard.size),
                "pauc_0.2": curve.pauc(0.2),
                "pauc_0.2_minus_best": curve.pauc(0.2, minus_theoretical_best=True),
                "pauc_0.3": curve.pauc(0.3),
                "pauc_0.3_minus_best": curve.pauc(0.3, minus_theoretical_best=True),
                "pauc_0.3_minus_best_normalized": curve.pauc(0.3, minus_theoretical_best=True, normalize=True),
                "fnmr_at_steps": [round(float(v), 6) for v in curve.error_at(STEPS)],
            }
        out["results"][f"starting_error={se}"] = block
    return out


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timings(n: int, repeats: int = 3, seed: int = 0) -> dict:
    """Seconds for EDC on ``n`` comparisons vs a bare argsort of the qualities (the peer)."""
    rng = np.random.default_rng(seed)
    mated = rng.random(n) < 0.1
    sims = np.where(mated, rng.normal(0.6, 0.15, n), rng.normal(0.0, 0.1, n))
    qa, qb = rng.random(n), rng.random(n)
    q = pair_quality(qa, qb)
    q_quantised = np.round(q * 100)  # [0, 100] integer qualities: many ties
    t_sort = _best_of(lambda: np.argsort(q, kind="stable"), repeats)
    t_edc_fnmr = _best_of(lambda: edc(sims, q, starting_error=0.05), repeats)
    t_edc_fmr = _best_of(lambda: edc(sims, q, mated=mated, fmr=1e-3), repeats)
    t_edc_ties = _best_of(lambda: edc(sims, q_quantised, starting_error=0.05), repeats)
    t_erc = _best_of(lambda: erc(sims, q, mated, fmr=1e-3), 1)
    return {
        "pairs": n,
        "mated_fraction": float(mated.mean()),
        "peer": "numpy argsort(kind='stable') of the pair qualities",
        "peer_s": t_sort,
        "edc_all_mated_starting_error_s": t_edc_fnmr,
        "edc_fmr_1e-3_s": t_edc_fmr,
        "edc_integer_quality_s": t_edc_ties,
        "erc_compat_20_steps_s": t_erc,
        "ratio_edc_to_peer": t_edc_fnmr / t_sort,
        "ratio_erc_to_edc_fmr": t_erc / t_edc_fmr,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the example figures or the timings as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.splitlines()[0])
    parser.add_argument("--example", action="store_true", help="print the must-show EDC figures on the example data")
    parser.add_argument("--data", type=Path, default=EXAMPLE, help="EDC example JSON file")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="comparisons for the timing run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = example_figures(args.data) if args.example else timings(args.pairs, args.repeats)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
