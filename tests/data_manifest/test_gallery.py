"""The gallery page: classes and counts equal the SQL, every image is an embedded crop, captions, escaping, browser."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifest import ShardWriter, Workspace, catalog, runs
from data_manifest.crops import write_pack
from data_manifest.gallery import NO_CLASS, GalleryOptions, build_html, write_gallery
from data_manifest.vocabulary import FACTORS

N = 30
HOSTILE = 'evil <script>alert("x")</script> & \'q\'.png'
T0 = datetime(2026, 1, 1, tzinfo=UTC)
BLUR_T = {"hazy_below": 0.018, "clear_above": 0.083}


def _crop(i: int) -> np.ndarray:
    """A crop whose colour encodes its index (survives JPEG: flat colour)."""
    img = np.zeros((112, 112, 3), dtype=np.uint8)
    img[..., 0] = 8 * i
    img[..., 1] = 255 - 8 * i
    img[..., 2] = 128
    return img


def _blur_class(v: float) -> str:
    return "hazy" if v < BLUR_T["hazy_below"] else "clear" if v > BLUR_T["clear_above"] else "blurry"


def _pose_class(yaw: float) -> str:
    a = abs(yaw)
    return "frontal" if a < 10 else "slight angle" if a <= 25 else "profile"


def _factor(sid: str, factor: str, value: float, cls: str, idx: int, thresholds: object, at: datetime) -> dict:
    return {"sample_id": sid, "factor": factor, "value": value, "class_index": idx, "class_name": cls,
            "labeller": "test", "labeller_version": "1", "thresholds": json.dumps(thresholds), "status": "ok",
            "created_at": at}


def build_workspace(root: Path) -> Workspace:
    """N samples (the last without a face), every factor, anchors, two score methods, a relabel run, reports."""
    ws = Workspace(root)
    label_run = runs.start_run(ws, "label", {"stages": ["align", "blur"], "note": "a <b>&"})
    pack = write_pack(ws, label_run, 0, np.stack([_crop(i) for i in range(N - 1)]))
    samples, faces, factors, anchors, scores = [], [], [], [], []
    for i in range(N):
        sid = f"s{i:03d}"
        source = f"/data/{HOSTILE}" if i == 3 else f"/data/id{i % 4}/img{i}.jpg"
        samples.append({"sample_id": sid, "dataset": "toy" if i % 2 else "other", "source_kind": "folder",
                        "source": source, "identity": i % 4, "status": "ok", "created_at": T0})
        if i == N - 1:
            faces.append({"sample_id": sid, "status": "no_face", "error": "no face found", "created_at": T0})
            continue
        faces.append({"sample_id": sid, "status": "ok", "n_faces": 1, "crop_file": pack, "crop_index": i,
                      "created_at": T0})
        blur = i * 0.006
        yaw = -30.0 + 2.1 * i
        occ = (i * 37 % 100) / 100
        factors += [_factor(sid, "blur", blur, _blur_class(blur), 0, BLUR_T, T0),
                    _factor(sid, "pose", yaw, _pose_class(yaw), 0, [10.0, 25.0], T0),
                    _factor(sid, "occlusion", occ, "obstructed" if occ > 0.5 else "unobstructed", 0,
                            {"probability": 0.5}, T0),
                    _factor(sid, "expression", 0.1, "typical expression", 1, {"probability": 0.5}, T0),
                    _factor(sid, "lighting", 0.2, "normal lighting", 1, {"probability": 0.5}, T0)]
        anchors.append({"sample_id": sid, "model_id": "m", "anchor": (i * 13 % N) / N, "status": "ok",
                        "created_at": T0})
        scores.append({"sample_id": sid, "method": "clib-fiqa", "quality": i / N, "status": "ok", "created_at": T0})
        scores.append({"sample_id": sid, "method": "clib-fiqa-confidence", "quality": 1 - i / N, "status": "ok",
                       "created_at": T0})
    for table, rows in (("samples", samples), ("faces", faces), ("factors", factors), ("anchors", anchors),
                        ("scores", scores)):
        ShardWriter(ws, table, label_run).write(0, rows)
    runs.finish_run(ws, label_run, "completed", counts={"ok": N - 1})
    relabel_run = runs.start_run(ws, "relabel", {"stages": ["blur"], "where": "blur_value < 0.05"})
    later = T0 + timedelta(days=1)
    ShardWriter(ws, "factors", relabel_run).write(0, [  # s000 stays hazy, s001 and s002 become clear
        _factor("s000", "blur", 0.001, "hazy", 0, BLUR_T, later),
        *(_factor(f"s{i:03d}", "blur", 0.5, "clear", 2, BLUR_T, later) for i in (1, 2))])
    runs.finish_run(ws, relabel_run, "completed")
    for rid in (label_run, relabel_run):
        (ws.reports / "runs").mkdir(parents=True, exist_ok=True)
        runs.write_run_report(ws, rid)
    edc = ws.reports / "evaluate" / "x"
    edc.mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(edc / "demo_edc_fmr0.01.png")
    return ws


class Page(HTMLParser):
    """Collects images, figures (with their enclosing class grid) and class grids of a gallery page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.imgs: list[dict[str, str]] = []
        self.classes: list[dict[str, str]] = []
        self.figures: list[dict[str, str]] = []
        self.groups: list[dict[str, str]] = []
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.data: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.imgs.append(a)
            return
        if tag == "div" and "data-class" in a:
            self.classes.append(a)
        if tag == "div" and "data-group" in a:
            self.groups.append({**a, "samples": []})
        if tag == "figure" and "data-sample" in a:
            ctx = next((x for t, x in reversed(self.stack) if t == "div" and ("data-class" in x or "data-group" in x)),
                       {})
            src = next((x for t, x in reversed(self.stack) if t == "section" and "data-source" in x), {})
            self.figures.append({**a, "class": ctx.get("data-class", ""), "factor": ctx.get("data-factor", ""),
                                 "group": ctx.get("data-group", ""), "source": src.get("data-source", "")})
        self.stack.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        self.data.append(data)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("gallery") / "ws")


@pytest.fixture(scope="module")
def page(ws) -> tuple[str, Page]:
    text = build_html(ws, GalleryOptions(per_class=4, seed=1))
    return text, Page(text)


def _labels(ws: Workspace, where: str | None = None) -> dict[str, dict]:
    sql = "SELECT * FROM labels" + (f" WHERE {where}" if where else "")
    return {r["sample_id"]: r for r in catalog.query(ws, sql).to_pylist()}


def _decode(src: str) -> Image.Image:
    head, b64 = src.split(",", 1)
    assert head in ("data:image/jpeg;base64", "data:image/png;base64"), head[:40]
    img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    img.load()
    return img


@pytest.mark.parametrize("where", [None, "dataset = 'toy'", "blur_value < 0.05 OR pose_class = 'frontal'"])
def test_classes_and_counts_equal_the_sql(ws, where):
    p = Page(build_html(ws, GalleryOptions(where=where, per_class=3)))
    for f in FACTORS:
        sql = (f"SELECT coalesce({f}_class, '{NO_CLASS}') AS c, count(*) AS n FROM labels "
               f"{'WHERE ' + where if where else ''} GROUP BY 1")
        expected = {r["c"]: r["n"] for r in catalog.query(ws, sql).to_pylist()}
        shown = {c["data-class"]: int(c["data-count"]) for c in p.classes if c["data-factor"] == f}
        assert shown == expected, f
    if where is None:  # the known toy labels, independently of SQL
        blur = [_blur_class(i * 0.006) for i in range(N - 1)]
        shown = {c["data-class"]: int(c["data-count"]) for c in p.classes if c["data-factor"] == "blur"}
        blur[1] = blur[2] = "clear"  # the relabel run moved s001 and s002 from hazy to clear
        assert shown == {c: blur.count(c) for c in set(blur)} | {NO_CLASS: 1}


def test_grids_hold_only_samples_of_their_class_and_at_most_n(ws, page):
    _, p = page
    labels = _labels(ws)
    grids = [f for f in p.figures if f["class"]]
    assert grids
    for f in grids:
        cls = labels[f["data-sample"]][f"{f['factor']}_class"] or NO_CLASS
        assert cls == f["class"], f
    for c in p.classes:
        n = sum(1 for f in grids if f["factor"] == c["data-factor"] and f["class"] == c["data-class"])
        assert n == min(4, int(c["data-count"]))


def test_every_image_is_an_embedded_image_of_the_right_size(ws, page):
    text, p = page
    assert len(p.imgs) > 50
    crops = [i for i in p.imgs if i["src"].startswith("data:image/jpeg")]
    plots = [i for i in p.imgs if i["src"].startswith("data:image/png")]
    assert len(crops) + len(plots) == len(p.imgs)
    for i in crops:
        assert _decode(i["src"]).size == (112, 112)
    assert [_decode(i["src"]).size for i in plots] == [(60, 40)]  # the EDC plot, as stored
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "file://" not in text


def test_captions_carry_the_right_sample_and_its_crop(ws, page):
    _, p = page
    labels = _labels(ws)
    by_alt = {}
    for img in p.imgs:
        if img["src"].startswith("data:image/jpeg"):
            sid = img["alt"]
            assert img["title"].startswith(f"sample {sid}\nsource {labels[sid]['source']}")
            for f in FACTORS:
                assert f"{f}: {labels[sid][f + '_class']} (" in img["title"]
            pixel = np.asarray(_decode(img["src"]).convert("RGB"))[56, 56].astype(int)
            i = int(sid[1:])
            assert np.abs(pixel - [8 * i, 255 - 8 * i, 128]).max() <= 6, (sid, pixel)  # the crop of that sample
            by_alt[sid] = img
    assert {f["data-sample"] for f in p.figures} >= set(by_alt)
    assert "s029" in {f["data-sample"] for f in p.figures}  # the sample without a face: a placeholder, no <img>
    assert "s029" not in by_alt


def test_hostile_file_name_is_escaped(ws, page):
    text, p = page
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;.png" in text
    titles = [i["title"] for i in p.imgs if i.get("alt") == "s003"]
    assert titles and all(f"source /data/{HOSTILE}\n" in t for t in titles)
    hostile_where = "source LIKE '%<script>%' OR dataset = 'a\"&'"
    q = Page(build_html(ws, GalleryOptions(where=hostile_where)))
    assert {f["data-sample"] for f in q.figures} == {"s003"}
    assert hostile_where in "".join(q.data)


def test_random_pick_is_seeded_and_boundary_pick_is_nearest_the_thresholds(ws):
    def picked(opts: GalleryOptions) -> list[str]:
        return [f["data-sample"] for f in Page(build_html(ws, opts)).figures
                if f["factor"] == "pose" and f["class"] == "profile"]

    a, b = picked(GalleryOptions(per_class=2, seed=3)), picked(GalleryOptions(per_class=2, seed=3))
    assert a == b and len(a) == 2
    seeds = {tuple(sorted(picked(GalleryOptions(per_class=2, seed=s)))) for s in range(6)}
    assert len(seeds) > 1
    labels = _labels(ws)
    profile = [s for s, r in labels.items() if r["pose_class"] == "profile"]
    nearest = sorted(profile, key=lambda s: (min(abs(abs(labels[s]["pose_value"]) - t) for t in (10, 25)), s))[:2]
    assert sorted(picked(GalleryOptions(per_class=2, pick="boundary"))) == sorted(nearest)


def test_quality_deciles_lowest_and_highest_first(ws, page):
    _, p = page
    labels = _labels(ws)
    anchors = sorted((r["anchor"], s) for s, r in labels.items() if r["anchor"] is not None)
    fig = [f for f in p.figures if f["source"] == "anchor"]
    lowest = [f["data-sample"] for f in fig if f["group"] == "lowest"]
    highest = [f["data-sample"] for f in fig if f["group"] == "highest"]
    assert lowest == [s for _, s in anchors[:4]]
    assert highest == [s for _, s in sorted(anchors, key=lambda x: (-x[0], x[1]))[:4]]
    groups = [g["data-group"] for g in p.groups]
    assert groups[:12] == ["lowest", "highest", *(f"decile {k}" for k in range(1, 11))]
    sources = {f["source"] for f in p.figures}
    assert {"score: clib-fiqa", "score: clib-fiqa-confidence", "anchor", "CPBD blur_value"} <= sources


def test_relabel_changes_and_runs(ws, page):
    text, _ = page
    relabel = catalog.query(ws, "SELECT run_id FROM runs WHERE flow = 'relabel'").column(0)[0].as_py()
    assert f'data-run="{relabel}" data-changed="2"' in text  # s001, s002 hazy -> clear; s000 unchanged
    assert text.count("<td>blur</td><td>hazy (") == 2  # old class beside the new one, twice
    for r in catalog.query(ws, "SELECT run_id FROM runs").to_pylist():
        assert f'<details class="run" data-run="{r["run_id"]}">' in text
    assert "&quot;note&quot;: &quot;a &lt;b&gt;&amp;&quot;" in text  # parameters, escaped
    assert "## Run `" in text  # the run report, preformatted


def test_cli_writes_the_page_and_refuses_bad_sql(ws, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "g.html"
    assert main(["gallery", "--workspace", str(ws.root), "--output", str(out), "--per-class", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"gallery: {out}"
    assert Page(out.read_text()).imgs
    assert main(["gallery", "--workspace", str(ws.root), "--where", "no_such_column = 1", "--output",
                 str(out)]) == 2
    assert "no_such_column" in capsys.readouterr().err
    assert main(["gallery", "--workspace", str(ws.root), "--where", "1=1) OR (1=1; DROP VIEW labels; --",
                 "--output", str(out)]) == 2
    assert write_gallery(ws).name == "gallery.html" and (ws.reports / "gallery.html").exists()


CHROMIUM = Path("/usr/bin/chromium")
CHECK = """<script>window.__errs=[];
window.addEventListener('error',function(e){__errs.push('error: '+(e.message||(e.target&&e.target.tagName)))},true);
var _ce=console.error;console.error=function(){__errs.push('console.error: '+[].join.call(arguments,' '));
_ce.apply(console,arguments)};
window.addEventListener('load',function(){var im=document.images,bad=[];for(var i=0;i<im.length;i++){
if(!(im[i].complete&&im[i].naturalWidth>0))bad.push(im[i].alt)}var p=document.createElement('pre');
p.id='browser-check';p.textContent=JSON.stringify({images:im.length,undecoded:bad,errors:__errs});
document.body.appendChild(p)});</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--hide-scrollbars", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: install Debian's 'chromium' package "
                                                  "(.ci/run does) to run the real-browser check")
def test_page_in_a_real_browser(ws, tmp_path):
    page = write_gallery(ws, tmp_path / "gallery.html", GalleryOptions(per_class=4))
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("<head>", "<head>" + CHECK, 1))
    res = chromium(["--dump-dom", checked.as_uri()], tmp_path / "profile1")
    assert res.returncode == 0, res.stderr[-2000:]
    marker = res.stdout.split('<pre id="browser-check">', 1)
    assert len(marker) == 2, "the check script did not run: " + res.stderr[-2000:]
    result = json.loads(html.unescape(marker[1].split("</pre>", 1)[0]))
    assert result["images"] == len(Page(page.read_text()).imgs) > 50
    assert result["undecoded"] == [] and result["errors"] == []
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln and ":ERROR:" in ln]
    assert console == []
    shot = tmp_path / "gallery.png"
    res = chromium(["--window-size=1280,2000", f"--screenshot={shot}", page.as_uri()], tmp_path / "profile2")
    assert res.returncode == 0, res.stderr[-2000:]
    img = Image.open(shot)
    assert img.size == (1280, 2000)
    assert len(np.unique(np.asarray(img.convert("L")))) > 20  # the page was rendered, not a blank frame
    keep = os.environ.get("GALLERY_SCREENSHOT_DIR")  # where CI keeps the screenshot (else: pytest's tmp_path)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "gallery_test.png")
    print(f"screenshot: {shot}")


def test_a_flow_publishes_the_page_as_an_artifact(prefect_harness, ws, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.gallery import publish_gallery

    @flow(name="gallery-test")
    def make_page() -> Path:
        page = write_gallery(ws, tmp_path / "flow gallery.html", GalleryOptions(per_class=2))
        publish_gallery(page)
        return page

    page = make_page()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gallery"])))
    assert arts and arts[-1].type == "markdown"
    assert f"]({page.as_uri()})" in arts[-1].data and str(page) in arts[-1].data
    publish_gallery(page)  # outside a flow: nothing published, nothing raised
