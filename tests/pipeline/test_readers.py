"""Round trips for every dataset reader, sharding by rank/world_size, open_source, and the safe .bin unpickler."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.readers import (
    RECORDIO_MAGIC,
    BinReader,
    DatasetError,
    FolderReader,
    ListReader,
    RecordIOReader,
    SourceReadError,
    UnsafePickleError,
    detect_format,
    load_verification_bin,
    open_reader,
    open_source,
)


def _png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    arr = np.full((8, 8, 3), seed * 20 % 256, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _all(reader) -> list:
    return [r for s in reader.plan() for r in reader.read(s)]


# ------------------------------------------------------------------ an independent RecordIO writer
# Written from the dmlc-core RecordIO format description, deliberately not sharing code with
# pipeline.readers: magic, lrec = (cflag << 29) | length, payload, zero padding to 4 bytes; a
# payload containing the magic at a 4-aligned offset is split there (cflag 1 first, 2 middle, 3 last).

MAGIC = struct.pack("<I", 0xCED7230A)


def write_recordio_record(f, payload: bytes) -> None:
    n = len(payload)
    dptr = 0
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == MAGIC:
            cflag = 1 if dptr == 0 else 2
            f.write(MAGIC + struct.pack("<I", (cflag << 29) | (i - dptr)) + payload[dptr:i])
            dptr = i + 4
    cflag = 3 if dptr else 0
    f.write(MAGIC + struct.pack("<I", (cflag << 29) | (n - dptr)) + payload[dptr:])
    f.write(b"\0" * ((4 - n % 4) % 4))


def pack_ir(label, image: bytes, id1: int = 0, id2: int = 0) -> bytes:
    """MXNet recordio.pack: IRHeader 'IfQQ'; a label list sets flag = len and follows the header as float32."""
    if isinstance(label, list | tuple):
        return struct.pack("<IfQQ", len(label), 0.0, id1, id2) + np.asarray(label, "<f4").tobytes() + image
    return struct.pack("<IfQQ", 0, float(label), id1, id2) + image


def write_indexed_rec(folder: Path, records: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.rec", "wb") as rec, open(folder / "train.idx", "w") as idx:
        for key, payload in enumerate(records):
            idx.write(f"{key}\t{rec.tell()}\n")
            write_recordio_record(rec, payload)


def build_face_rec(folder: Path) -> dict:
    """insightface layout: header record 0, images 1..6 (identities 0,0,1,1,1,2), identity records 7..9."""
    labels = [0, 0, 1, 1, 1, 2]
    imgs = [_jpeg(i) for i in range(len(labels))]
    # Image 3 carries the magic twice at 4-aligned offsets (after the 24-byte IRHeader): a 3-part record.
    base = _png(3)
    base += b"\0" * ((4 - len(base) % 4) % 4)
    imgs[3] = base + MAGIC + b"tail" + MAGIC + b"end!x"
    n_img = len(labels)
    a, b = 1 + n_img, 1 + n_img + 3
    ranges = {0: (1, 3), 1: (3, 6), 2: (6, 7)}
    records = [pack_ir([float(a), float(b)], b"")]
    for i, (lab, img) in enumerate(zip(labels, imgs, strict=True)):
        records.append(pack_ir([float(lab), 0.25] if i == 4 else lab, img, id1=i + 1))
    records += [pack_ir([float(s), float(e)], b"") for s, e in ranges.values()]
    write_indexed_rec(folder, records)
    return {"labels": labels, "images": imgs, "ranges": ranges}


def test_recordio_round_trip_with_header_and_multipart(tmp_path):
    truth = build_face_rec(tmp_path / "ms1m")
    raw = (tmp_path / "ms1m" / "train.rec").read_bytes()
    flags = [struct.unpack_from("<I", raw, i + 4)[0] >> 29 for i in range(0, len(raw) - 4, 4)
             if raw[i:i + 4] == MAGIC]
    assert {1, 2, 3} <= set(flags), "the test file must contain a first, middle and last part"

    reader = RecordIOReader(tmp_path / "ms1m", shard_size=4)
    assert len(reader) == 6 and [len(s) for s in reader.plan()] == [4, 2]
    recs = _all(reader)
    assert [r.data for r in recs] == truth["images"]
    assert [r.identity for r in recs] == truth["labels"]
    assert [r.identity_name for r in recs] == [str(x) for x in truth["labels"]]
    assert all(r.kind == "recordio" and r.status is None for r in recs)
    assert [r.key for r in recs] == [f"train.rec#{k}" for k in range(1, 7)]
    assert reader.identity_ranges() == truth["ranges"]
    # Every record re-opens from its source alone (no index needed).
    for r in recs:
        assert open_source({"source_kind": "recordio", "source": r.source}) == r.data
    assert images.decode(recs[3].data).ok


def test_recordio_without_idx_scans_the_rec(tmp_path):
    truth = build_face_rec(tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "train.rec", tmp_path / "b" / "train.rec")
    recs = _all(RecordIOReader(tmp_path / "b" / "train.rec"))
    assert [r.data for r in recs] == truth["images"] and [r.identity for r in recs] == truth["labels"]


def test_recordio_plain_file_without_header(tmp_path):
    payloads = [pack_ir(k % 2, _jpeg(k)) for k in range(5)]
    write_indexed_rec(tmp_path, payloads)
    recs = _all(RecordIOReader(tmp_path / "train.idx", shard_size=2))
    assert [r.identity for r in recs] == [0, 1, 0, 1, 0]
    assert [r.data for r in recs] == [_jpeg(k) for k in range(5)]


def test_recordio_corrupt_record_becomes_one_bad_record(tmp_path):
    build_face_rec(tmp_path)
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    with open(tmp_path / "train.rec", "r+b") as f:
        f.seek(offsets[2])
        f.write(b"\xde\xad\xbe\xef")
    recs = _all(RecordIOReader(tmp_path))
    assert len(recs) == 6
    assert recs[1].status == images.CORRUPT and "magic" in recs[1].error and recs[1].data is None
    assert all(r.status is None for i, r in enumerate(recs) if i != 1)


def test_recordio_rank_world_size_partition(tmp_path):
    build_face_rec(tmp_path)
    full = [r.key for r in _all(RecordIOReader(tmp_path, shard_size=1))]
    parts = [[r.key for r in RecordIOReader(tmp_path, shard_size=1, rank=k, world_size=3)] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(full) and sum(len(p) for p in parts) == len(full)
    assert parts[0] == [full[0], full[3]]


def test_recordio_bad_index_is_a_clear_error(tmp_path):
    build_face_rec(tmp_path)
    (tmp_path / "train.idx").write_text("0\t0\n1\t99999999\n")
    with pytest.raises(DatasetError, match=r"header record labels \(7, 10\) are not image/identity key bounds"):
        RecordIOReader(tmp_path).plan()


# ------------------------------------------------------------------ ImageFolder


def _folder(root: Path) -> dict[str, bytes]:
    files = {"alice/a1.jpg": _jpeg(1), "alice/sub/a2.png": _png(2), "bob/b1.JPG": _jpeg(3), "loose.png": _png(4),
             "carol/c1.png": _png(5)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "alice" / "notes.txt").write_text("not an image extension: skipped")
    (root / ".hidden.jpg").write_bytes(b"skipped")
    return files


def test_folder_round_trip_identities_and_shards(tmp_path):
    files = _folder(tmp_path)
    reader = FolderReader(tmp_path, shard_size=2)
    assert reader.identities() == ["alice", "bob", "carol"]
    recs = _all(reader)
    assert [r.key for r in recs] == ["loose.png", "alice/a1.jpg", "alice/sub/a2.png", "bob/b1.JPG", "carol/c1.png"]
    assert [(r.identity, r.identity_name) for r in recs] == [(-1, None), (0, "alice"), (0, "alice"), (1, "bob"),
                                                              (2, "carol")]
    assert all(r.data == files[r.key] and r.source == str(tmp_path / r.key) for r in recs)
    assert [len(s) for s in reader.plan()] == [2, 2, 1]
    # A pickled reader (what a worker process gets) reads the same shard.
    clone = pickle.loads(pickle.dumps(reader))
    assert [r.key for r in clone.read(reader.plan()[1])] == ["alice/sub/a2.png", "bob/b1.JPG"]
    for r in recs:
        assert open_source({"source_kind": "folder", "source": r.source}) == r.data


def test_folder_rank_world_size(tmp_path):
    _folder(tmp_path)
    keys = [[r.key for r in FolderReader(tmp_path, shard_size=1, rank=k, world_size=2)] for k in range(2)]
    assert keys[0] == ["loose.png", "alice/sub/a2.png", "carol/c1.png"]
    assert keys[1] == ["alice/a1.jpg", "bob/b1.JPG"]


def test_folder_all_extensions_and_errors(tmp_path):
    _folder(tmp_path)
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "bob" / "dangling.jpg")
    recs = {r.key: r for r in FolderReader(tmp_path, extensions=None)}
    assert "alice/notes.txt" in recs
    assert recs["bob/dangling.jpg"].status == images.MISSING and "broken symlink" in recs["bob/dangling.jpg"].error
    with pytest.raises(SourceReadError, match="dangling.jpg"):
        open_source({"source_kind": "folder", "source": recs["bob/dangling.jpg"].source})


# ------------------------------------------------------------------ CSV / TSV lists


def test_csv_list_with_header_names_and_bad_rows(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "faces.csv").write_text(
        "path,identity\n# a comment\nimgs/0.png,zoe\n\nimgs/1.png,adam\nimgs/2.png,zoe\nimgs/9.png,adam\n"
        "a,b,c\nimgs/0.png\n"
    )
    reader = ListReader(tmp_path / "faces.csv", shard_size=2)
    recs = _all(reader)
    assert [len(s) for s in reader.plan()] == [2, 2, 2]
    assert [(r.identity, r.identity_name) for r in recs] == [(1, "zoe"), (0, "adam"), (1, "zoe"), (0, "adam"),
                                                              (-1, None), (-1, None)]
    assert [r.data for r in recs[:3]] == [_png(0), _png(1), _png(2)]
    assert recs[3].status == images.MISSING
    assert recs[4].status == images.BAD_ENTRY and "line 8" in recs[4].error
    # imgs/0.png again: the same sample key twice would be a silent duplicate, so the repeat is a bad entry
    assert recs[5].status == images.BAD_ENTRY and "listed already on line 3" in recs[5].error
    assert recs[5].identity == -1 and recs[5].key == "faces.csv:9"
    clone = pickle.loads(pickle.dumps(reader))
    assert [r.identity for r in clone.read(reader.plan()[0])] == [1, 0]


def test_tsv_list_integer_identities_rank(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "list.tsv").write_text("".join(f"{tmp_path / f'{i}.png'}\t{10 + i}\n" for i in range(4)))
    r0 = list(ListReader(tmp_path / "list.tsv", shard_size=1, rank=0, world_size=2))
    r1 = list(ListReader(tmp_path / "list.tsv", shard_size=1, rank=1, world_size=2))
    assert [r.identity for r in r0] == [10, 12] and [r.identity for r in r1] == [11, 13]
    assert [r.data for r in r0 + r1] == [_png(0), _png(2), _png(1), _png(3)]


# ------------------------------------------------------------------ verification .bin


def _write_bin(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("as_array", [False, True])
def test_bin_round_trip(tmp_path, protocol, as_array):
    bins = [_jpeg(i) for i in range(6)]
    issame = [True, False, True]
    p = _write_bin(tmp_path / "lfw.bin", (bins, np.array(issame) if as_array else issame), protocol)
    vs = load_verification_bin(p)
    assert vs.images == bins and vs.issame.dtype == bool and vs.issame.tolist() == issame
    assert list(vs.pairs()) == [(0, 1, True), (2, 3, False), (4, 5, True)]
    recs = _all(BinReader(p, shard_size=4))
    assert [r.data for r in recs] == bins and all(r.identity == -1 for r in recs)
    assert open_source({"source_kind": "bin", "source": recs[5].source}) == bins[5]


def test_bin_fortran_2d_bool_array(tmp_path):
    same = np.asfortranarray(np.array([[True, False], [False, True]]))
    vs = load_verification_bin(_write_bin(tmp_path / "x.bin", ([b"a", b"b", b"c", b"d"] * 2, same), 2))
    assert vs.issame.tolist() == [True, False, False, True]


class _CallsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bin_pickle_calling_a_function_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = _write_bin(tmp_path / "evil.bin", ([b"x", b"y"], _CallsSystem(marker)))
    with pytest.raises(UnsafePickleError, match=r"refused to load (posix|os)\.system") as e:
        load_verification_bin(p)
    assert "evil.bin" in str(e.value) and "bool arrays" in str(e.value)
    assert not marker.exists(), "the refused call must not have run"
    with pytest.raises(UnsafePickleError):
        BinReader(p).plan()


def test_bin_refuses_eval_and_non_bool_arrays(tmp_path):
    class CallsEval:
        def __reduce__(self):
            return eval, ("1+1",)

    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_verification_bin(_write_bin(tmp_path / "a.bin", ([b"x"], CallsEval())))
    with pytest.raises(UnsafePickleError, match="only bool arrays"):
        load_verification_bin(_write_bin(tmp_path / "b.bin", ([b"x", b"y"], np.array([1.5])), 4))
    with pytest.raises(UnsafePickleError, match="only bool arrays"):
        load_verification_bin(_write_bin(tmp_path / "c.bin", ([b"x", b"y"], np.array([True], dtype=object)), 2))


def test_bin_structure_errors(tmp_path):
    with pytest.raises(DatasetError, match="2 pairs need 4 images"):
        load_verification_bin(_write_bin(tmp_path / "a.bin", ([b"x", b"y"], [True, False])))
    with pytest.raises(DatasetError, match="image 1 is str"):
        load_verification_bin(_write_bin(tmp_path / "b.bin", ([b"x", "y"], [True])))
    (tmp_path / "c.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="not a valid verification .bin"):
        load_verification_bin(tmp_path / "c.bin")


# ------------------------------------------------------------------ dispatch


def test_detect_format_and_open_reader_errors(tmp_path):
    build_face_rec(tmp_path / "rec")
    _folder(tmp_path / "folder")
    (tmp_path / "l.csv").write_text("x.png,1\n")
    _write_bin(tmp_path / "v.bin", ([b"a", b"b"], [True]))
    assert detect_format(tmp_path / "rec") == "recordio"
    assert detect_format(tmp_path / "rec" / "train.rec") == "recordio"
    assert detect_format(tmp_path / "folder") == "folder"
    assert detect_format(tmp_path / "l.csv") == "list"
    assert detect_format(tmp_path / "v.bin") == "bin"
    assert isinstance(open_reader(tmp_path / "v.bin"), BinReader)
    with pytest.raises(FileNotFoundError, match="nope"):
        open_reader(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset format 'zip'"):
        open_reader(tmp_path / "folder", "zip")
    with pytest.raises(NotADirectoryError):
        FolderReader(tmp_path / "l.csv")
    with pytest.raises(ValueError, match="rank"):
        FolderReader(tmp_path / "folder", rank=2, world_size=2)
    with pytest.raises(ValueError, match="source_kind"):
        open_source({"source": "x"})
    with pytest.raises(ValueError, match="<path>#<number>"):
        open_source({"source_kind": "recordio", "source": "/x/train.rec"})
    assert RECORDIO_MAGIC == 0xCED7230A


def test_bin_python2_and_numpy1_pickles(tmp_path):
    # What lfw.bin files made under Python 2 look like: py2 str (SHORT_BINSTRING) images, a list of bools.
    py2 = b"\x80\x02(]q\x00(U\x02abq\x01U\x02cdq\x02e]q\x03\x88at."
    vs = load_verification_bin(_write_bin_bytes(tmp_path / "py2.bin", py2))
    assert vs.images == [b"ab", b"cd"] and vs.issame.tolist() == [True]
    # numpy 1.x names its reconstructor numpy.core.multiarray (numpy 2: numpy._core.multiarray).
    new = pickle.dumps(([b"a", b"b", b"c", b"d"], np.array([False, True])), protocol=2)
    old = new.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != new
    assert load_verification_bin(_write_bin_bytes(tmp_path / "np1.bin", old)).issame.tolist() == [False, True]


def _write_bin_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_library_writer_matches_the_independent_writer(tmp_path):
    from pipeline.readers.recordio_format import FaceRecWriter, encode_record

    payloads = [b"", b"abc", MAGIC, b"xxxx" + MAGIC + b"yy" + MAGIC + b"z", b"x" + MAGIC + b"abc", _png(1)]
    for p in payloads:
        buf = io.BytesIO()
        write_recordio_record(buf, p)
        assert encode_record(p) == buf.getvalue(), p
    labels = [0, 0, 1, 2, 2, 2]
    with FaceRecWriter(tmp_path) as w:
        keys = [w.add(lab, _jpeg(i) + MAGIC) for i, lab in enumerate(labels)]
    assert keys == [1, 2, 3, 4, 5, 6]
    reader = RecordIOReader(tmp_path, shard_size=4)
    recs = _all(reader)
    assert [r.identity for r in recs] == labels and [r.data for r in recs] == [_jpeg(i) + MAGIC for i in range(6)]
    assert reader.identity_ranges() == {0: (1, 3), 1: (3, 4), 2: (4, 7)}


def test_folder_non_utf8_names_become_bad_entries(tmp_path):
    os.makedirs(os.path.join(os.fsencode(tmp_path), b"id\xff"))
    with open(os.path.join(os.fsencode(tmp_path), b"id\xff", b"x\xfe.png"), "wb") as f:
        f.write(_png(1))
    (rec,) = list(FolderReader(tmp_path))
    assert rec.status == images.BAD_ENTRY and "UTF-8" in rec.error
    for text in (rec.source, rec.key, rec.identity_name):
        text.encode("utf-8")  # storable in Parquet
    assert "\\xfe" in rec.source and rec.identity == 0


def test_recordio_in_place_reads_equal_the_general_record_path(tmp_path, monkeypatch):
    """Image records read in place from a shard's span give the records read_record + unpack_ir give."""
    import pipeline.readers.recordio as readers_mod

    payloads = [pack_ir(k % 3, _jpeg(k)) for k in range(6)]
    payloads[1] = pack_ir(1, _png(1) + b"\0" * (-len(_png(1)) % 4) + MAGIC + b"tail")  # two parts
    payloads[2] = pack_ir([2.0, 0.5], _jpeg(2))  # an extra label
    payloads[3] = pack_ir(float("nan"), _jpeg(3))  # not an identity: bad_entry
    payloads[4] = b"short"  # no room for an IRHeader: corrupt
    payloads.append(pack_ir(7, _jpeg(7)))
    write_indexed_rec(tmp_path, payloads)
    idx = (tmp_path / "train.idx").read_text().splitlines()
    idx[5] = f"5\t{idx[0].split()[1]}"  # shares key 0's offset: bad_entry
    (tmp_path / "train.idx").write_text("\n".join(idx) + "\n")
    with open(tmp_path / "train.rec", "r+b") as f:  # the last record runs past the end of the file
        f.truncate(f.seek(0, os.SEEK_END) - 6)

    def fields(recs):
        return [(r.kind, r.source, r.key, r.identity, r.identity_name, r.data, r.status, r.error) for r in recs]

    in_place = []
    real = readers_mod.plain_image_at
    monkeypatch.setattr(readers_mod, "plain_image_at", lambda buf, pos: in_place.append(real(buf, pos)) or in_place[-1])
    fast = fields(_all(RecordIOReader(tmp_path, shard_size=3)))
    assert sum(hit is not None for hit in in_place) == 2  # keys 0 and 3 (whose NaN label then takes _record)
    monkeypatch.setattr(readers_mod, "plain_image_at", lambda buf, pos: None)
    assert fast == fields(_all(RecordIOReader(tmp_path, shard_size=3)))
    monkeypatch.setattr(readers_mod, "MAX_SPAN_BYTES", 0)  # no span in memory: every record from the file
    monkeypatch.setattr(readers_mod, "plain_image_at", real)
    assert fast == fields(_all(RecordIOReader(tmp_path, shard_size=3)))
    assert [r[6] for r in fast] == [None, None, None, images.BAD_ENTRY, images.CORRUPT, images.BAD_ENTRY,
                                    images.CORRUPT]
    assert [r[3] for r in fast] == [0, 1, 2, -1, -1, -1, -1]
    assert fast[0][5] == _jpeg(0) and fast[1][5] == payloads[1][24:] and fast[2][5] == _jpeg(2)
