"""Calibrate the CPBD blur-class thresholds on real aligned faces with controlled blur.

``python -m benchmarks.calibrate_blur [--fit-photos DIR]`` prints JSON: the two
thresholds fitted on the FIT faces (face-api photos), and per face set and
variant the CPBD spread and the hazy / blurry / clear rates with the fitted
and with the paper's thresholds.

Variants of each 112x112 aligned crop: Gaussian blur of each colour channel
(`scipy.ndimage.gaussian_filter`, sigma 0, 0.5, 1, 1.5, 2, 3 px, rounded to
uint8) and down-then-up sampling by 2, 3, 4 (area down, bilinear up).
Fits (`benchmarks.calibration.fit_threshold`, best balanced accuracy, midpoint
of the widest best interval):

- clear above HIGH: sharp (sigma 0) against sigma >= 1.5 and x4 downsampling;
- hazy below LOW: sigma 3 and x4 against sigma 0, 0.5, 1 and x2.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import cv2
import numpy as np
from scipy import ndimage as ndi

from benchmarks.calibration import fit_threshold, load_sets, per_variant, rates
from data_manifest.vocabulary import CALIBRATED_BLUR_THRESHOLDS, FACTOR_CLASSES, PAPER_BLUR_THRESHOLDS, blur_class
from pipeline.labellers.blur import face_cpbd

SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DOWNSCALES = (2, 3, 4)
CLEAR = ("sigma_0",)
NOT_CLEAR = ("sigma_1.5", "sigma_2", "sigma_3", "down_x4")
HAZY = ("sigma_3", "down_x4")
NOT_HAZY = ("sigma_0", "sigma_0.5", "sigma_1", "down_x2")


def gaussian(crop: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel with `sigma` px (none for 0), rounded back to uint8."""
    if sigma == 0:
        return crop.copy()
    out = np.stack([ndi.gaussian_filter(crop[:, :, k].astype(np.float64), sigma) for k in range(3)], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def down_up(crop: np.ndarray, factor: int) -> np.ndarray:
    """Resolution loss at the same size: area-downsample by `factor`, bilinear back up."""
    h, w = crop.shape[:2]
    small = cv2.resize(crop, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def variants() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        f"sigma_{s:g}": (lambda c, s=s: gaussian(c, s)) for s in SIGMAS
    }
    out.update({f"down_x{f}": (lambda c, f=f: down_up(c, f)) for f in DOWNSCALES})
    return out


def fit(values: dict[str, list[float]]) -> dict[str, object]:
    """The two thresholds from the FIT faces' CPBD per variant."""
    pick = lambda names: [v for n in names for v in values[n]]  # noqa: E731
    high = fit_threshold(pick(CLEAR), pick(NOT_CLEAR), bad_above=False)
    low = fit_threshold(pick(NOT_HAZY), pick(HAZY), bad_above=False)
    if low.value > high.value:
        raise ValueError(f"fitted thresholds are not ordered: low {low} > high {high}")
    return {"thresholds": [low.value, high.value], "low_fit": low.__dict__, "high_fit": high.__dict__}


def report(values: dict[str, list[float]], thresholds: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Per variant: the rate of each blur class under `thresholds`."""
    names = FACTOR_CLASSES["blur"]
    return {v: rates([blur_class(x, thresholds).name for x in xs], names) for v, xs in values.items()}


def spread(values: dict[str, list[float]]) -> dict[str, list[float]]:
    return {v: [round(min(xs), 4), round(statistics.median(xs), 4), round(max(xs), 4)] for v, xs in values.items()}


def run(fit_photos: str | None = None) -> dict[str, object]:
    """The calibration report printed by `main`: the fitted thresholds and, per face set, spreads and rates."""
    sets = load_sets(fit_photos)
    cpbd = {name: per_variant(faces, variants(), lambda f, crop: face_cpbd(crop)) for name, faces in sets.items()}
    fitted = fit(cpbd["fit"])
    calibrated = tuple(fitted["thresholds"])
    out: dict[str, object] = {"fit": fitted, "equals_default": calibrated == CALIBRATED_BLUR_THRESHOLDS,
                              "paper": list(PAPER_BLUR_THRESHOLDS), "sets": {}}
    for name, values in cpbd.items():
        classes = report(values, calibrated)
        not_clear = [x for v in ("sigma_1.5", "sigma_2", "sigma_3") for x in values[v]]
        out["sets"][name] = {
            "faces": len(sets[name]),
            "faces_by_name": [f.name for f in sets[name]],
            "cpbd_min_median_max": spread(values),
            "calibrated": classes,
            "paper": report(values, PAPER_BLUR_THRESHOLDS),
            "targets": {
                "clean_clear": classes["sigma_0"]["clear"],
                "sigma_ge_1.5_not_clear": round(sum(x <= calibrated[1] for x in not_clear) / len(not_clear), 4),
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate_blur", description=__doc__.splitlines()[0])
    p.add_argument("--fit-photos", default=None, help="folder of the face-api photos (default: the model store)")
    args = p.parse_args(argv)
    print(json.dumps(run(args.fit_photos), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
