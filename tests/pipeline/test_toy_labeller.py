"""A new labeller for an existing factor is one file and one registry line: a Laplacian-variance blur stage,
run by `fiqa relabel --stages`, read back through the SQL views and shown in the gallery."""

from __future__ import annotations

import textwrap

import cv2
import numpy as np
import pytest
from PIL import Image

from data_manifest import Workspace, catalog
from data_manifest.gallery import build_html
from flows.cli import main
from models.fit_data.face_sets import shipped_images
from pipeline.labellers import registry

TOY_FILE = textwrap.dedent('''
    """Blur by the variance of the Laplacian of the grey crop (a toy labeller for tests)."""
    import cv2
    import numpy as np

    from data_manifest.vocabulary import FactorClass
    from pipeline.labellers.base import OK, factor_row

    HAZY_BELOW, CLEAR_ABOVE = 40.0, 400.0


    class LaplacianBlur:
        name = "laplacian_blur"
        labeller = "laplacian_variance"
        version = "toy-1"

        def __call__(self, batch):
            rows = []
            for face in batch:
                if face.status != OK or face.crop is None:
                    rows.append(factor_row(face.sample_id, "blur", labeller=self.labeller,
                                           labeller_version=self.version, status=face.status, error="no crop"))
                    continue
                grey = cv2.cvtColor(face.crop, cv2.COLOR_RGB2GRAY)
                v = float(cv2.Laplacian(grey, cv2.CV_64F).var())
                index = 0 if v < HAZY_BELOW else (2 if v > CLEAR_ABOVE else 1)
                rows.append(factor_row(face.sample_id, "blur", labeller=self.labeller, labeller_version=self.version,
                                       value=v, decision=FactorClass("blur", index),
                                       thresholds={"hazy_below": HAZY_BELOW, "clear_above": CLEAR_ABOVE}))
            return rows


    def build(options):
        return LaplacianBlur()
''')
SIGMAS = (0.0, 1.0, 2.0, 4.0)


def _laplacian_variance(rgb: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """The new file, importable, and the one registry line; both undone after the test."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy_laplacian.py").write_text(TOY_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    registry.register_stage("laplacian_blur", ("blur",), "toy_laplacian:build")
    yield "laplacian_blur"
    registry.STAGES.pop("laplacian_blur", None)


def test_register_stage_refuses_unknown_factors_and_bad_builders():
    with pytest.raises(ValueError, match="unknown factor"):
        registry.register_stage("x", ("sharpness",), "m:f")
    with pytest.raises(ValueError, match="module:function"):
        registry.register_stage("x", ("blur",), "not a reference")
    assert "x" not in registry.STAGES


def test_a_toy_labeller_runs_through_relabel_sql_and_the_gallery(prefect_harness, tmp_path, toy_stage):
    face = shipped_images()["tom_hanks"]  # an aligned 112x112 crop
    folder = tmp_path / "faces" / "tom"
    folder.mkdir(parents=True)
    expected = {}
    for sigma in SIGMAS:
        img = face if sigma == 0 else cv2.GaussianBlur(face, (0, 0), sigmaX=sigma)
        Image.fromarray(img).save(folder / f"sigma{sigma:g}.png")
        expected[f"sigma{sigma:g}.png"] = _laplacian_variance(img)
    ws = Workspace(tmp_path / "ws")
    common = ["--workspace", str(ws.root), "--no-progress"]
    assert main(["ingest", str(tmp_path / "faces"), "--dataset", "toy", *common]) == 0
    assert main(["label", "--aligned", "--detector", "none", "--stages", "align,blur", *common]) == 0
    assert main(["relabel", "--where", "face_status = 'ok'", "--stages", toy_stage, *common]) == 0

    rows = catalog.query(ws, "SELECT s.source AS path, f.value, f.class_name, f.labeller FROM factors f "
                             "JOIN samples s USING (sample_id) WHERE f.factor = 'blur'").to_pylist()
    assert len(rows) == len(SIGMAS) and {r["labeller"] for r in rows} == {"laplacian_variance"}
    got = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    for name, variance in expected.items():  # the stored PNG crop is the image itself: the same variance
        assert got[name]["value"] == pytest.approx(variance, rel=1e-9)
    values = [got[f"sigma{s:g}.png"]["value"] for s in SIGMAS]
    assert values == sorted(values, reverse=True)  # more blur, less Laplacian energy
    assert got["sigma0.png"]["class_name"] == "clear" and got["sigma4.png"]["class_name"] == "hazy"
    history = catalog.query(ws, "SELECT labeller, count(*) AS n FROM factors_history WHERE factor = 'blur' "
                                "GROUP BY labeller ORDER BY labeller").to_pylist()
    assert history == [{"labeller": "cpbd", "n": len(SIGMAS)}, {"labeller": "laplacian_variance", "n": len(SIGMAS)}]

    html = build_html(ws)  # the gallery shows the toy's classes and the class changes of its relabel run
    for cls in ("hazy", "blurry", "clear"):
        n = sum(r["class_name"] == cls for r in rows)
        assert (f'data-factor="blur" data-class="{cls}" data-count="{n}"' in html) == (n > 0)
    old = {r["sample_id"]: r["class_name"] for r in catalog.query(
        ws, "SELECT sample_id, class_name FROM factors_history WHERE labeller = 'cpbd'").to_pylist()}
    new = {r["sample_id"]: r["class_name"] for r in catalog.query(
        ws, "SELECT sample_id, class_name FROM factors WHERE factor = 'blur'").to_pylist()}
    changed = sum(old[s] != new[s] for s in new)
    assert changed > 0 and f'data-changed="{changed}"' in html
