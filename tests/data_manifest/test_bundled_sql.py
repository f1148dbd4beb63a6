"""Every bundled .sql file runs on a small catalog: the `fiqa stats` reports and the flows' own queries."""

from __future__ import annotations

import pyarrow as pa
import pytest

from data_manifest import ShardWriter, catalog

REPORTS = sorted(p.stem for p in catalog.SQL_DIR.glob("*.sql"))
FLOW_QUERIES = sorted(p.stem for p in (catalog.SQL_DIR / "flows").glob("*.sql"))
# Parameters of the flow queries, as the flows pass them.
FLOW_PARAMS = {
    "anchors_reuse": ["dlib", "this-run"],
    "cached_embeddings": ["dlib"],
    "stored_scores": {"method": "clib-fiqa", "dataset": None},
    "wider_crops": {"run": "ingest-1", "labeller": "wider_face_gt"},
    "wider_crop_counts": {"run": "ingest-1"},
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two samples with faces, factor labels of every factor, an anchor, an embedding and a score."""
    from data_manifest import Workspace
    from data_manifest.vocabulary import FACTOR_CLASSES

    ws = Workspace(tmp_path_factory.mktemp("sql") / "ws")
    ShardWriter(ws, "samples", "ingest-1").write(0, [
        {"sample_id": s, "dataset": "d", "source_kind": "list", "source": f"/x/{s}.png", "status": "ok",
         "identity": i} for i, s in enumerate(("a", "b"))])
    ShardWriter(ws, "faces", "align-1").write(0, [
        {"sample_id": s, "crop_file": "crops/x.npy", "crop_index": i, "status": "ok", "aligned_mode": "detect"}
        for i, s in enumerate(("a", "b"))])
    ShardWriter(ws, "factors", "label-1").write(0, [
        {"sample_id": s, "factor": f, "class_index": 0, "class_name": classes[0], "labeller": "t",
         "labeller_version": "1", "status": "ok", "value": 0.5}
        for s in ("a", "b") for f, classes in FACTOR_CLASSES.items()])
    ShardWriter(ws, "anchors", "anchors-1").write(0, [
        {"sample_id": s, "model_id": "dlib", "anchor": 0.25 + 0.5 * i, "status": "ok"} for i, s in enumerate("ab")])
    ShardWriter(ws, "embeddings", "anchors-1").write(0, [
        {"sample_id": "a", "model_id": "dlib", "embedding": [1.0, 0.0], "status": "ok"}])
    ShardWriter(ws, "scores", "score-1").write(0, [
        {"sample_id": "a", "method": "clib-fiqa", "quality": 0.7, "status": "ok"}])
    catalog.refresh(ws)
    return ws


def test_the_bundled_files_are_the_expected_ones():
    assert "joint_factors" in REPORTS and "factor_distribution" in REPORTS
    assert set(FLOW_QUERIES) >= set(FLOW_PARAMS) and "anchors_selection" in FLOW_QUERIES


@pytest.mark.parametrize("name", REPORTS)
def test_every_report_query_runs(ws, name):
    con = catalog.connect(ws)
    try:
        table = con.sql(catalog.bundled_sql(name)).to_arrow_table()
    finally:
        con.close()
    assert table.num_columns > 0
    if name == "joint_factors":  # both samples share one combination of the first class of every factor
        assert table.column("n").to_pylist() == [2]


@pytest.mark.parametrize("name", FLOW_QUERIES)
def test_every_flow_query_runs(ws, name):

    sql = catalog.bundled_sql(f"flows/{name}")
    con = catalog.connect(ws)
    try:
        if name == "anchors_reuse":
            con.register("_anchors_selection", pa.table({"sample_id": ["a", "b"], "shard": [0, 0]}))
        if name.endswith("_selection"):
            sql = catalog.selection_sql(sql)
        table = con.sql(sql, params=FLOW_PARAMS.get(name)).to_arrow_table()
    finally:
        con.close()
    expected = {"anchors_selection": 2, "score_selection": 2, "anchors_reuse": 1, "cached_embeddings": 1,
                "stored_scores": 1}
    if name in expected:
        assert table.num_rows == expected[name], name


def test_sql_csv_writes_list_columns_as_json(ws, capsys):
    """`fiqa sql --format csv` on a table with list columns (faces.box, embeddings.embedding)."""
    import csv
    import io
    import json

    from flows.cli import main

    assert main(["sql", "--workspace", str(ws.root), "--format", "csv",
                 "SELECT sample_id, embedding FROM embeddings"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{"sample_id": "a", "embedding": "[1.0, 0.0]"}] and json.loads(rows[0]["embedding"]) == [1.0, 0.0]
    assert main(["sql", "--workspace", str(ws.root), "--format", "csv", "SELECT * FROM faces"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header + two faces


def test_factor_distribution_counts_the_latest_ok_labels(tmp_path):
    """Counts and fractions per (factor, class) equal a count in Python over the latest ok rows."""
    import random
    from collections import Counter

    from data_manifest import Workspace
    from data_manifest.vocabulary import FACTOR_CLASSES

    rng = random.Random(3)
    ws = Workspace(tmp_path / "ws")
    latest: dict[tuple[str, str], tuple[int, str, str]] = {}
    for k, run in enumerate(("label-1", "label-2")):  # label-2 relabels some samples: its rows win
        rows = []
        for s in (f"s{i}" for i in range(40 if k == 0 else 15)):
            for f, classes in FACTOR_CLASSES.items():
                idx = rng.randrange(len(classes))
                status = "error" if rng.random() < 0.1 else "ok"
                rows.append({"sample_id": s, "factor": f, "class_index": idx, "class_name": classes[idx],
                             "labeller": "t", "labeller_version": str(k), "status": status, "value": 0.5})
                latest[(s, f)] = (idx, classes[idx], status)
        ShardWriter(ws, "factors", run).write(0, rows)
    catalog.refresh(ws)
    counts = Counter((f, idx, name) for (_s, f), (idx, name, status) in latest.items() if status == "ok")
    per_factor = Counter()
    for (f, _i, _n), n in counts.items():
        per_factor[f] += n
    expected = [(f, i, name, n, round(n / per_factor[f], 4)) for (f, i, name), n in sorted(counts.items())]
    got = catalog.query(ws, catalog.bundled_sql("factor_distribution"))
    assert list(zip(*(got.column(c).to_pylist() for c in got.column_names), strict=True)) == expected
