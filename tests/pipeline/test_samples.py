"""The ingest stage: one samples row per record, as columns, as dicts, and as the shard body writes them."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_manifest import ShardWriter, Workspace
from pipeline import images
from pipeline.ids import content_hash, sample_id
from pipeline.ingest_shard import SAMPLE_ROW_SCHEMA, ingest_samples
from pipeline.readers import Record, RecordIOReader
from pipeline.readers.recordio_format import FaceRecWriter
from pipeline.samples import SAMPLE_COLUMNS, sample_columns, sample_rows, status_counts


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


RGB = _jpeg(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
GRAY = _jpeg(np.full((9, 9), 77, np.uint8))
RECORDS = [
    Record("folder", "/d/a.jpg", "a.jpg", 3, "alice", RGB),
    Record("folder", "/d/g.jpg", "g.jpg", 4, "bob", GRAY),
    Record("folder", "/d/t.jpg", "t.jpg", 4, "bob", RGB[: len(RGB) // 2]),
    Record("folder", "/d/x.jpg", "x.jpg", -1, None, None, images.MISSING, "no such file"),
    Record("folder", "/d/u.jpg", "u.jpg", -1, None, None),
]


def test_sample_columns_one_value_per_record():
    cols = sample_columns("ds", RECORDS)
    assert tuple(cols) == SAMPLE_COLUMNS and all(len(v) == len(RECORDS) for v in cols.values())
    assert cols["sample_id"] == [sample_id("ds", r.key) for r in RECORDS] and cols["dataset"] == ["ds"] * 5
    assert cols["status"] == [images.OK, images.OK, images.TRUNCATED, images.MISSING, images.UNREADABLE]
    assert cols["error"][:2] == [None, "grayscale converted to RGB"]
    assert cols["error"][3:] == ["no such file", "no data"]
    assert (cols["width"], cols["height"], cols["channels"]) == ([30, 9, 30, None, None], [20, 9, 20, None, None],
                                                                 [3, 1, None, None, None])
    assert cols["format"] == ["JPEG", "JPEG", "JPEG", None, None]
    assert cols["bytes"] == [len(RGB), len(GRAY), len(RGB) // 2, None, None]
    assert cols["content_hash"] == [content_hash(RGB), content_hash(GRAY), content_hash(RGB[: len(RGB) // 2]), None,
                                    None]
    assert cols["identity"] == [3, 4, 4, -1, -1] and cols["identity_name"] == ["alice", "bob", "bob", None, None]
    assert status_counts(cols["status"]) == {"rows": 5, "status_missing": 1, "status_ok": 2, "status_truncated": 1,
                                             "status_unreadable": 1}


def test_sample_rows_are_the_columns_row_by_row():
    cols = sample_columns("ds", RECORDS)
    rows = sample_rows("ds", RECORDS)
    assert rows == [{c: cols[c][i] for c in SAMPLE_COLUMNS} for i in range(len(RECORDS))]
    assert sample_rows("ds", RECORDS[1:2]) == rows[1:2]
    assert sample_columns("ds", []) == {c: [] for c in SAMPLE_COLUMNS} and sample_rows("ds", []) == []


def test_shard_body_writes_what_the_rows_say(tmp_path):
    with FaceRecWriter(tmp_path / "rec") as w:
        for i in range(7):
            w.add(i // 3, RGB if i % 2 else GRAY)
    reader = RecordIOReader(tmp_path / "rec", shard_size=5)
    shard = reader.plan()[0]
    counts = ingest_samples(str(tmp_path / "ws"), "run-1", shard.name, shard, reader=reader, dataset="bench",
                            max_pixels=images.MAX_PIXELS)
    assert counts == {"rows": 5, "status_ok": 5}
    (path,) = ShardWriter(Workspace(tmp_path / "ws"), "samples", "run-1").shards()
    written = pq.read_table(path)
    expected = pa.Table.from_pylist(sample_rows("bench", reader.read(shard)), schema=SAMPLE_ROW_SCHEMA)
    assert written.select(SAMPLE_ROW_SCHEMA.names).equals(expected.cast(written.select(SAMPLE_ROW_SCHEMA.names).schema))
    assert written.column("identity").to_pylist() == [0, 0, 0, 1, 1]
