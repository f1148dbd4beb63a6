"""The ingest flow: bad input becomes rows with reasons, counts add up, resume gives one row per sample."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifest import Workspace, catalog, runs
from flows import cli
from pipeline import images
from pipeline.ids import sample_id
from pipeline.readers import FolderReader
from pipeline.readers.recordio_format import FaceRecWriter

ROOT = Path(__file__).resolve().parents[2]


def _save(path: Path, arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_bad_inputs(root: Path) -> dict[str, str]:
    """An ImageFolder holding every kind of bad input next to good images; relative path -> expected status."""
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)
    expected: dict[str, str] = {}
    for i in range(3):
        _save(root / "good" / f"{i}.jpg", np.roll(face, i, axis=0), "JPEG")
        expected[f"good/{i}.jpg"] = images.OK
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    expected["bad/empty.jpg"] = images.EMPTY
    jpeg = _save(bad / "whole.jpg", face, "JPEG")
    expected["bad/whole.jpg"] = images.OK
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expected["bad/truncated.jpg"] = images.TRUNCATED
    (bad / "text.jpg").write_text("this is a text file, not a JPEG\n")
    expected["bad/text.jpg"] = images.NOT_IMAGE
    (bad / "bomb.png").write_bytes(_png_declaring(100000, 100000))
    expected["bad/bomb.png"] = images.TOO_LARGE
    _save(bad / "deep16.png", (face[..., 0].astype(np.uint16) * 257), "PNG")
    expected["bad/deep16.png"] = images.OK
    _save(bad / "gray.jpg", face[..., 1], "JPEG")
    expected["bad/gray.jpg"] = images.OK
    _save(bad / "cmyk.jpg", np.dstack([face, face[..., :1]]), "JPEG", "CMYK")
    expected["bad/cmyk.jpg"] = images.OK
    _save(bad / "Jösé_名前_😀.jpg", face, "JPEG")
    expected["bad/Jösé_名前_😀.jpg"] = images.OK
    os.mkfifo(bad / "fifo.jpg")
    expected["bad/fifo.jpg"] = images.UNREADABLE
    _save(bad / "locked.jpg", face, "JPEG")
    (bad / "locked.jpg").chmod(0)
    # root reads any file regardless of its mode bits; everyone else gets "permission denied"
    expected["bad/locked.jpg"] = images.OK if os.geteuid() == 0 else images.UNREADABLE
    os.symlink(bad / "gone.jpg", bad / "dangling.jpg")
    expected["bad/dangling.jpg"] = images.MISSING
    return expected


def test_bad_inputs_each_become_a_row_and_counts_add_up(tmp_path, prefect_harness, capsys):
    data = tmp_path / "data"
    expected = make_bad_inputs(data)
    ws = Workspace(tmp_path / "ws")
    rc = cli.main(["ingest", str(data), "--dataset", "messy", "--shard-size", "4", "--workspace", str(ws.root),
                   "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"{len(expected)} rows" in out
    rows = catalog.query(ws, "SELECT * FROM samples ORDER BY source").to_pylist()
    by_key = {os.path.relpath(r["source"], data): r for r in rows}
    assert set(by_key) == set(expected), "exactly one row per input file"
    for key, status in expected.items():
        r = by_key[key]
        assert r["status"] == status, (key, r["status"], r["error"])
        assert r["sample_id"] == sample_id("messy", key)
        assert r["dataset"] == "messy" and r["source_kind"] == "folder"
        if status != images.OK:
            assert r["error"], f"{key}: a failed row must say why"
    assert by_key["bad/bomb.png"]["width"] == 100000 and "100000x100000" in by_key["bad/bomb.png"]["error"]
    assert "truncated" in by_key["bad/truncated.jpg"]["error"]
    assert "broken symlink" in by_key["bad/dangling.jpg"]["error"]
    assert "fifo" in by_key["bad/fifo.jpg"]["error"]
    assert "16-bit" in by_key["bad/deep16.png"]["error"] and by_key["bad/deep16.png"]["channels"] == 1
    assert "grayscale" in by_key["bad/gray.jpg"]["error"]
    assert "CMYK" in by_key["bad/cmyk.jpg"]["error"] and by_key["bad/cmyk.jpg"]["channels"] == 4
    ok = by_key["good/0.jpg"]
    assert (ok["width"], ok["height"], ok["format"], ok["identity_name"]) == (32, 40, "JPEG", "good")
    assert ok["bytes"] == (data / "good/0.jpg").stat().st_size and len(ok["content_hash"]) == 64
    assert {r["identity"] for r in rows if r["identity_name"] == "bad"} == {0}
    # The run registry's counts add up to the rows.
    run = catalog.query(ws, "SELECT * FROM runs WHERE flow = 'ingest'").to_pylist()
    assert len(run) == 1 and run[0]["status"] == runs.COMPLETED
    counts = json.loads(run[0]["counts"])
    assert counts["rows"] == len(expected)
    assert sum(v for k, v in counts.items() if k.startswith("status_")) == len(expected)
    for status in set(expected.values()):
        assert counts[f"status_{status}"] == list(expected.values()).count(status)


def _folder_of(n: int, root: Path) -> Path:
    for i in range(n):
        _save(root / f"id{i % 3}" / f"{i}.png", np.full((6, 6, 3), i, np.uint8), "PNG")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", ["read", "commit"])
def test_resume_after_a_failed_shard(tmp_path, prefect_harness, monkeypatch, fail_at):
    from flows.ingest import ingest
    from flows.runtime import ShardFailures

    data = _folder_of(10, tmp_path / "data")
    ws = Workspace(tmp_path / "ws")
    failing = {"shard": 2}
    if fail_at == "read":  # the shard dies before writing anything
        original = FolderReader.read

        def read(self, shard):
            if shard.index == failing["shard"]:
                raise OSError("disk went away")
            return original(self, shard)

        monkeypatch.setattr(FolderReader, "read", read)
    else:  # the shard's rows are written but it dies before being committed
        original = runs.mark_shard_done

        def mark(ws_, run_id, shard, counts=None, worker=None):
            if shard == f"{failing['shard']:05d}":
                raise OSError("killed before commit")
            return original(ws_, run_id, shard, counts, worker)

        monkeypatch.setattr(runs, "mark_shard_done", mark)
    rid = f"ingest-resume-{fail_at}"
    with pytest.raises(ShardFailures, match="shard 00002"):
        ingest(path=str(data), dataset="toy", shard_size=3, workspace=str(ws.root), run_id=rid, progress=False)
    assert runs.run_info(ws, rid)["status"] == runs.FAILED
    failing["shard"] = -1
    with pytest.raises(ValueError, match="started with shard_size=3; resuming with 4"):
        ingest(path=str(data), dataset="toy", shard_size=4, workspace=str(ws.root), run_id=rid, progress=False)
    result = ingest(path=str(data), dataset="toy", shard_size=3, workspace=str(ws.root), run_id=rid, progress=False)
    assert result["skipped_shards"] == 3 and result["shards"] == 4
    assert result["counts"]["rows"] == 10
    hist = catalog.query(ws, f"SELECT sample_id FROM samples_history WHERE run_id = '{rid}'").column(0).to_pylist()
    assert len(hist) == 10 and len(set(hist)) == 10, "exactly one row per sample"
    assert runs.run_info(ws, rid)["status"] == runs.COMPLETED


def test_recordio_ingest(tmp_path, prefect_harness):
    from flows.ingest import ingest

    labels = [0, 0, 1, 1, 1, 2, 3]
    with FaceRecWriter(tmp_path / "rec") as w:
        for i, lab in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(np.full((12, 10, 3), 20 * i, np.uint8)).save(buf, "JPEG")
            w.add(lab, buf.getvalue() if i != 4 else buf.getvalue()[:50])
    ws = Workspace(tmp_path / "ws")
    result = ingest(path=str(tmp_path / "rec"), dataset="ms1m-tiny", shard_size=3, workspace=str(ws.root),
                  progress=False)
    assert result["format"] == "recordio" and result["counts"]["rows"] == 7
    rows = catalog.query(ws, "SELECT identity, status, width, height, source FROM samples "
                             "ORDER BY CAST(split_part(source, '#', 2) AS BIGINT)").to_pylist()
    assert [r["identity"] for r in rows] == labels
    assert [r["status"] for r in rows] == ["ok"] * 4 + [images.TRUNCATED] + ["ok"] * 2
    assert all((r["width"], r["height"]) == (10, 12) for r in rows if r["status"] == "ok")


def test_recordio_nan_and_inf_labels_do_not_fail_their_shard(tmp_path, prefect_harness):
    """One record with a NaN label used to fail its whole shard, and every resume the same way."""
    from flows.ingest import ingest

    with FaceRecWriter(tmp_path / "rec") as w:
        for i, lab in enumerate([0, 0, 1, 1, 2]):
            buf = io.BytesIO()
            Image.fromarray(np.full((12, 10, 3), 30 * i, np.uint8)).save(buf, "PNG")
            w.add(lab, buf.getvalue())
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "rec" / "train.idx").read_text().splitlines()]
    data = bytearray((tmp_path / "rec" / "train.rec").read_bytes())
    for key, value in ((2, float("nan")), (4, float("inf"))):
        data[offsets[key] + 12:offsets[key] + 16] = struct.pack("<f", value)  # IRHeader label (after magic, lrec, flag)
    (tmp_path / "rec" / "train.rec").write_bytes(bytes(data))
    ws = Workspace(tmp_path / "ws")
    result = ingest(path=str(tmp_path / "rec"), dataset="nan-labels", shard_size=2, workspace=str(ws.root),
                    progress=False)
    assert result["counts"]["rows"] == 5 and result["counts"]["status_bad_entry"] == 2
    assert runs.run_info(ws, result["run_id"])["status"] == runs.COMPLETED
    rows = catalog.query(ws, "SELECT identity, status, error FROM samples "
                             "ORDER BY CAST(split_part(source, '#', 2) AS BIGINT)").to_pylist()
    assert [(r["identity"], r["status"]) for r in rows] == [(0, "ok"), (-1, "bad_entry"), (1, "ok"),
                                                            (-1, "bad_entry"), (2, "ok")]
    assert "label nan is not an integer identity label" in rows[1]["error"]


def test_missing_path_and_bad_options_fail_before_any_work(tmp_path, capsys):
    ws = tmp_path / "ws"
    missing = tmp_path / "no_such_dataset"
    assert cli.main(["ingest", str(missing), "--dataset", "x", "--workspace", str(ws)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not ws.exists(), "nothing may be created before the inputs are valid"
    for bad, message in ((["--format", "zip"], "invalid choice: 'zip'"), (["--shard-size", "0"], "integer >= 1"),
                         (["--runner", "gpu"], "invalid choice: 'gpu'")):
        with pytest.raises(SystemExit) as e:
            cli.main(["ingest", str(tmp_path), "--dataset", "x", "--workspace", str(ws), *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "list.xyz").write_text("a.png,1\n")
    assert cli.main(["ingest", str(tmp_path / "list.xyz"), "--dataset", "x", "--workspace", str(ws)]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert not ws.exists()


@pytest.mark.slow
def test_runs_as_python_module(tmp_path):
    missing = tmp_path / "gone"
    proc = subprocess.run([sys.executable, "-m", "flows.ingest", str(missing), "--dataset", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(missing) in proc.stderr


@pytest.mark.slow
def test_processes_runner_ingests_in_a_light_worker_pool(tmp_path, prefect_harness):
    """--runner processes: shard bodies run in pool workers that never import Prefect; rows equal the threads run."""
    from flows import runners
    from flows.ingest import IngestOptions, build_reader, ingest
    from pipeline import ingest_shard

    data = tmp_path / "data"
    expected = make_bad_inputs(data)
    ws = {r: Workspace(tmp_path / f"ws_{r}") for r in ("threads", "processes")}
    for runner, w in ws.items():
        result = ingest(path=str(data), dataset="messy", shard_size=4, workspace=str(w.root), progress=False,
                        runner=runner, workers=2)
        assert result["counts"]["rows"] == len(expected)
    cols = "sample_id, status, error, width, height, channels, format, bytes, content_hash, identity, source"
    rows = {r: catalog.query(w, f"SELECT {cols} FROM samples ORDER BY sample_id").to_pylist() for r, w in ws.items()}
    assert rows["processes"] == rows["threads"] and len(rows["threads"]) == len(expected)

    opts = IngestOptions(path=str(data), dataset="messy", runner="processes", workers=1)
    reader = build_reader(str(data), shard_size=100)
    with runners.compute_pool(opts) as pool:  # one worker: the import check runs where the shard ran
        counts = runners.offload(pool, ingest_shard.ingest_samples, str(tmp_path / "ws_pool"), "pool-run", "00000",
                                 reader.plan()[0], reader=reader, dataset="messy", max_pixels=images.MAX_PIXELS)
        loaded = runners.offload(pool, eval, "[m in __import__('sys').modules for m in "
                                             "('prefect', 'flows.ingest', 'pipeline.samples', 'torch')]")
        worker_pid = runners.offload(pool, os.getpid)
    assert counts["rows"] == len(expected)
    assert loaded == [False, False, True, False]
    assert worker_pid != os.getpid()
    assert runners.offload(None, os.getpid) == os.getpid()


def test_a_folder_that_sorts_first_keeps_every_identity_number(tmp_path, prefect_harness):
    """Identity numbers come from the workspace's append-only map: a new folder never renumbers the others, and
    a workspace ingested before maps existed keeps its numbers (migrated by the next ingest)."""
    from flows.ingest import ingest

    data, ws = tmp_path / "data", Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    for name in ("bob", "carol"):
        for k in range(2):
            _save(data / name / f"{k}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "PNG")

    def numbers() -> dict[str, int]:
        rows = catalog.query(ws, "SELECT sample_id, identity FROM samples").to_pylist()
        return {r["sample_id"]: r["identity"] for r in rows}

    kw = {"path": str(data), "dataset": "ids", "workspace": str(ws.root), "progress": False}
    ingest(**kw)
    first = numbers()
    assert sorted(first.values()) == [0, 0, 1, 1]
    for k, name in enumerate(("aaron", "abel")):  # both sort before every existing folder
        _save(data / name / "0.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "PNG")
        if k == 1:  # a workspace from before identity maps: the map is seeded from its samples rows
            (ws.root / "identities").rename(tmp_path / "old-identities")
        ingest(**kw)
        now = numbers()
        assert {s: now[s] for s in first} == first
        assert now[sample_id("ids", f"{name}/0.png")] == 2 + k
    assert json.loads((ws.root / "identities" / "ids.json").read_text()) == {
        "bob": 0, "carol": 1, "aaron": 2, "abel": 3}
