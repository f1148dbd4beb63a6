"""benchmarks/calibration.py: the threshold-fitting rule the blur and lighting calibrations share."""

from __future__ import annotations

import numpy as np
import pytest


def test_threshold_fit_rule():
    """The calibration's rule: midpoint of the facing 10 % / 90 % quantiles, or the best balanced accuracy."""
    from benchmarks.calibration import fit_threshold

    neg = np.linspace(0.1, 0.5, 11)  # e.g. sharp faces' CPBD; 10 % quantile 0.14
    pos = np.linspace(0.0, 0.04, 11)  # blurred faces; 90 % quantile 0.036
    t = fit_threshold(neg, pos, bad_above=False)
    assert (t.negatives_edge, t.positives_edge) == (pytest.approx(0.14), pytest.approx(0.036))
    assert t.value == 0.088 and t.method == "quantile midpoint" and t.balanced_accuracy == 1.0
    # One odd negative deep among the positives moves it only within the gap: 10 % quantile 0.104 -> 0.07.
    assert fit_threshold([*neg, 0.0], pos, bad_above=False).value == 0.07
    # Mirrored direction: positives above.
    assert fit_threshold(1 - neg, 1 - pos, bad_above=True).value == pytest.approx(1 - 0.088)
    # Overlapping classes: the widest run of best balanced accuracy, (0.3, 0.6) here.
    t = fit_threshold([0.1, 0.2, 0.3, 0.7], [0.6, 0.8, 0.9, 0.25], bad_above=True)
    assert t.method == "best balanced accuracy" and t.value == 0.45 and t.balanced_accuracy == 0.75
    with pytest.raises(ValueError, match="both classes"):
        fit_threshold([], [0.1], bad_above=True)
