"""Gallery build time, page size and browser load time: the demo workspace and a synthetic large one.

``python -m benchmarks.gallery [--workspace W] [--samples 1000000] [--per-class 12] [--keep DIR]`` prints JSON
(a synthetic workspace kept in DIR by an earlier run is reused):
for each workspace (the given one, e.g. the demo's, and a synthetic one of `--samples` samples written
straight as Parquet: samples, faces, 5 factors, anchors, one score method, one run), the selected sample
count, the time of the selecting SQL alone (materialising the selection), the page build time (wall and
process CPU, `data_manifest.gallery.write_gallery`, selection included), the page size and
the number of embedded images, and, where /usr/bin/chromium exists, the page's load time in headless
Chromium (navigation start to the end of the load event, from the page's own `performance` timing).

The synthetic workspace's faces all point into one pack of 1,000 distinct crops (a million real crops
would be 37 GB); the gallery reads only the crops it shows, so that changes nothing it measures.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_manifest import Workspace, runs
from data_manifest.crops import write_pack
from data_manifest.gallery import GalleryOptions, Selection, write_gallery
from data_manifest.schemas import schema
from data_manifest.vocabulary import FACTOR_CLASSES

PACK = 1000
CHROMIUM = Path("/usr/bin/chromium")
TIMING = ("<script>window.addEventListener('load',function(){setTimeout(function(){var t=performance.timing;"
          "var p=document.createElement('pre');p.id='load-ms';p.textContent=String(t.loadEventEnd-t.navigationStart);"
          "document.body.appendChild(p)},0)});</script>")


def _write(ws: Workspace, table: str, run_id: str, cols: dict[str, Any], part: str = "00000") -> None:
    """One Parquet shard of `table` with the table's schema (missing columns null)."""
    sch = schema(table)
    n = len(next(iter(cols.values())))
    now = pa.array(np.full(n, np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us")), pa.timestamp("us"))
    cols = {"run_id": pa.array(np.full(n, run_id)), "created_at": now.cast(sch.field("created_at").type), **cols}
    arrays = [pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type) for f in sch]
    d = ws.table_dir(table, run_id)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=sch), d / f"part-{part}.parquet", compression="zstd")


def synthetic_workspace(root: Path, n: int, seed: int = 0) -> Workspace:
    """A workspace of n labelled, anchored and scored samples (faces share one pack of PACK crops)."""
    rng = np.random.default_rng(seed)
    ws = Workspace(root)
    rid = runs.start_run(ws, "label", {"synthetic": n})
    yy, xx = np.mgrid[0:112, 0:112]
    crops = np.empty((PACK, 112, 112, 3), np.uint8)
    for i in range(PACK):
        c = rng.integers(40, 220, 3)
        crops[i] = np.clip(c + 40 * np.sin((xx + 3 * i) / 9.0)[..., None] * np.cos(yy / 11.0)[..., None], 0, 255)
    pack = write_pack(ws, rid, 0, crops)
    ids = np.char.add("syn", np.arange(n).astype(str))
    ok = np.full(n, "ok")
    _write(ws, "samples", rid, {"sample_id": ids, "dataset": np.full(n, "synthetic"),
                                "source_kind": np.full(n, "folder"),
                                "source": np.char.add("/data/synthetic/", np.char.add(ids, ".jpg")),
                                "identity": np.arange(n) // 20, "status": ok})
    _write(ws, "faces", rid, {"sample_id": ids, "status": ok, "n_faces": np.ones(n, np.int32),
                              "crop_file": np.full(n, pack), "crop_index": (np.arange(n) % PACK).astype(np.int32)})
    values = {"blur": rng.uniform(0, 0.3, n), "pose": rng.normal(0, 15, n), "occlusion": rng.uniform(0, 1, n),
              "expression": rng.uniform(0, 1, n), "lighting": rng.uniform(0, 1, n)}
    cls = {"blur": np.digitize(values["blur"], [0.018, 0.083]),
           "pose": 2 - np.digitize(np.abs(values["pose"]), [10, 25]),
           **{f: (values[f] <= 0.5).astype(int) for f in ("occlusion", "expression", "lighting")}}
    thresholds = {"blur": '{"hazy_below": 0.018, "clear_above": 0.083}', "pose": "[10.0, 25.0]"}
    for f, v in values.items():
        names = np.array(FACTOR_CLASSES[f])
        _write(ws, "factors", rid, {"sample_id": ids, "factor": np.full(n, f), "value": v,
                                    "class_index": cls[f].astype(np.int8), "class_name": names[cls[f]],
                                    "labeller": np.full(n, "synthetic"), "labeller_version": np.full(n, "1"),
                                    "thresholds": np.full(n, thresholds.get(f, '{"probability": 0.5}')),
                                    "status": ok}, part=f)
    anchor = rng.beta(4, 2, n).astype(np.float32)
    _write(ws, "anchors", rid, {"sample_id": ids, "model_id": np.full(n, "synthetic"), "anchor": anchor,
                                "status": ok})
    _write(ws, "scores", rid, {"sample_id": ids, "method": np.full(n, "clib-fiqa"),
                               "quality": np.clip(anchor + rng.normal(0, 0.1, n), 0, 1).astype(np.float32),
                               "status": ok})
    runs.finish_run(ws, rid, "completed", counts={"samples": n})
    return ws


def browser_load_ms(page: Path) -> float | None:
    """The page's load time in headless Chromium (navigation start to load event end), or None without it."""
    if not CHROMIUM.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        timed = Path(tmp) / "timed.html"
        timed.write_text(page.read_text().replace("<head>", "<head>" + TIMING, 1))
        res = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--no-first-run", f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000",
                              "--dump-dom", timed.as_uri()], capture_output=True, text=True, timeout=300, check=False)
    part = res.stdout.split('<pre id="load-ms">', 1)
    return float(html.unescape(part[1].split("</pre>", 1)[0])) if len(part) == 2 else None


# docs/gallery/*.png: one screenshot per section (a copy of the page showing only that section)
SECTIONS: dict[str, str] = {
    "factors": "body>section:not(#factors){display:none}",
    "quality": "body>section:not(#quality){display:none}#evaluation{display:none}",
    "evaluation": "body>section:not(#quality){display:none}#quality>h2,#quality>p,#quality>section.quality"
                  "{display:none}",
    "relabels": "body>section:not(#relabels){display:none}",
    "runs": "body>section:not(#runs){display:none}",
}
OPEN_RUNS = "<script>addEventListener('load',function(){document.querySelectorAll('details.run').forEach(" \
            "function(d,i){if(i<2)d.open=true})})</script>"


def screenshots(page: Path, out_dir: Path, width: int = 1200, height: int = 1100) -> list[Path]:
    """One PNG per page section, rendered by headless Chromium."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install Debian's chromium package for screenshots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    text = page.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for name, css in SECTIONS.items():
            one = Path(tmp) / f"{name}.html"
            extra = f"<style>{css}</style>" + (OPEN_RUNS if name == "runs" else "")
            one.write_text(text.replace("</head>", extra + "</head>", 1))
            shot = out_dir / f"gallery_{name}.png"
            subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--no-first-run", f"--user-data-dir={tmp}/profile", "--virtual-time-budget=5000",
                            f"--window-size={width},{height}", f"--screenshot={shot}", one.as_uri()],
                           capture_output=True, timeout=120, check=True)
            written.append(shot)
    return written


def measure(ws: Workspace, out: Path, per_class: int) -> dict[str, Any]:
    w0 = time.perf_counter()
    Selection(ws, None).close()  # the selecting SQL alone: the part of the build that grows with the dataset
    selection = time.perf_counter() - w0
    c0, w0 = time.process_time(), time.perf_counter()
    page = write_gallery(ws, out, GalleryOptions(per_class=per_class))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    text = page.read_text()
    n = int(text.split('id="n-selected" data-count="', 1)[1].split('"', 1)[0])
    return {"workspace": str(ws.root), "selected_samples": n, "selection_s": round(selection, 2),
            "build_s": round(wall, 2),
            "build_cpu_s": round(cpu, 2), "page_bytes": page.stat().st_size, "images": text.count("<img "),
            "browser_load_ms": browser_load_ms(page)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", action="append", default=[], help="an existing workspace (e.g. the demo's)")
    p.add_argument("--samples", type=int, default=1_000_000, help="samples of the synthetic workspace (0: none)")
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--keep", type=Path, default=None, help="write the synthetic workspace and pages here")
    p.add_argument("--screenshots", type=Path, default=None,
                   help="only write one screenshot per section of the first --workspace's page into this folder")
    args = p.parse_args()
    if args.screenshots:
        page = write_gallery(Workspace(args.workspace[0], create=False), None, GalleryOptions(per_class=8))
        for shot in screenshots(page, args.screenshots):
            print(shot)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="gallery-bench-"))
    results = []
    for w in args.workspace:
        ws = Workspace(w, create=False)
        results.append({"kind": "given", **measure(ws, root / f"gallery-{len(results)}.html", args.per_class)})
    if args.samples:
        t0 = time.perf_counter()
        where = root / f"synthetic-{args.samples}"
        if (where / "manifests" / "samples").is_dir():  # kept from an earlier run with --keep: reuse it
            ws, made = Workspace(where, create=False), None
        else:
            ws = synthetic_workspace(where, args.samples)
            made = round(time.perf_counter() - t0, 1)
        results.append({"kind": "synthetic", "write_s": made,
                        **measure(ws, root / "gallery-synthetic.html", args.per_class)})
    print(json.dumps({"python": platform.python_version(), "cpus": os.cpu_count(),
                      "omp_threads": os.environ.get("OMP_NUM_THREADS"), "results": results}, indent=1))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
