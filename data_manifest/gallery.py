"""The gallery: one self-contained HTML page of face crops per factor class, quality decile, relabel run and run.

Pure (no Prefect): every number comes from read-only SQL over the catalog (`catalog.query`), every
sample grid is chosen in DuckDB with a LIMIT (random with a seed, or nearest the class boundary), so
the build time grows with the selecting SQL only, never with the number of faces shown per page.
Crops are read from their packs (`data_manifest.crops.PackReader`) and embedded as JPEG data URIs;
the page needs no server, no network and no script framework.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from data_manifest import Workspace, catalog
from data_manifest.crops import PackReader
from data_manifest.vocabulary import FACTOR_CLASSES, FACTORS

PICKS = ("random", "boundary")
HIST_BINS = 20
NO_CLASS = "(no label)"
CLASS_COLORS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb")

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.5em}h2{border-bottom:2px solid #4477aa;margin-top:2em}h3{margin:1.2em 0 .3em}
nav a{margin-right:1em}table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 6px}
.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:120px;font-size:.68em;line-height:1.2}
figure img{width:112px;height:112px;display:block;image-rendering:auto;border:1px solid #999}
figcaption{overflow-wrap:anywhere}.nocrop{width:112px;height:112px;background:#ddd;display:flex;
align-items:center;justify-content:center;border:1px dashed #999}.pair{display:flex;gap:4px;align-items:flex-start}
.muted{color:#777}pre{background:#fff;border:1px solid #ccc;padding:.6em;overflow:auto;max-height:30em}
svg text{font-size:10px;font-family:sans-serif}.legend span{display:inline-block;width:10px;height:10px;margin:0 3px}
"""


@dataclass
class GalleryOptions:
    """What the page shows: the `labels` selection, samples per grid, how they are picked."""

    where: str | None = None  # a condition on the `labels` view, as every --where
    per_class: int = 12  # crops per class grid (and per decile row)
    seed: int = 0  # seed of the random pick
    pick: str = "random"  # random | boundary (nearest the class thresholds)
    max_runs: int = 50  # newest runs listed
    title: str = "CLIB-FIQA gallery"

    def __post_init__(self) -> None:
        if self.pick not in PICKS:
            raise ValueError(f"gallery: pick must be one of {PICKS}, got {self.pick!r}")
        if not 1 <= int(self.per_class) <= 500:
            raise ValueError(f"gallery: per_class must be 1..500, got {self.per_class}")
        if self.where is not None and not self.where.strip():
            raise ValueError("--where is empty")


def esc(value: Any) -> str:
    """HTML-escape any value (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def _anchor_id(*parts: str) -> str:
    return "s-" + "-".join("".join(c if c.isalnum() else "_" for c in p) for p in parts)


class CropEncoder:
    """Reads crops from their packs and encodes each sample's once as a JPEG data URI."""

    def __init__(self, ws: Workspace, quality: int = 85) -> None:
        self.reader = PackReader(ws)
        self.quality = quality
        self.cache: dict[tuple[str, int], str | None] = {}

    def uri(self, crop_file: str | None, crop_index: int | None) -> str | None:
        """The data URI of one stored crop, or None when there is none or it cannot be read."""
        if crop_file is None or crop_index is None:
            return None
        key = (crop_file, int(crop_index))
        if key not in self.cache:
            try:
                arr = self.reader.read(crop_file, int(crop_index))
            except (OSError, ValueError, IndexError):
                self.cache[key] = None
            else:
                self.cache[key] = jpeg_data_uri(arr, self.quality)
        return self.cache[key]


def jpeg_data_uri(arr: np.ndarray, quality: int = 85) -> str:
    """An (H, W, 3) uint8 image as a data:image/jpeg;base64 URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ---------------------------------------------------------------- SQL

SEL_COLS = ("sample_id, dataset, source, crop_file, crop_index, anchor, "
            + ", ".join(f"{f}_value, {f}_class" for f in FACTORS))
SAMPLE_COLS = "x.*, sc.score"
SAMPLE_JOIN = "LEFT JOIN sel_score sc USING (sample_id)"


class Selection:
    """One locked, in-memory query connection (`catalog.connect`) with the selection materialised once.

    The user's `--where` reaches DuckDB only inside the one selecting statement, which passes the
    read-only checks (`catalog.UserSQL`: a single query, on a connection with no file access, under
    the query limits) before it runs; every later query is this module's own text over the temporary
    tables `sel` (the selected `labels` columns) and `sel_score`.
    """

    def __init__(self, ws: Workspace, where: str | None) -> None:
        selecting = f"SELECT {SEL_COLS} FROM ({catalog.selection_sql('SELECT * FROM labels', where)}) AS t"
        self.q = catalog.UserSQL(ws, selecting)
        self.con = self.q.con
        if len(self.q.statements) != 1:
            self.q.close()
            raise catalog.ReadOnlyError(f"refused: --where {where!r} must be one condition, not several statements")
        try:
            with self.q.watch():
                self.con.execute(f"CREATE TEMP TABLE sel AS {self.q.statements[0]}")
            self.con.execute("CREATE TEMP TABLE sel_q AS SELECT sample_id, method, quality FROM scores "
                             "WHERE sample_id IN (SELECT sample_id FROM sel)")
            self.con.execute("CREATE TEMP TABLE sel_score AS SELECT sample_id, string_agg(method || '=' || "
                             "CAST(round(quality, 4) AS VARCHAR), ', ' ORDER BY method) AS score FROM sel_q GROUP BY 1")
        except BaseException:
            self.con.close()
            raise

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return self.con.sql(sql).to_arrow_table().to_pylist()

    def close(self) -> None:
        self.con.close()


def _seed_order(seed: int) -> str:
    return f"hash(sample_id, {int(seed)})"


def factor_counts(db: Selection) -> list[dict[str, Any]]:
    """Rows (factor, class_name, n) of the selection; unlabelled samples under NO_CLASS."""
    parts = [f"SELECT '{f}' AS factor, coalesce({f}_class, '{NO_CLASS}') AS class_name, count(*) AS n "
             f"FROM sel GROUP BY 1, 2" for f in FACTORS]
    return db.rows(" UNION ALL ".join(parts))


def factor_histograms(db: Selection) -> list[dict[str, Any]]:
    """Rows (factor, lo, hi, bin, class_name, n): HIST_BINS value bins per factor, split by class."""
    parts = []
    for f in FACTORS:
        parts.append(
            f"SELECT '{f}' AS factor, r.lo, r.hi, "
            f"least(CAST(floor((v.{f}_value - r.lo) / nullif(r.hi - r.lo, 0) * {HIST_BINS}) AS INTEGER), "
            f"{HIST_BINS - 1}) AS bin, coalesce(v.{f}_class, '{NO_CLASS}') AS class_name, count(*) AS n "
            f"FROM sel v, (SELECT min({f}_value) AS lo, max({f}_value) AS hi FROM sel "
            f"WHERE isfinite({f}_value)) r WHERE isfinite(v.{f}_value) GROUP BY ALL")
    rows = db.rows(" UNION ALL ".join(parts))
    for r in rows:
        r["bin"] = 0 if r["bin"] is None else r["bin"]
    return rows


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)] if math.isfinite(obj) else []
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def class_boundaries(db: Selection) -> dict[str, list[float]]:
    """Per factor, the thresholds its labeller used most often (from the `thresholds` JSON of `factors`)."""
    rows = db.rows("SELECT factor, thresholds, count(*) AS n FROM factors WHERE thresholds IS NOT NULL "
                   "AND sample_id IN (SELECT sample_id FROM sel) GROUP BY 1, 2 ORDER BY factor, n DESC, thresholds")
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["factor"] in out:
            continue
        try:
            nums = _numbers(json.loads(r["thresholds"]))
        except (TypeError, ValueError):
            nums = []
        if nums:
            out[r["factor"]] = sorted(nums)
    return out


def _boundary_distance(factor: str, bounds: list[float]) -> str:
    v = f"abs({factor}_value)" if factor == "pose" else f"{factor}_value"  # pose thresholds are on |yaw|
    terms = ", ".join(f"abs({v} - ({b!r}))" for b in bounds)
    return f"least({terms})" if len(bounds) > 1 else terms


def class_samples(db: Selection, opts: GalleryOptions) -> list[dict[str, Any]]:
    """Up to per_class sample rows per (factor, class), picked in DuckDB (random with the seed, or boundary)."""
    bounds = class_boundaries(db) if opts.pick == "boundary" else {}
    parts = []
    for f in FACTORS:
        key = (f"({_boundary_distance(f, bounds[f])}, sample_id)" if f in bounds
               else f"({_seed_order(opts.seed)}, sample_id)")
        # min_by(..., n): the n smallest keys per class in one streaming aggregate, no sort of the selection
        parts.append(f"SELECT '{f}' AS g_factor, g_class, unnest(ids) AS sample_id FROM ("
                     f"SELECT coalesce({f}_class, '{NO_CLASS}') AS g_class, "
                     f"min_by(sample_id, {key}, {int(opts.per_class)}) AS ids FROM sel GROUP BY 1)")
    sql = (f"SELECT p.g_factor, p.g_class, {SAMPLE_COLS} FROM ({' UNION ALL '.join(parts)}) p "
           f"JOIN sel x USING (sample_id) {SAMPLE_JOIN} ORDER BY p.g_factor, p.g_class, "
           f"{_seed_order(opts.seed) if opts.pick == 'random' else 'sample_id'}, sample_id")
    return db.rows(sql)


def quality_sources(db: Selection) -> list[tuple[str, str, str]]:
    """(label, SQL of sample_id + value over the selection, description): every score method, anchors, CPBD."""
    methods = [r["method"] for r in db.rows("SELECT DISTINCT method FROM sel_q ORDER BY 1")]
    out = [(f"score: {m}", f"SELECT sample_id, quality AS value FROM sel_q WHERE method = {_lit(m)}",
            f"CLIB-FIQA scores, method {m}") for m in methods]
    out.append(("anchor", "SELECT sample_id, anchor AS value FROM sel", "quality anchors (normalised)"))
    out.append(("CPBD blur_value", "SELECT sample_id, blur_value AS value FROM sel",
                "CPBD sharpness of the aligned crop"))
    return out


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def decile_samples(db: Selection, opts: GalleryOptions, source_sql: str) -> dict[str, Any]:
    """For one quality source over the selection: the lowest, the highest and a sample of each decile."""
    n = int(opts.per_class)
    q = f"(SELECT sample_id, CAST(value AS DOUBLE) AS value FROM ({source_sql}) src WHERE isfinite(src.value))"
    rows = db.rows(
        f"WITH q AS {q}, d AS (SELECT *, ntile(10) OVER (ORDER BY value, sample_id) AS decile FROM q), "
        f"picked AS ("
        f"(SELECT 'lowest' AS g, 0 AS decile, sample_id, value FROM q ORDER BY value, sample_id LIMIT {n}) "
        f"UNION ALL (SELECT 'highest', 11, sample_id, value FROM q ORDER BY value DESC, sample_id LIMIT {n}) "
        f"UNION ALL (SELECT 'decile', decile, sample_id, value FROM d QUALIFY row_number() OVER "
        f"(PARTITION BY decile ORDER BY {_seed_order(opts.seed)}) <= {n})) "
        f"SELECT p.g, p.decile, p.value AS qvalue, {SAMPLE_COLS} FROM picked p JOIN sel x USING (sample_id) "
        f"{SAMPLE_JOIN} ORDER BY p.decile, CASE WHEN p.g = 'highest' THEN -p.value ELSE p.value END, sample_id")
    stats = db.rows(f"SELECT count(*) AS n, min(value) AS lo, max(value) AS hi, "
                    f"quantile_cont(value, [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]) AS edges FROM {q}")[0]
    return {"rows": rows, **stats}


def relabel_changes(db: Selection, opts: GalleryOptions) -> list[dict[str, Any]]:
    """Per relabel run: count and up to per_class samples whose class changed (old vs new, from factors_history)."""
    n = int(opts.per_class)
    sql = (f"WITH rr AS (SELECT DISTINCT run_id FROM runs_history WHERE flow = 'relabel'), "
           f"touched AS (SELECT DISTINCT sample_id, factor FROM factors_history "
           f"WHERE run_id IN (SELECT run_id FROM rr) AND sample_id IN (SELECT sample_id FROM sel)), "
           f"h AS (SELECT sample_id, factor, run_id, created_at, value, class_name, "
           f"lag(class_name) OVER w AS old_class, lag(value) OVER w AS old_value, lag(run_id) OVER w AS old_run "
           f"FROM factors_history SEMI JOIN touched USING (sample_id, factor) "
           f"WINDOW w AS (PARTITION BY sample_id, factor ORDER BY created_at, run_id)), "
           f"c AS (SELECT * FROM h WHERE run_id IN (SELECT run_id FROM rr) AND old_run IS NOT NULL "
           f"AND old_class IS DISTINCT FROM class_name), "
           f"k AS (SELECT run_id, count(*) AS changed FROM c GROUP BY 1), "
           f"p AS (SELECT * FROM c QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY "
           f"{_seed_order(opts.seed)}, factor) <= {n}) "
           f"SELECT p.run_id, k.changed, p.factor, p.old_class, p.class_name AS new_class, p.old_value, "
           f"p.value AS new_value, p.old_run, {SAMPLE_COLS} FROM p JOIN k USING (run_id) JOIN sel x USING (sample_id) "
           f"{SAMPLE_JOIN} ORDER BY p.run_id, p.factor, sample_id")
    return db.rows(sql)


def run_rows(db: Selection, opts: GalleryOptions) -> list[dict[str, Any]]:
    return db.rows(f"SELECT run_id, flow, status, parameters, code_version, started_at, ended_at, counts, "
                   f"metrics, error FROM runs ORDER BY started_at DESC NULLS LAST, run_id LIMIT {int(opts.max_runs)}")


def last_evaluation_plots(ws: Workspace) -> list[Path]:
    """The EDC/ERC PNGs of the most recently written evaluation folder under reports/ (none when absent)."""
    pngs = [p for p in ws.reports.rglob("*.png") if "_edc" in p.name or "_erc" in p.name]
    if not pngs:
        return []
    newest = max(pngs, key=lambda p: p.stat().st_mtime).parent
    return sorted(p for p in pngs if p.parent == newest)


# ---------------------------------------------------------------- HTML


def caption_text(r: dict[str, Any]) -> str:
    """The hover title of a crop: sample id, source, every factor value/class, anchor, score."""
    lines = [f"sample {r['sample_id']}", f"source {r.get('source')}", f"dataset {r.get('dataset')}"]
    lines += [f"{f}: {r.get(f + '_class') or '-'} ({_num(r.get(f + '_value'))})" for f in FACTORS]
    lines += [f"anchor: {_num(r.get('anchor'))}", f"score: {r.get('score') or '-'}"]
    return "\n".join(lines)


def figure(enc: CropEncoder, r: dict[str, Any], extra: str = "") -> str:
    """One crop with its caption (short) and its full values as the hover title."""
    title = esc(caption_text(r))
    uri = enc.uri(r.get("crop_file"), r.get("crop_index"))
    img = (f'<img src="{uri}" alt="{esc(r["sample_id"])}" title="{title}" width="112" height="112" '
           f'decoding="async">' if uri else f'<div class="nocrop" title="{title}">no crop</div>')
    src = Path(str(r.get("source") or "")).name
    return (f'<figure data-sample="{esc(r["sample_id"])}">{img}<figcaption>{extra}'
            f'<code>{esc(str(r["sample_id"])[:12])}</code> {esc(src)}<br>anchor {esc(_num(r.get("anchor")))}'
            f' · {esc(r.get("score") or "no score")}</figcaption></figure>')


def histogram_svg(rows: list[dict[str, Any]], classes: list[str], width: int = 420, height: int = 120) -> str:
    """A stacked bar histogram (value bins x class) as inline SVG."""
    if not rows:
        return '<p class="muted">no values</p>'
    lo, hi = rows[0]["lo"], rows[0]["hi"]
    grid = np.zeros((HIST_BINS, len(classes)), dtype=np.int64)
    for r in rows:
        grid[min(max(int(r["bin"]), 0), HIST_BINS - 1), classes.index(r["class_name"])] += r["n"]
    top = max(int(grid.sum(axis=1).max()), 1)
    bw = (width - 40) / HIST_BINS
    bars = []
    for b in range(HIST_BINS):
        y = height - 20
        for c in range(len(classes)):
            n = int(grid[b, c])
            if not n:
                continue
            h = n / top * (height - 30)
            y -= h
            bars.append(f'<rect x="{30 + b * bw:.1f}" y="{y:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" '
                        f'fill="{CLASS_COLORS[c % len(CLASS_COLORS)]}"><title>{esc(classes[c])}: {n}</title></rect>')
    axis = (f'<line x1="30" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}" stroke="#333"/>'
            f'<text x="30" y="{height - 6}">{esc(_num(lo))}</text>'
            f'<text x="{width - 10}" y="{height - 6}" text-anchor="end">{esc(_num(hi))}</text>'
            f'<text x="26" y="14" text-anchor="end">{top}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="value histogram">{axis}{"".join(bars)}</svg>')


def _classes(factor: str, present: Iterable[str]) -> list[str]:
    known = list(FACTOR_CLASSES[factor])
    return known + sorted(c for c in set(present) if c not in known)


def _factor_sections(db: Selection, opts: GalleryOptions, enc: CropEncoder) -> str:
    counts = factor_counts(db)
    hists = factor_histograms(db)
    samples = class_samples(db, opts)
    how = ("nearest the class thresholds" if opts.pick == "boundary"
           else f"at random (seed {opts.seed})")
    out = ['<section id="factors"><h2>Factors and classes</h2>'
           f'<p>Up to {opts.per_class} crops per class, picked {esc(how)}. Hover a crop for all its values.</p>']
    for f in FACTORS:
        fc = {r["class_name"]: r["n"] for r in counts if r["factor"] == f}
        classes = _classes(f, fc)
        total = sum(fc.values())
        legend = "".join(f'<span style="background:{CLASS_COLORS[i % len(CLASS_COLORS)]}"></span>{esc(c)} '
                         for i, c in enumerate(classes))
        rows = "".join(f'<tr><td>{esc(c)}</td><td class="count">{fc.get(c, 0)}</td></tr>' for c in classes)
        out.append(f'<section class="factor" id="{_anchor_id("factor", f)}" data-factor="{esc(f)}">'
                   f'<h3>{esc(f)}</h3><table><tr><th>class</th><th>samples</th></tr>{rows}'
                   f'<tr><th>total</th><th>{total}</th></tr></table>'
                   f'<p class="legend">{legend}</p>'
                   f'{histogram_svg([r for r in hists if r["factor"] == f], classes)}')
        for c in classes:
            n = fc.get(c, 0)
            if not n:
                continue
            grid = "".join(figure(enc, r) for r in samples if r["g_factor"] == f and r["g_class"] == c)
            out.append(f'<div class="class" data-factor="{esc(f)}" data-class="{esc(c)}" data-count="{n}">'
                       f'<h4>{esc(f)} = {esc(c)} <span class="muted">({n} samples)</span></h4>'
                       f'<div class="grid">{grid}</div></div>')
        out.append("</section>")
    out.append("</section>")
    return "".join(out)


def _quality_sections(ws: Workspace, db: Selection, opts: GalleryOptions, enc: CropEncoder) -> str:
    out = ['<section id="quality"><h2>Quality by decile</h2>'
           '<p>Per quality source: the lowest and the highest first, then a sample of each decile '
           '(1 = lowest). Hover a crop for its values.</p>']
    for label, sql, desc in quality_sources(db):
        d = decile_samples(db, opts, sql)
        out.append(f'<section class="quality" id="{_anchor_id("q", label)}" data-source="{esc(label)}" '
                   f'data-count="{d["n"]}"><h3>{esc(label)} <span class="muted">({esc(desc)}; {d["n"]} samples, '
                   f'{esc(_num(d["lo"]))} .. {esc(_num(d["hi"]))})</span></h3>')
        if not d["n"]:
            out.append('<p class="muted">no values in the selection</p></section>')
            continue
        edges = [d["lo"], *(d["edges"] or []), d["hi"]]
        groups: list[tuple[str, list[dict[str, Any]]]] = [
            ("lowest", [r for r in d["rows"] if r["g"] == "lowest"]),
            ("highest", [r for r in d["rows"] if r["g"] == "highest"])]
        for k in range(1, 11):
            rng = f"{_num(edges[k - 1])} .. {_num(edges[k])}" if len(edges) == 11 else ""
            groups.append((f"decile {k} ({rng})", [r for r in d["rows"] if r["g"] == "decile" and r["decile"] == k]))
        for name, rows in groups:
            if not rows:
                continue
            grid = "".join(figure(enc, r, f"<b>{esc(_num(r['qvalue']))}</b> ") for r in rows)
            out.append(f'<div class="decile" data-group="{esc(name.split(" (")[0])}"><h4>{esc(name)}</h4>'
                       f'<div class="grid">{grid}</div></div>')
        out.append("</section>")
    plots = last_evaluation_plots(ws)
    out.append('<section id="evaluation"><h3>EDC plots of the last evaluation</h3>')
    if plots:
        for p in plots:
            rel = p.relative_to(ws.root).as_posix()
            out.append(f'<figure style="width:auto"><img src="{png_data_uri(p)}" alt="{esc(rel)}" '
                       f'style="width:auto;height:auto;max-width:640px"><figcaption>{esc(rel)}</figcaption></figure>')
    else:
        out.append('<p class="muted">no evaluation plots under reports/ (run fiqa evaluate)</p>')
    out.append("</section></section>")
    return "".join(out)


def _relabel_section(db: Selection, opts: GalleryOptions, enc: CropEncoder) -> str:
    rows = relabel_changes(db, opts)
    out = ['<section id="relabels"><h2>Relabel runs: changed classes</h2>']
    if not rows:
        out.append('<p class="muted">no relabel run changed a class of the selected samples</p>')
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        rr = [r for r in rows if r["run_id"] == run_id]
        out.append(f'<section class="relabel" data-run="{esc(run_id)}" data-changed="{rr[0]["changed"]}">'
                   f'<h3>{esc(run_id)} <span class="muted">({rr[0]["changed"]} class changes)</span></h3>'
                   '<table><tr><th>crop</th><th>factor</th><th>old</th><th>new</th></tr>')
        for r in rr:
            out.append(f'<tr><td>{figure(enc, r)}</td><td>{esc(r["factor"])}</td>'
                       f'<td>{esc(r["old_class"])} ({esc(_num(r["old_value"]))})<br>'
                       f'<span class="muted">{esc(r["old_run"])}</span></td>'
                       f'<td>{esc(r["new_class"])} ({esc(_num(r["new_value"]))})</td></tr>')
        out.append("</table></section>")
    out.append("</section>")
    return "".join(out)


def _runs_section(ws: Workspace, db: Selection, opts: GalleryOptions) -> str:
    rows = run_rows(db, opts)
    out = [f'<section id="runs"><h2>Runs</h2><p>The newest {len(rows)} runs (at most {opts.max_runs}).</p>']
    reports = (ws.reports / "runs").resolve()
    for r in rows:
        md = reports / f"{r['run_id']}.md"
        report = ""
        if md.resolve().parent == reports and md.is_file():
            report = f"<pre>{esc(md.read_text(errors='replace'))}</pre>"
        try:
            params = json.dumps(json.loads(r["parameters"]), indent=1, default=str) if r["parameters"] else "{}"
        except ValueError:
            params = str(r["parameters"])
        out.append(f'<details class="run" data-run="{esc(r["run_id"])}"><summary><b>{esc(r["run_id"])}</b> '
                   f'{esc(r["flow"])} · {esc(r["status"])} · {esc(r["started_at"])}</summary>'
                   f'<h4>parameters</h4><pre>{esc(params)}</pre>'
                   f'<h4>counts / metrics</h4><pre>{esc(r["counts"])}\n{esc(r["metrics"])}</pre>'
                   f'{"<h4>error</h4><pre>" + esc(r["error"]) + "</pre>" if r["error"] else ""}'
                   f'{"<h4>run report</h4>" + report if report else ""}</details>')
    out.append("</section>")
    return "".join(out)


def build_html(ws: Workspace, opts: GalleryOptions | None = None) -> str:
    """The whole page as one HTML string."""
    opts = opts or GalleryOptions()
    enc = CropEncoder(ws)
    db = Selection(ws, opts.where)
    try:
        n = db.rows("SELECT count(*) AS n FROM sel")[0]["n"]
        body = [_factor_sections(db, opts, enc), _quality_sections(ws, db, opts, enc), _relabel_section(db, opts, enc),
                _runs_section(ws, db, opts)]
    finally:
        db.close()
    where = esc(opts.where) if opts.where else "all samples"
    built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(opts.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(opts.title)}</h1><p>workspace <code>{esc(ws.root)}</code> · selection "
            f"<code id=\"where\">{where}</code> · <span id=\"n-selected\" data-count=\"{n}\">{n}</span> samples"
            f" · {len([v for v in enc.cache.values() if v])} crops shown · built {built}</p>"
            "<nav><a href=\"#factors\">factors</a><a href=\"#quality\">quality deciles</a>"
            "<a href=\"#evaluation\">EDC</a><a href=\"#relabels\">relabels</a><a href=\"#runs\">runs</a></nav>"
            + "".join(body) + "</body></html>\n")


def write_gallery(ws: Workspace, output: str | Path | None = None, opts: GalleryOptions | None = None) -> Path:
    """Build the page and write it atomically (default: <workspace>/reports/gallery.html); returns its path."""
    from data_manifest.writer import atomic_write

    if not ws.manifests.is_dir():
        raise FileNotFoundError(f"no manifests in workspace {ws.root} (run 'fiqa ingest' or 'fiqa demo' first)")
    page = build_html(ws, opts)
    path = Path(output).expanduser().resolve() if output else ws.reports / "gallery.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path
