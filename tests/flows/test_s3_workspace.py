"""`--workspace s3://...`: ingest, label and anchors on object storage write the rows of a local-disk workspace,
another client (its own cache) reads them all, and `fiqa sql` answers the same."""

from __future__ import annotations

import cv2
import pytest

from data_manifest import Workspace, catalog
from flows import cli

COMPARED = {"samples": "sample_id, dataset, identity, status, error, content_hash, width, height",
            "faces": "sample_id, status, n_faces, crop_index, round(score, 4) AS score",
            "factors": "sample_id, factor, round(value, 6) AS value, class_name, status, error",
            "embeddings": "sample_id, status, [round(x, 4) FOR x IN embedding] AS embedding",
            "anchors": "sample_id, status, round(anchor, 4) AS anchor, nearest_negative"}


def _rows(ws: Workspace, table: str) -> list[dict]:
    return catalog.query(ws, f"SELECT {COMPARED[table]} FROM {table}_history ORDER BY ALL").to_pylist()


@pytest.fixture
def faces_folder(tmp_path, mtcnn_detector):
    """Two identities at two blur levels, plus broken files."""
    from models.fit_data.face_sets import shipped_images
    from pipeline.synthetic.demo_data import build

    mtcnn_detector()  # skips with a reason when the MTCNN weights are not fetched
    imgs = shipped_images()
    faces = {"astronaut": imgs["astronaut"][30:260, 120:350].copy(), "tom": imgs["tom_hanks"]}
    build(tmp_path / "data", {k: cv2.resize(v, (224, 224), interpolation=cv2.INTER_AREA) for k, v in faces.items()},
          levels=(2,), kinds=("blur",))
    return tmp_path / "data"


@pytest.mark.slow
def test_a_pipeline_on_object_storage_equals_a_local_disk_row_for_row(prefect_harness, s3_workspace, faces_folder,
                                                                      tmp_path, monkeypatch, capsys):
    local = tmp_path / "local"
    for ws in (str(local), s3_workspace):
        where = ["--shard-size", "2", "--workspace", ws]
        assert cli.main(["ingest", str(faces_folder), "--dataset", "c", "--no-progress", *where]) == 0
        assert cli.main(["label", "--stages", "align,blur", "--detector", "mtcnn", "--no-progress", *where]) == 0
        assert cli.main(["anchors", "--device", "cpu", *where]) == 0
    capsys.readouterr()
    monkeypatch.setenv("FIQA_CACHE", str(tmp_path / "reader"))  # another client: nothing in its cache yet
    reader = Workspace(s3_workspace)
    assert reader.root.is_relative_to(tmp_path / "reader") and not (reader.root / "catalog.duckdb").exists()
    for table in COMPARED:
        ours, theirs = _rows(reader, table), _rows(Workspace(local), table)
        assert len(ours) > 0 and ours == theirs, table
    crops = catalog.query(reader, "SELECT DISTINCT crop_file FROM faces WHERE crop_file IS NOT NULL")
    assert crops.num_rows and all((reader.root / f).is_file() for f in crops.column("crop_file").to_pylist())
    sql = "SELECT status, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL"
    answers = []
    for ws in (str(local), s3_workspace):
        assert cli.main(["sql", sql, "--workspace", ws, "--format", "csv"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and '"ok",5' in answers[0]
