"""Label invariance under degradations: how often a degradation flips the classes of the factors it should not touch.

For each degradation (dark, Gaussian blur sigma >= 1.5 px at 112, 4x
downscale, each occluder, ...) and each factor (occlusion, pose, expression,
blur, lighting), a face's degraded copy is compared with the same face's clean
copy: the factor FLIPS when its class differs from the clean copy's class.
Pairs whose clean copy has no class are not counted; a degraded copy without a
class (no face, failed label) while the clean copy had one counts as UNKNOWN,
reported apart and not as a flip. `flip_rate` = flips / (pairs - unknown). The
factor a degradation targets is not a flip: its cell says "expected".

Face sizes split both the variant rates and the matrix: faces whose side in
the ORIGINAL photo (the detector box's shorter side) is under `SMALL_FACE` px
vs at least that, plus all faces. `headline_checks` turns the issue's figures
into value / target / ok rows. Everything here is a pure function of outcomes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import validity as V

INVARIANCE_FACTORS: tuple[str, ...] = ("occlusion", "pose", "expression", "blur", "lighting")
EXPECTED = "expected"
SMALL_FACE = 100.0  # px, the detector box's shorter side in the original photo
MIN_CHECKED_FACE = 48.0  # px: clean faces from this size on must be unobstructed
ALL, SMALL, LARGE = "all", f"< {SMALL_FACE:g} px", f">= {SMALL_FACE:g} px"
FLIP_TARGET = 0.10
BENIGN = "benign"  # models.fit_data.occluders.BENIGN: a paste that covers no key region (no target factor)


@dataclass(frozen=True)
class Degradation:
    """A matrix row: which variants it pools and the factor(s) it targets (their change is expected)."""

    name: str
    targets: tuple[str, ...]
    match: Callable[[str, int], bool]


def _kind(kind: str, min_level: int = 0) -> Callable[[str, int], bool]:
    return lambda k, lv: k == kind and lv >= min_level


def _blur_sigma_from(sigma: float) -> int:
    return next(lv for lv in range(1, 20) if V.BLUR_SIGMA_PER_LEVEL * lv >= sigma)


def degradations(occluder_kinds: Sequence[str] = ()) -> list[Degradation]:
    """The matrix rows: lighting and blur degradations, the grey patch, then one row per pasted occluder kind."""
    rows = [
        Degradation("dark (level >= 2)", ("lighting",), _kind("dark", 2)),
        Degradation("overexposed (+2 stops or more)", ("lighting",), _kind("overexpose", 2)),
        Degradation("side light (level >= 2)", ("lighting",), _kind("side_light", 2)),
        Degradation(f"Gaussian blur sigma >= {V.NOT_CLEAR_SIGMA} px", ("blur",),
                    _kind("blur", _blur_sigma_from(V.NOT_CLEAR_SIGMA))),
        Degradation("downscale 4x", ("blur",), _kind("downscale", 2)),
        Degradation("darker skin (same light)", (), _kind(V.DARKER_SKIN)),
        Degradation("grey patch (nose and mouth)", ("occlusion",), _kind("occlusion", 2)),
    ]
    for kind in occluder_kinds:
        family = kind.removeprefix(V.OCCLUDER_PREFIX)
        targets = () if family == BENIGN else ("occlusion",)
        rows.append(Degradation(f"occluder {family}", targets, _kind(kind)))
    return rows


def occluder_kinds(outcomes: Sequence[V.Outcome]) -> list[str]:
    """The pasted-occluder variant kinds present, in first-seen order."""
    return list(dict.fromkeys(o.kind for o in outcomes if o.kind.startswith(V.OCCLUDER_PREFIX)))


def _label(o: V.Outcome, factor: str) -> str | None:
    return o.labels.get(factor) if o.face_found else None


def invariance_matrix(outcomes: Sequence[V.Outcome], factors: Sequence[str] = INVARIANCE_FACTORS,
                      rows: Sequence[Degradation] | None = None) -> dict[str, dict[str, Any]]:
    """Degradation -> factor -> {n, flips, unknown, flip_rate, unknown_rate} (or EXPECTED for its target).

    `n`: degraded copies whose face's clean copy has a class for the factor.
    Degradations with no variant in the outcomes are left out.
    """
    rows = degradations(occluder_kinds(outcomes)) if rows is None else rows
    clean = {o.face: o for o in outcomes if o.kind == "clean"}
    out: dict[str, dict[str, Any]] = {}
    for d in rows:
        group = [o for o in outcomes if o.kind != "clean" and d.match(o.kind, o.level) and o.face in clean]
        if not group:
            continue
        cells: dict[str, Any] = {"variants": len(group)}
        for f in factors:
            if f in d.targets:
                cells[f] = EXPECTED
                continue
            n = flips = unknown = 0
            for o in group:
                ref = _label(clean[o.face], f)
                if ref is None:
                    continue
                n += 1
                got = _label(o, f)
                if got is None:
                    unknown += 1
                elif got != ref:
                    flips += 1
            labelled = n - unknown
            cells[f] = {"n": n, "flips": flips, "unknown": unknown,
                        "flip_rate": round(flips / labelled, 4) if labelled else None,
                        "unknown_rate": round(unknown / n, 4) if n else None}
        out[d.name] = cells
    return out


def size_bucket(side: float) -> str:
    """SMALL or LARGE for a face side in px of the original photo."""
    return SMALL if side < SMALL_FACE else LARGE


def by_size(outcomes: Sequence[V.Outcome], sides: Mapping[str, float]) -> dict[str, list[V.Outcome]]:
    """ALL, SMALL and LARGE outcome lists (a face missing from `sides` is only in ALL)."""
    out: dict[str, list[V.Outcome]] = {ALL: list(outcomes), SMALL: [], LARGE: []}
    for o in outcomes:
        if o.face in sides:
            out[size_bucket(sides[o.face])].append(o)
    return out


def _rate_check(name: str, outcomes: Sequence[V.Outcome], select: Callable[[V.Outcome], bool], factor: str,
                group: str, target: float) -> dict[str, Any]:
    chosen = [o for o in outcomes if o.face_found and select(o)]
    hits = sum(V.predicted(o, factor) == group for o in chosen)
    value = hits / len(chosen) if chosen else None
    return {"check": name, "factor": factor, "expected": group, "n": len(chosen), "value": _r(value),
            "comparison": ">=", "target": target, "ok": value is not None and value >= target}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _flip_check(matrix: Mapping[str, Mapping[str, Any]], row: str, factor: str) -> dict[str, Any] | None:
    cell = matrix.get(row, {}).get(factor)
    if not isinstance(cell, dict) or cell["n"] == 0:
        return None
    v = cell["flip_rate"]
    return {"check": f"{factor} flips under {row}", "factor": factor, "n": cell["n"], "unknown": cell["unknown"],
            "value": v, "comparison": "<=", "target": FLIP_TARGET, "ok": v is not None and v <= FLIP_TARGET}


def headline_checks(outcomes: Sequence[V.Outcome], sides: Mapping[str, float],
                    matrix: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The issue's headline figures as {check, value, target, ok} rows (a factor not labelled gives no row)."""
    matrix = invariance_matrix(outcomes) if matrix is None else matrix
    labelled = {f for o in outcomes for f, c in o.labels.items() if c is not None}
    rows: list[dict[str, Any]] = []
    blur_min = _blur_sigma_from(V.NOT_CLEAR_SIGMA)
    occluder = [k for k in occluder_kinds(outcomes) if k != V.OCCLUDER_PREFIX + BENIGN]
    rates = [
        (f"clean faces >= {MIN_CHECKED_FACE:g} px unobstructed", "occlusion", "unobstructed", 0.9,
         lambda o: o.kind == "clean" and sides.get(o.face, 0.0) >= MIN_CHECKED_FACE),
        ("4x downscale not clear", "blur", "not clear", 0.9, lambda o: o.kind == "downscale" and o.level >= 2),
        ("occluders obstructed", "occlusion", "obstructed", 0.85,
         lambda o: o.kind in occluder or (o.kind == "occlusion" and o.level >= 2)),
        ("dark extreme lighting", "lighting", "extreme lighting", 0.9, lambda o: o.kind == "dark" and o.level >= 2),
        (f"Gaussian sigma >= {V.NOT_CLEAR_SIGMA} px not clear", "blur", "not clear", 0.9,
         lambda o: o.kind == "blur" and o.level >= blur_min),
    ]
    for name, factor, group, target, select in rates:
        if factor in labelled:
            rows.append(_rate_check(name, outcomes, select, factor, group, target))
    flips = [("dark (level >= 2)", f) for f in ("occlusion", "pose", "expression", "blur")]
    flips += [(f"Gaussian blur sigma >= {V.NOT_CLEAR_SIGMA} px", f) for f in ("occlusion", "pose", "expression")]
    flips += [(name, "pose") for name in matrix
              if (name.startswith("occluder ") and name != f"occluder {BENIGN}") or name.startswith("grey patch")]
    for row, factor in flips:
        check = _flip_check(matrix, row, factor)
        if check is not None:
            rows.append(check)
    return rows


def failures(found: Mapping[tuple[str, str], bool]) -> dict[str, Any]:
    """(face, variant) -> detection found a face: the count and sorted list of the images where it did not."""
    failed = sorted(f"{face}/{variant}" for (face, variant), ok in found.items() if not ok)
    by_variant: dict[str, int] = defaultdict(int)
    for (_, variant), ok in found.items():
        by_variant[variant] += int(not ok)
    return {"images": len(found), "failed": len(failed), "by_variant": {k: v for k, v in sorted(by_variant.items())
                                                                       if v}, "list": failed}
