"""Reproductions of hostile inputs: each one becomes rows with reasons or one clear error naming the input."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_manifest import ShardWriter, Workspace, catalog, runs
from data_manifest.workspace import check_path as check_workspace_path
from flows import cli, runners
from pipeline import images
from pipeline.readers import BinReader, DatasetError, FolderReader, ListReader, RecordIOReader, open_reader
from pipeline.readers.recordio_format import FaceRecWriter, encode_record, pack_ir
from pipeline.samples import sample_rows

ROOT = Path(__file__).resolve().parents[2]


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _rows(reader, dataset: str = "d") -> list[dict]:
    """What an ingest shard task writes for every shard of the reader, read back from the Parquet shards."""
    return [r for s in reader.plan() for r in sample_rows(dataset, reader.read(s))]


def _ingest_rows(ws: Workspace, reader, run_id: str = "r1") -> list[dict]:
    writer = ShardWriter(ws, "samples", run_id)
    for s in reader.plan():
        writer.write(s.name, sample_rows("d", reader.read(s)))
    return [r for p in writer.shards() for r in pq.read_table(p).to_pylist()]


def _tree(root: Path) -> None:
    for name, seed in (("alice/a.png", 1), ("bob/b.png", 2), ("dave/d.png", 3)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(seed))


# ------------------------------------------------------------------ folders and symlinks


def test_self_referencing_symlink_is_one_row_not_an_aborted_ingest(tmp_path):
    _tree(tmp_path)
    os.symlink("self.png", tmp_path / "bob" / "self.png")  # ELOOP when followed
    os.symlink("loop", tmp_path / "loop")  # at the root, no image extension: not a dataset entry
    rows = {r["source"].removeprefix(str(tmp_path) + "/"): r for r in _rows(FolderReader(tmp_path))}
    assert sorted(rows) == ["alice/a.png", "bob/b.png", "bob/self.png", "dave/d.png"]
    assert rows["bob/self.png"]["status"] == images.UNREADABLE
    assert "symbolic links" in rows["bob/self.png"]["error"] and rows["bob/self.png"]["identity"] == 1
    assert [rows[k]["status"] for k in ("alice/a.png", "bob/b.png", "dave/d.png")] == [images.OK] * 3


def test_directory_symlink_to_an_ancestor_is_not_followed(tmp_path):
    ds = tmp_path / "ds"
    _tree(ds)
    os.symlink("..", ds / "dave" / "dirloop")  # ln -s .. ds/dave/dirloop
    os.symlink("../alice", ds / "dave" / "alias")  # another identity's folder
    os.symlink("sub", ds / "dave" / "again")  # back into dave itself
    (ds / "dave" / "sub").mkdir()
    (ds / "dave" / "sub" / "s.png").write_bytes(_png(4))
    os.symlink("alice", ds / "eve")  # a second identity name for alice's folder
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "o.png").write_bytes(_png(5))
    os.symlink(outside, ds / "dave" / "more")  # out of the dataset: followed
    reader = FolderReader(ds, shard_size=2)
    assert reader.identities() == ["alice", "bob", "dave"]
    rows = {r["source"].removeprefix(str(ds) + "/"): r for r in _rows(reader)}
    ok = {k: (r["identity_name"], r["identity"]) for k, r in rows.items() if r["status"] == images.OK}
    assert ok == {"alice/a.png": ("alice", 0), "bob/b.png": ("bob", 1), "dave/d.png": ("dave", 2),
                  "dave/sub/s.png": ("dave", 2), "dave/more/o.png": ("dave", 2)}
    refused = {k: r["error"] for k, r in rows.items() if r["status"] == images.BAD_ENTRY}
    assert sorted(refused) == ["dave/again", "dave/alias", "dave/dirloop", "eve"]
    assert "one above it" in refused["dave/dirloop"] and "another identity" in refused["dave/alias"]
    assert "own folder" in refused["dave/again"] and "two identities" in refused["eve"]
    assert rows["eve"]["identity"] == -1 and rows["dave/dirloop"]["identity"] == 2
    hashes = [r["content_hash"] for r in rows.values() if r["content_hash"]]
    assert len(hashes) == len(set(hashes)) == 5, "no image is read twice"


# ------------------------------------------------------------------ list files


def test_utf8_bom_list_keeps_its_header_and_integer_identities(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "list.csv").write_bytes("\ufeffpath,identity\n0.png,10\n1.png,2\n2.png,9\n".encode())
    rows = _rows(ListReader(tmp_path / "list.csv"))
    assert [(r["source"].rsplit("/", 1)[1], r["identity"], r["status"]) for r in rows] == [
        ("0.png", 10, "ok"), ("1.png", 2, "ok"), ("2.png", 9, "ok")]
    (tmp_path / "u16.csv").write_bytes("path,identity\n0.png,1\n".encode("utf-16"))
    with pytest.raises(DatasetError, match=r"u16.csv.*UTF-16"):
        ListReader(tmp_path / "u16.csv")


def test_list_with_nul_bytes_and_huge_identities_gives_a_row_per_line(tmp_path, workspace):
    (tmp_path / "a.png").write_bytes(_png(1))
    (tmp_path / "b.png").write_bytes(_png(2))
    (tmp_path / "l.csv").write_bytes(b"a.png,1\nb\0c.png,2\nb.png,99999999999999999999999\n")
    rows = _ingest_rows(workspace, ListReader(tmp_path / "l.csv"))
    assert len(rows) == 3 and rows[1]["status"] == images.BAD_ENTRY
    assert rows[0]["identity"] != rows[2]["identity"] and {rows[0]["identity_name"], rows[2]["identity_name"]} == {
        "1", "99999999999999999999999"}


# ------------------------------------------------------------------ RecordIO


def _raw_rec(folder: Path, payloads: list[bytes], offsets: list[int] | None = None) -> list[int]:
    """train.rec of these payloads (keys 0..n-1) and train.idx (the true offsets unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    data, true = b"", []
    for p in payloads:
        true.append(len(data))
        data += encode_record(p)
    (folder / "train.rec").write_bytes(data)
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets or true)))
    return true


def test_recordio_nan_inf_huge_labels_are_rows_and_the_shard_commits(tmp_path, workspace):
    labels = [0.0, float("nan"), float("inf"), 1e30, 3.5, -float("inf"), 2.0]
    payloads = [struct.pack("<IfQQ", 0, lab, k, 0) + _png(k) for k, lab in enumerate(labels)]
    payloads.append(pack_ir([float("nan"), 1.0], _png(9)))  # a label vector whose first label is NaN
    _raw_rec(tmp_path / "rec", payloads)
    rows = _ingest_rows(workspace, RecordIOReader(tmp_path / "rec", shard_size=3))
    assert [(r["identity"], r["status"]) for r in rows] == [
        (0, "ok"), (-1, "bad_entry"), (-1, "bad_entry"), (-1, "bad_entry"), (-1, "bad_entry"), (-1, "bad_entry"),
        (2, "ok"), (-1, "bad_entry")]
    assert "nan is not an integer identity label" in rows[1]["error"] and "record 3" in rows[3]["error"]


def test_recordio_header_with_inf_labels_names_the_file(tmp_path):
    _raw_rec(tmp_path, [pack_ir([float("inf"), 5.0], b""), pack_ir(0, _png(1))])
    with pytest.raises(DatasetError, match=r"train\.rec.*header label inf is not an integer"):
        RecordIOReader(tmp_path).plan()


def test_recordio_header_flag_ffffffff_names_the_file(tmp_path):
    _raw_rec(tmp_path / "h", [struct.pack("<IfQQ", 0xFFFFFFFF, 0.0, 0, 0) + b"\0" * 8, pack_ir(0, _png(1))])
    with pytest.raises(DatasetError, match=r"h/train\.rec.*header record \(key 0, byte 0\).*4294967295 labels"):
        RecordIOReader(tmp_path / "h").plan()
    # the same flag on an image record is one corrupt row
    _raw_rec(tmp_path / "i", [pack_ir(0, _png(1)), struct.pack("<IfQQ", 0xFFFFFFFF, 1.0, 0, 0) + _png(2)])
    rows = _rows(RecordIOReader(tmp_path / "i"))
    assert [r["status"] for r in rows] == ["ok", "corrupt"] and "4294967295 labels" in rows[1]["error"]


def test_recordio_idx_sharing_an_offset_reads_the_record_once(tmp_path):
    payloads = [pack_ir(k, _png(k)) for k in range(4)]
    true = _raw_rec(tmp_path, payloads)
    _raw_rec(tmp_path, payloads, offsets=[true[0], true[1], true[1], true[3]])  # key 2 -> key 1's record
    rows = _rows(RecordIOReader(tmp_path))
    assert [(r["identity"], r["status"]) for r in rows] == [(0, "ok"), (1, "ok"), (-1, "bad_entry"), (3, "ok")]
    assert f"byte offset {true[1]}, the offset of key 1" in rows[2]["error"]
    ok_hashes = [r["content_hash"] for r in rows if r["status"] == "ok"]
    assert len(ok_hashes) == len(set(ok_hashes))


def test_truncated_rec_with_intact_idx_gives_corrupt_rows(tmp_path, workspace):
    labels = [0, 0, 1, 1, 2, 2]
    with FaceRecWriter(tmp_path) as w:
        keys = [w.add(lab, _png(i)) for i, lab in enumerate(labels)]
    offsets = dict(line.split("\t") for line in (tmp_path / "train.idx").read_text().splitlines())
    cut = int(offsets[str(keys[3])]) + 20  # inside image 4's record; the rest of the file is gone
    with open(tmp_path / "train.rec", "r+b") as f:
        f.truncate(cut)
    rows = _ingest_rows(workspace, RecordIOReader(tmp_path, shard_size=4))
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["corrupt"] * 3
    assert [r["identity"] for r in rows[:3]] == [0, 0, 1]
    assert "truncated" in rows[3]["error"] and "past the end" in rows[4]["error"]


def test_recordio_header_pointing_into_the_images_is_refused(tmp_path):
    with FaceRecWriter(tmp_path) as w:
        for i, lab in enumerate([0, 1, 1, 2]):
            w.add(lab, _png(i))
    data = bytearray((tmp_path / "train.rec").read_bytes())
    data[8 + 24:8 + 32] = np.asarray([3.0, 8.0], "<f4").tobytes()  # header (5, 8) -> (3, 8)
    (tmp_path / "train.rec").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"train\.rec.*key 3 is an image record"):
        RecordIOReader(tmp_path).plan()


def test_idx_offset_inside_another_record_spoils_only_its_own_row(tmp_path):
    payloads = [pack_ir([4.0, 4.0], b""), *(pack_ir(k, _png(k)) for k in range(3))]
    true = _raw_rec(tmp_path, payloads)
    _raw_rec(tmp_path, payloads, offsets=[true[0], true[1], true[0] + 3, true[3]])  # key 2 points into the header
    rows = _rows(RecordIOReader(tmp_path))
    assert [(r["identity"], r["status"]) for r in rows] == [(0, "ok"), (-1, "corrupt"), (2, "ok")]
    assert "magic mismatch" in rows[1]["error"]


def test_image_key_missing_from_the_idx_is_a_row(tmp_path):
    with FaceRecWriter(tmp_path) as w:
        for i, lab in enumerate([0, 0, 1, 2]):
            w.add(lab, _png(i))
    lines = (tmp_path / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text("\n".join(line for line in lines if not line.startswith("2\t")) + "\n")
    rows = _rows(RecordIOReader(tmp_path, shard_size=3))
    assert [(r["identity"], r["status"]) for r in rows] == [(0, "ok"), (-1, "bad_entry"), (1, "ok"), (2, "ok")]
    assert "record 2: the header says it is an image, but train.idx has no line for it" == rows[1]["error"]


def test_idx_line_without_an_offset_is_a_clear_error(tmp_path):
    _raw_rec(tmp_path, [pack_ir(0, _png(1))])
    (tmp_path / "train.idx").write_text("0\t0\n1\t\n")
    with pytest.raises(DatasetError, match=r"train\.idx.*without a key or an offset"):
        RecordIOReader(tmp_path).plan()


def test_image_declaring_an_absurd_size_is_a_row_and_its_shard_commits(tmp_path, workspace):
    png = bytearray(_png(1))
    png[16:20] = struct.pack(">I", 0xFFFFFFFF)  # IHDR width
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "huge.png").write_bytes(bytes(png))
    (tmp_path / "a" / "fine.png").write_bytes(_png(2))
    rows = {r["source"].rsplit("/", 1)[1]: r for r in _ingest_rows(workspace, FolderReader(tmp_path))}
    assert rows["huge.png"]["status"] == images.TOO_LARGE and rows["huge.png"]["width"] is None
    assert "4294967295x8" in rows["huge.png"]["error"] and rows["fine.png"]["status"] == images.OK


def test_list_naming_one_file_twice_reads_it_once(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    (tmp_path / "l.csv").write_text(f"a.png,1\n./a.png,2\n{tmp_path}/a.png,3\n")
    rows = _rows(ListReader(tmp_path / "l.csv"))
    assert [(r["status"], r["identity"]) for r in rows] == [("ok", 1), ("bad_entry", -1), ("bad_entry", -1)]
    assert "listed already on line 1" in rows[2]["error"]
    assert len({r["sample_id"] for r in rows}) == 3


# ------------------------------------------------------------------ verification .bin


def test_deeply_nested_bin_is_one_error_naming_the_file(tmp_path):
    depth = 200_000
    path = tmp_path / "deep.bin"
    path.write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")  # lists nested 200,000 deep
    with pytest.raises(DatasetError) as e:
        BinReader(path).plan()
    msg = str(e.value)
    assert str(path) in msg and "nested" in msg and "\n" not in msg and len(msg) < 400


def test_bin_with_unpickler_errors_names_the_file(tmp_path):
    good = pickle.dumps(([_png(1), _png(2)], [True]), protocol=4)
    for i, data in enumerate([good[:-1], good[:10] + b"\xff" + good[11:], b"\x80\x05" + b"\x00" * 5]):
        p = tmp_path / f"b{i}.bin"
        p.write_bytes(data)
        with pytest.raises(DatasetError, match=f"b{i}.bin"):
            open_reader(p).plan()


# ------------------------------------------------------------------ runs, CLI and the Prefect server


_HOLDER = """
import sys, time
from data_manifest import Workspace, runs
with runs.run_lock(Workspace(sys.argv[1]), "busy-run"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_same_run_id_twice_at_once_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, workspace, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workspace.root)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunLocked, match=f"already running \\(pid {holder.pid} on "):
            with runs.run_lock(workspace, "busy-run"):
                pass
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "a.png").write_bytes(_png(1))
        rc = cli.main(["ingest", str(tmp_path / "data"), "--dataset", "x", "--workspace", str(workspace.root),
                       "--run-id", "busy-run", "--no-progress"])
        assert rc == 2 and "already running" in capsys.readouterr().err
        assert runs.run_info(workspace, "busy-run") is None, "the refused start recorded nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runs.run_lock(workspace, "busy-run") as lock:  # the dead holder's lock is stale: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with runs.run_lock(workspace, "busy-run"):  # re-entrant in one process
            pass


_PARENT = """
import subprocess, sys, time
from pipeline import watchdog
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
watchdog.spawn_watchdog(server.pid)
print(server.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the watchdog waits on Linux pidfds")
def test_temporary_server_is_stopped_after_kill_9_of_its_flow():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    assert _alive(server)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server), "the server outlived its flow process"


def test_checkpoint_directory_says_it_is_a_directory(tmp_path):
    from models import checkpoints

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "best.pt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"ck is a directory, not a checkpoint file \(.pt files in it: best.pt"):
        checkpoints.load(tmp_path / "ck", "clib-fiqa", "CLIB-FIQA checkpoint")


def test_table_output_escapes_newlines_and_escape_sequences_in_file_names(workspace, capsys):
    ShardWriter(workspace, "samples", "r1").write(0, [{"sample_id": "a", "dataset": "d", "source_kind": "folder",
                                                       "source": "/x/evil\nname\x1b[2J.png", "status": "ok"}])
    assert cli.main(["sql", "--workspace", str(workspace.root), "SELECT source FROM samples"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "/x/evil\\nname\\x1b[2J.png" and out[3] == "(1 row)"


def test_workspace_path_that_is_a_file_fails_before_prefect_starts(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(_png(1))
    (tmp_path / "ws").write_text("a file, not a workspace")
    monkeypatch.setattr(runners, "with_runner", lambda *a, **k: pytest.fail("a flow was started"))
    for ws in (tmp_path / "ws", tmp_path / "ws" / "inner"):
        rc = cli.main(["ingest", str(tmp_path / "data"), "--dataset", "x", "--workspace", str(ws)])
        assert rc == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"fiqa ingest: error: workspace {ws} "
            + ("is not a directory" if ws.name == "ws" else f"lies under {tmp_path / 'ws'}, which is not a directory")]


def test_sql_script_returns_the_last_statement(workspace):
    ShardWriter(workspace, "samples", "r1").write(0, [{"sample_id": "a", "dataset": "d", "source_kind": "folder",
                                                       "source": "/a", "status": "ok"}])
    tbl = catalog.query(workspace, "SELECT 1 AS one; -- a comment\n/* more */ SELECT count(*) AS n FROM samples;")
    assert tbl.to_pylist() == [{"n": 1}]


def test_runtime_guard_checks_the_workspace(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        check_workspace_path(tmp_path / "f")
    check_workspace_path(tmp_path / "new" / "ws")  # not there yet: fine, it will be created
