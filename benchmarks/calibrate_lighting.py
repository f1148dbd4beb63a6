"""Calibrate the analytic lighting rule (`pipeline.labellers.lighting.LightingRule`) on real aligned faces.

``python -m benchmarks.calibrate_lighting [--fit-photos DIR]`` prints JSON: the
rule fitted on the FIT faces (face-api photos), and per face set and variant
the spread of every measure and the extreme / normal lighting rates with the
fitted rule.

Variants of each 112x112 aligned crop (`pipeline.synthetic.degrade`): clean; `dark`
levels 1-3 (gamma / gain 1.5 / 0.7, 2 / 0.5, 3 / 0.35); `overexpose` levels
1-3 (+1, +2, +3 stops in linear light, clipped); `side_light` levels 1-3 (the
image-right half at 0.25, 0.1, 0.03 of its linear light). Each threshold is
fitted by `benchmarks.calibration.fit_threshold` (quantile midpoint) between the
clean faces and the strong levels (2 and 3) of the degradation it targets:

- p99_low (luminance_p99): dark 2-3 (the highlights, so that a darker skin under good
  light, which lowers the mean and raises the under-exposed share, is not called dark);
- over_max (over_exposure): overexpose 2-3;
- ratio_min (half_median_ratio): side_light 2-3.

mean_high is not fitted: clean faces vary too much in brightness for the few fit
faces to place it, so it stays at OFIQ's upper LuminanceMean sigmoid centre, 0.8.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import numpy as np

from benchmarks.calibration import fit_threshold, load_sets, per_variant, rates
from data_manifest.vocabulary import FACTOR_CLASSES
from pipeline.labellers.lighting import (
    DEFAULT_RULE,
    MEASURES,
    LightingRule,
    face_region,
    lighting_decision,
    lighting_measures,
)
from pipeline.synthetic.degrade import darker_skin, degrade

LEVELS = (1, 2, 3)
KINDS = ("dark", "overexpose", "side_light")
STRONG = (2, 3)
OFIQ_MEAN_HIGH = 0.8  # OFIQ LuminanceMean: quality 100 * S(mean; 0.2, 0.05) * (1 - S(mean; 0.8, 0.05))
# rule field -> (measure, positives are above the threshold, targeted degradation)
FITS: dict[str, tuple[str, bool, str]] = {
    "p99_low": ("luminance_p99", False, "dark"),
    "over_max": ("over_exposure", True, "overexpose"),
    "ratio_min": ("half_median_ratio", False, "side_light"),
}
EXPECTED_EXTREME = tuple(f"{k}_{lv}" for k in ("dark", "overexpose") for lv in STRONG)


def variants() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {"clean": lambda c: c}
    out.update({f"{k}_{lv}": (lambda c, k=k, lv=lv: degrade(c, k, lv)) for k in KINDS for lv in LEVELS})
    return out


def fit(measures: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """The rule's thresholds from the FIT faces' measures per variant."""
    fields: dict[str, float] = {"mean_high": OFIQ_MEAN_HIGH}
    fits: dict[str, dict[str, object]] = {}
    for field, (measure, bad_above, kind) in FITS.items():
        neg = [m[measure] for m in measures["clean"]]
        pos = [m[measure] for lv in STRONG for m in measures[f"{kind}_{lv}"]]
        t = fit_threshold(neg, pos, bad_above)
        fields[field] = t.value
        fits[field] = {"measure": measure, "positives": f"{kind} levels {STRONG}", **t.__dict__}
    rule = LightingRule(**fields)
    return {"rule": rule.to_dict(), "fits": fits}


def report(measures: dict[str, list[dict[str, float]]], rule: LightingRule) -> dict[str, dict[str, float]]:
    names = FACTOR_CLASSES["lighting"]
    return {v: rates([lighting_decision(m, rule)[1].name for m in ms], names) for v, ms in measures.items()}


def spread(measures: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per variant and measure: min, median, max."""
    out: dict[str, dict[str, list[float]]] = {}
    for v, ms in measures.items():
        out[v] = {}
        for k in MEASURES:
            xs = [m[k] for m in ms]
            out[v][k] = [round(min(xs), 4), round(statistics.median(xs), 4), round(max(xs), 4)]
    return out


def run(fit_photos: str | None = None) -> dict[str, object]:
    """The calibration report printed by `main`: the fitted rule and, per face set, rates, targets and spreads."""
    sets = load_sets(fit_photos)
    measures = {name: per_variant(faces, variants(), lambda f, crop: lighting_measures(crop, f.landmarks))
                for name, faces in sets.items()}
    for name, faces in sets.items():  # reported, never fitted: a darker skin under the same light stays "normal"
        measures[name]["darker_skin"] = [
            lighting_measures(darker_skin(f.crop, face_region(f.landmarks)[0]), f.landmarks) for f in faces]
    fitted = fit(measures["fit"])
    rule = LightingRule(**fitted["rule"])
    out: dict[str, object] = {"fit": fitted, "equals_default_rule": rule == DEFAULT_RULE, "sets": {}}
    for name, ms in measures.items():
        classes = report(ms, rule)
        extreme = [c["extreme lighting"] for v, c in classes.items() if v in EXPECTED_EXTREME]
        out["sets"][name] = {
            "faces": len(sets[name]),
            "rates": classes,
            "targets": {
                "clean_normal": classes["clean"]["normal lighting"],
                "dark_or_overexposed_levels_2_3_extreme": round(sum(extreme) / len(extreme), 4),
                "darker_skin_normal": classes["darker_skin"]["normal lighting"],
                "side_light_levels_2_3_extreme": round(
                    (classes["side_light_2"]["extreme lighting"] + classes["side_light_3"]["extreme lighting"]) / 2, 4),
            },
            "measures_min_median_max": spread(ms),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate_lighting", description=__doc__.splitlines()[0])
    p.add_argument("--fit-photos", default=None, help="folder of the face-api photos (default: the model store)")
    args = p.parse_args(argv)
    print(json.dumps(run(args.fit_photos), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
