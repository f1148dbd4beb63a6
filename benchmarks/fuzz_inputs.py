"""Seeded fuzzing of the dataset readers through the ingest shard path: crashes, lost rows, wrong identities.

For every format (image folders, RecordIO .rec/.idx, verification .bin pickles, CSV/TSV
lists) each case builds a small valid dataset, applies seeded mutations (bit flips,
truncation, length/offset/size fields set to extremes, NaN/inf labels, duplicated and
reordered entries, symlinks, odd file names, BOMs, NUL bytes) and ingests it the way
`fiqa ingest` does, minus Prefect: `build_reader` plans the shards, the ingest shard
body (`pipeline.ingest_shard.ingest_samples`) reads, validates and writes each shard to a Parquet manifest, and the rows
are read back. A case passes when the dataset is either refused with one clear error
naming the file, or gives exactly one row per entry (never a traceback, never a silent
duplicate), and no usable row carries another identity than its image's.

    python -m benchmarks.fuzz_inputs                       # 500 cases per format, seed 0
    python -m benchmarks.fuzz_inputs --cases 50 --formats recordio list --seed 7

Prints one JSON object; exits 1 when any crash, lost row, duplicate or wrong identity is found.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_manifest import ShardWriter, Workspace  # noqa: E402
from pipeline.ids import content_hash  # noqa: E402
from pipeline.readers import DatasetError  # noqa: E402
from pipeline.readers.recordio_format import FaceRecWriter  # noqa: E402

FORMATS = ("images", "recordio", "bin", "list")
READER_KIND = {"images": "folder", "recordio": "recordio", "bin": "bin", "list": "list"}
CLEAR_ERRORS = (DatasetError, FileNotFoundError, NotADirectoryError, ValueError)
EXTREMES = (0, 1, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1)


@dataclass
class Case:
    """One mutated dataset and what a correct ingest of it must give."""

    path: Path
    mutations: list[str]
    expected_rows: int | None  # None: not known in advance (only consistency is checked)
    may_refuse: bool = False  # a dataset-level refusal (naming the file) is a correct answer
    truth: dict[str, set[Any]] = field(default_factory=dict)  # content hash -> the identities it may carry
    line_names: dict[str, str | None] | None = None  # list files: sample key -> identity name of its line
    relabelled: set[int] = field(default_factory=set)  # RecordIO: byte offsets of records whose label changed
    names: set[str] = field(default_factory=set)  # list files: the identity names of every usable line


@dataclass
class Tally:
    cases: int = 0
    crashes: int = 0
    lost_rows: int = 0
    duplicate_rows: int = 0
    wrong_identities: int = 0
    unclear_errors: int = 0
    refused_datasets: int = 0
    rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)


# ------------------------------------------------------------------ source material


def image_pool(rng: np.random.Generator, n: int) -> list[bytes]:
    """n distinct small images, PNG and JPEG alternating (noise, so every encoding is unique)."""
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (int(rng.integers(8, 20)), int(rng.integers(8, 20)), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG" if i % 2 == 0 else "JPEG")
        out.append(buf.getvalue())
    return out


def bit_flips(data: bytes, rng: np.random.Generator, k: int, lo: int = 0, hi: int | None = None) -> tuple[bytes,
                                                                                                       list[int]]:
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return data, []
    b = bytearray(data)
    where = [int(x) for x in rng.integers(lo, hi, k)]
    for pos in where:
        b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b), where


def extreme_size(data: bytes, rng: np.random.Generator) -> bytes:
    """Set the width/height a PNG or JPEG header declares to an extreme value."""
    b = bytearray(data)
    value = int(rng.choice(EXTREMES))
    which = int(rng.integers(0, 2))
    if data.startswith(b"\x89PNG") and len(b) >= 24:
        b[16 + 4 * which:20 + 4 * which] = struct.pack(">I", value)
    else:
        sof = data.find(b"\xff\xc0")
        if sof != -1 and sof + 9 <= len(b):
            b[sof + 5 + 2 * which:sof + 7 + 2 * which] = struct.pack(">H", value & 0xFFFF)
    return bytes(b)


def mutate_image_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = str(rng.choice(["bitflip", "truncate", "extreme_size", "garbage", "empty", "append", "prepend"]))
    if kind == "bitflip":
        return bit_flips(data, rng, int(rng.integers(1, 9)))[0], kind
    if kind == "truncate":
        return data[: int(rng.integers(0, len(data)))], kind
    if kind == "extreme_size":
        return extreme_size(data, rng), kind
    if kind == "garbage":
        return rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes(), kind
    if kind == "empty":
        return b"", kind
    if kind == "append":
        return data + rng.integers(0, 256, 64, dtype=np.uint8).tobytes(), kind
    return b"\0" * int(rng.integers(1, 16)) + data, kind


ODD_NAMES = ("new\nline", "tab\tname", "spa ce", "-dash", "#hash", "quo'te\"", "emoji_😀", "名前", "a" * 200,
             "semi;colon", "back\\slash", "trailing. ", "%s%n", "\u202eevil")


# ------------------------------------------------------------------ image folders


def case_images(root: Path, rng: np.random.Generator, pool: list[bytes]) -> Case:
    ds = root / "ds"
    names = ["alice", "bob", "carol"]
    order = rng.permutation(len(pool))
    truth: dict[str, set[Any]] = {}
    files: dict[Path, bytes] = {}
    k = 0
    for name in names:
        for j in range(3):
            data = pool[order[k]]
            k += 1
            p = ds / name / (f"{j}.png" if data.startswith(b"\x89PNG") else f"{j}.jpg")
            files[p] = data
    root_img = pool[order[k]]
    k += 1
    files[ds / "loose.png" if root_img.startswith(b"\x89PNG") else ds / "loose.jpg"] = root_img
    for p, data in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        truth[content_hash(data)] = {p.parent.name if p.parent != ds else None}
    expected = len(files)
    mutations = []
    image_files = sorted(files)
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(["bytes", "bytes", "symlink", "odd_name", "hidden", "duplicate", "special", "nested"]))
        target = image_files[int(rng.integers(0, len(image_files)))]
        if not target.exists() and not target.is_symlink():
            continue
        group = ds / names[int(rng.integers(0, 3))]
        if kind == "bytes" and target.is_file() and not target.is_symlink():
            data, how = mutate_image_bytes(target.read_bytes(), rng)
            target.write_bytes(data)
            mutations.append(f"image_{how}")
        elif kind == "symlink":
            how = str(rng.choice(["self_loop", "to_root", "to_parent", "to_other_identity", "to_own_subdir",
                                  "to_other_file", "to_own_file", "dangling", "to_outside", "identity_alias",
                                  "chain_loop"]))
            link = group / f"link_{len(mutations)}"
            if how == "self_loop":
                link = link.with_suffix(".png")
                os.symlink(link.name, link)
            elif how == "to_root":
                os.symlink("..", link)
            elif how == "to_parent":
                os.symlink("../..", link)
            elif how == "to_other_identity":
                other = next(n for n in names if n != group.name)
                os.symlink(f"../{other}", link)
            elif how == "to_own_subdir":
                (group / "sub").mkdir(exist_ok=True)
                os.symlink("sub", link)
            elif how == "to_other_file":
                other = next(p for p in image_files if p.parent.name not in (group.name, "ds"))
                link = link.with_suffix(other.suffix)
                os.symlink(other, link)
            elif how == "to_own_file":
                own = next((p for p in image_files if p.parent == group and p.is_file() and not p.is_symlink()), None)
                if own is None:
                    continue
                link = link.with_suffix(own.suffix)
                os.symlink(own.name, link)
                truth.setdefault(content_hash(own.read_bytes()), set()).add(group.name)
            elif how == "dangling":
                link = link.with_suffix(".jpg")
                os.symlink("nowhere.jpg", link)
            elif how == "to_outside":
                out = root / f"outside_{len(mutations)}"
                out.mkdir()
                extra = pool[order[k]]
                k += 1
                (out / ("x.png" if extra.startswith(b"\x89PNG") else "x.jpg")).write_bytes(extra)
                truth[content_hash(extra)] = {group.name}
                os.symlink(out, link)
            elif how == "identity_alias":
                link = ds / f"zz_alias_{len(mutations)}"
                os.symlink(names[int(rng.integers(0, 3))], link)
            else:  # a -> b -> a
                a, b = group / f"la_{len(mutations)}.png", group / f"lb_{len(mutations)}.png"
                os.symlink(b.name, a)
                os.symlink(a.name, b)
                expected += 1
            expected += 1
            mutations.append(f"symlink_{how}")
        elif kind == "odd_name" and target.is_file() and not target.is_symlink():
            odd = str(rng.choice(ODD_NAMES)) + target.suffix
            if rng.random() < 0.2:
                new = Path(os.fsdecode(os.path.join(os.fsencode(target.parent), b"bad\xff" + target.suffix.encode())))
            else:
                new = target.with_name(odd)
            if new.exists():
                continue
            target.rename(new)
            mutations.append("odd_name")
        elif kind == "hidden" and target.is_file() and not target.is_symlink():
            target.rename(target.with_name("." + target.name))
            expected -= 1
            mutations.append("hidden_file")
        elif kind == "duplicate" and target.is_file() and not target.is_symlink():
            copy = group / f"dup_{len(mutations)}{target.suffix}"
            shutil.copyfile(target, copy)
            truth.setdefault(content_hash(copy.read_bytes()), set()).add(group.name)
            expected += 1
            mutations.append("duplicate_file")
        elif kind == "special":
            how = str(rng.choice(["fifo", "no_extension", "dir_named_like_image", "empty_identity"]))
            if how == "fifo":
                os.mkfifo(group / f"fifo_{len(mutations)}.jpg")
                expected += 1
            elif how == "no_extension":
                (group / f"readme_{len(mutations)}").write_bytes(b"text")
            elif how == "dir_named_like_image":
                (group / f"folder_{len(mutations)}.png").mkdir()
            else:
                (ds / f"zz_empty_{len(mutations)}").mkdir()
            mutations.append(f"special_{how}")
        elif kind == "nested" and target.is_file() and not target.is_symlink() and target.parent != ds:
            deep = target.parent / "a" / "b" / "c"
            deep.mkdir(parents=True, exist_ok=True)
            target.rename(deep / target.name)
            mutations.append("moved_deeper")
    return Case(ds, mutations or ["none"], expected, False, truth)


# ------------------------------------------------------------------ RecordIO


def _rec_layout(folder: Path) -> tuple[bytes, list[int]]:
    data = (folder / "train.rec").read_bytes()
    offsets = [int(line.split("\t")[1]) for line in (folder / "train.idx").read_text().splitlines()]
    return data, offsets


def case_recordio(root: Path, rng: np.random.Generator, pool: list[bytes]) -> Case:
    folder = root / "rec"
    labels = sorted(int(x) for x in rng.integers(0, 4, int(rng.integers(4, 10))))
    labels = [int(v) for v in np.unique(labels, return_inverse=True)[1]]  # 0, 1, 2, ... in order
    order = rng.permutation(len(pool))
    imgs = [pool[order[i]] for i in range(len(labels))]
    with FaceRecWriter(folder) as w:
        for lab, img in zip(labels, imgs, strict=True):
            w.add(lab, img)
    truth = {content_hash(img): {lab} for img, lab in zip(imgs, labels, strict=True)}
    n = len(labels)
    data, offsets = _rec_layout(folder)  # offsets[k]: key k; key 0 the header, 1..n images, then identities
    rec_path, idx_path = folder / "train.rec", folder / "train.idx"
    expected: int | None = n
    may_refuse = scanned = False
    mutations: list[str] = []
    relabelled: set[int] = set()

    for _ in range(int(rng.integers(1, 3))):
        kind = str(rng.choice(["rec_bitflip", "rec_truncate", "label", "flag", "length", "idx_offset",
                               "idx_dup_line", "idx_shuffle", "idx_drop_line", "idx_garbage", "no_idx",
                               "header_label", "shared_offset", "image_bytes"]))
        data = rec_path.read_bytes()
        if kind == "rec_bitflip":
            data, where = bit_flips(data, rng, int(rng.integers(1, 9)))
            for pos in where:
                key = max(k for k in range(len(offsets)) if offsets[k] <= pos)
                if key == 0:
                    may_refuse, expected = True, None
                may_refuse |= key > n  # the first identity record is checked against the header
                relabelled.add(offsets[key])
            rec_path.write_bytes(data)
        elif kind == "rec_truncate":
            cut = int(rng.integers(0, len(data)))
            rec_path.write_bytes(data[:cut])
            if cut < offsets[1]:
                may_refuse = True
        elif kind in ("label", "flag", "header_label"):
            key = 0 if kind == "header_label" else int(rng.integers(1, n + 1))
            off = offsets[key] + 8
            b = bytearray(data)
            if kind == "flag":
                b[off:off + 4] = struct.pack("<I", int(rng.choice([1, 2, 7, 1000, 2**31, 2**32 - 1])))
            else:
                value = float(rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30, 3.5, -0.0, 2.0**31, 2.0**40]))
                at = off + 24 if kind == "header_label" else off + 4
                b[at:at + 4] = struct.pack("<f", value)
            if key == 0:
                may_refuse, expected = True, None
            relabelled.add(offsets[key])
            rec_path.write_bytes(bytes(b))
        elif kind == "length":
            key = int(rng.integers(1, n + 1))
            off = offsets[key]
            b = bytearray(data)
            cflag = int(rng.integers(0, 4))
            length = int(rng.choice([0, 1, 23, 2**29 - 1, int(rng.integers(0, 4096))]))
            b[off + 4:off + 8] = struct.pack("<I", (cflag << 29) | length)
            relabelled.add(off)
            rec_path.write_bytes(bytes(b))
        elif kind == "image_bytes":
            key = int(rng.integers(1, n + 1))
            start = offsets[key] + 8 + 24
            stop = min(offsets[key + 1] if key + 1 < len(offsets) else len(data), len(data))
            data, _ = bit_flips(data, rng, int(rng.integers(1, 6)), start, stop)
            rec_path.write_bytes(data)
        elif kind.startswith("idx") or kind in ("no_idx", "shared_offset"):
            if not idx_path.exists():
                continue
            lines = idx_path.read_text().splitlines()
            if kind == "idx_offset":
                i = int(rng.integers(0, len(lines)))
                key = lines[i].split("\t")[0]
                value = int(rng.choice([0, 1, 3, len(data) - 1, len(data), len(data) + 8, 2**31, 2**62, -1]))
                lines[i] = f"{key}\t{value}"
                may_refuse |= value < 0 or key == "0" or int(key) > n
                if key == "0":
                    expected = None
            elif kind == "shared_offset":
                i, j = (int(x) for x in rng.choice(np.arange(1, n + 1), 2, replace=False)) if n > 1 else (1, 1)
                lines[j] = f"{lines[j].split(chr(9))[0]}\t{lines[i].split(chr(9))[1]}"
            elif kind == "idx_dup_line":
                i = int(rng.integers(0, len(lines)))
                lines.insert(int(rng.integers(0, len(lines))), lines[i])
                may_refuse = True
            elif kind == "idx_shuffle":
                lines = [lines[i] for i in rng.permutation(len(lines))]
            elif kind == "idx_drop_line":
                i = int(rng.integers(0, len(lines)))
                key = int(lines[i].split("\t")[0])
                del lines[i]
                if key == 0:
                    may_refuse, expected = True, None
                elif key > n:
                    may_refuse = True  # an identity record the header points to is gone
                # an image key the index lacks is still a (bad_entry) row
            elif kind == "idx_garbage":
                i = int(rng.integers(0, len(lines)))
                lines[i] = str(rng.choice(["x\ty", "1", "1\t2\t3", "", "\t", "1.5\t0", "\u00e9\t0"]))
                may_refuse, expected = True, None
            else:
                idx_path.unlink()
                scanned, lines = True, None
                expected = None if expected is None else n  # a scan finds every record
            if lines is not None:
                idx_path.write_text("".join(f"{line}\n" for line in lines))
        mutations.append(kind)
    may_refuse |= scanned and len(mutations) > 1  # building an index by scanning a damaged .rec may fail
    return Case(folder, mutations, expected, may_refuse, truth, relabelled=relabelled)


# ------------------------------------------------------------------ verification .bin


def case_bin(root: Path, rng: np.random.Generator, pool: list[bytes]) -> Case:
    n_pairs = int(rng.integers(1, 5))
    order = rng.permutation(len(pool))
    imgs = [pool[order[i]] for i in range(2 * n_pairs)]
    same = [bool(x) for x in rng.integers(0, 2, n_pairs)]
    kind = str(rng.choice(["bitflip", "truncate", "duplicate_images", "reorder_images", "bool_array", "nan_issame",
                           "length_extreme", "deep_nesting", "wrong_global", "insert_bytes", "extra_images",
                           "empty"]))
    expected: int | None = len(imgs)
    may_refuse = True
    issame: Any = same
    if kind == "duplicate_images":
        imgs = imgs + imgs[: int(rng.integers(1, len(imgs) + 1))]
        expected, may_refuse = len(imgs), False
    elif kind == "reorder_images":
        imgs = [imgs[i] for i in rng.permutation(len(imgs))]
        may_refuse = False
    elif kind == "bool_array":
        issame = np.asarray(same, dtype=bool).reshape(-1, 1) if rng.random() < 0.5 else np.asarray(same, dtype=bool)
        may_refuse = False
    elif kind == "nan_issame":
        issame = [float("nan")] + same[1:]
    elif kind == "extra_images":
        imgs = imgs + [pool[order[len(imgs)]]]
        expected, may_refuse = len(imgs), False
    elif kind == "empty":
        imgs, issame, expected, may_refuse = [], [], 0, False
    data = pickle.dumps((imgs, issame), protocol=int(rng.choice([2, 3, 4, 5])))
    if kind == "bitflip":
        data = bit_flips(data, rng, int(rng.integers(1, 9)))[0]
        expected = None
    elif kind == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
        expected = None
    elif kind == "insert_bytes":
        at = int(rng.integers(0, len(data)))
        data = data[:at] + rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes() + data[at:]
        expected = None
    elif kind == "length_extreme":
        b = bytearray(data)
        for op, size in ((b"B", 4), (b"C", 1), (b"\x8e", 8)):  # BINBYTES, SHORT_BINBYTES, BINBYTES8
            at = data.find(op, 2)
            if at != -1 and at + 1 + size <= len(b):
                b[at + 1:at + 1 + size] = (2 ** (8 * size) - 1).to_bytes(size, "little")
                break
        data = bytes(b)
        expected = None
    elif kind == "deep_nesting":
        depth = int(rng.choice([100, 5000, 200_000]))
        data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
        expected = None
    elif kind == "wrong_global":
        data = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
        expected = None
    path = root / "set.bin"
    path.write_bytes(data)
    truth = {content_hash(i): {-1} for i in pool}
    return Case(path, [kind], expected, may_refuse, truth)


# ------------------------------------------------------------------ list files


def _storable(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def _expected_lines(raw: bytes, delimiter: str, list_name: str,
                    root: Path) -> tuple[dict[str, str | None], set[str]]:
    """(sample key -> identity name of every data line, names of all usable lines), independently of the reader.

    A usable line's key is its path as written; a malformed line, or a line naming a file
    an earlier line named already, is keyed "<list>:<line number>" and carries no name.
    Every usable line's name counts for the numbering (integers, else sorted names).
    """
    out: dict[str, str | None] = {}
    seen: set[str] = set()
    names: set[str] = set()
    lines = raw.split(b"\n")
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    first = True
    for no, line in enumerate(lines, 1):
        text = line.decode("utf-8", "surrogateescape").strip("\r\n")
        if no == len(lines) and not line:
            break
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            fields = [f.strip() for f in next(csv.reader([text], delimiter=delimiter), [])]
        except csv.Error:
            fields = None
        if first:
            first = False
            if fields and fields[0].lower() == "path":
                continue
        if not fields or not fields[0] or len(fields) > 2 or "\0" in fields[0]:
            out[f"{list_name}:{no}"] = None
            continue
        if len(fields) == 2 and fields[1]:
            names.add(fields[1])
        full = os.path.normpath(os.path.join(root, fields[0]))
        if full in seen:
            out[f"{list_name}:{no}"] = None
            continue
        seen.add(full)
        out[_storable(fields[0])] = fields[1] if len(fields) == 2 and fields[1] else None
    return out, names


def case_list(root: Path, rng: np.random.Generator, pool: list[bytes]) -> Case:
    img_dir = root / "imgs"
    img_dir.mkdir(parents=True)
    order = rng.permutation(len(pool))
    n = int(rng.integers(3, 9))
    integer_names = rng.random() < 0.5
    names = [str(int(x)) for x in rng.integers(0, 40, n)] if integer_names else \
        [str(rng.choice(["ann", "bo", "cy", "Dee", "émile"])) for _ in range(n)]
    rows = []
    for i in range(n):
        data = pool[order[i]]
        fname = f"{i}.png" if data.startswith(b"\x89PNG") else f"{i}.jpg"
        (img_dir / fname).write_bytes(data)
        rows.append((f"imgs/{fname}", names[i]))
    tsv = rng.random() < 0.3
    delim = "\t" if tsv else ","
    lines = [f"path{delim}identity"] if rng.random() < 0.7 else []
    lines += [f"{p}{delim}{name}" for p, name in rows]
    mutations = []
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(["bom", "crlf", "blank_and_comments", "duplicate_lines", "reorder", "odd_name",
                               "huge_identity", "nan_identity", "missing_identity", "extra_field", "nul",
                               "bad_utf8", "bitflip", "truncate", "no_header", "quoted", "missing_file",
                               "directory", "absolute", "negative_identity"]))
        body = lines[1:] if lines and lines[0].startswith("path") else lines
        head = lines[: len(lines) - len(body)]
        if not body:
            continue
        i = int(rng.integers(0, len(body)))
        if kind == "duplicate_lines":
            body.insert(int(rng.integers(0, len(body) + 1)), body[i])
        elif kind == "reorder":
            body = [body[j] for j in rng.permutation(len(body))]
        elif kind == "blank_and_comments":
            body.insert(i, str(rng.choice(["", "   ", "# a comment", "  # indented comment"])))
        elif kind == "odd_name":
            odd = str(rng.choice([n for n in ODD_NAMES if "\n" not in n and "\t" not in n]))
            src = body[i].split(delim)[0]
            if (root / src).is_file():
                new = f"imgs/{odd.replace('/', '_')}{Path(src).suffix}"
                if not (root / new).exists():
                    os.rename(root / src, root / new)
                    quoted = '"' + new.replace('"', '""') + '"' if any(c in new for c in '",') else new
                    body[i] = f"{quoted}{delim}{body[i].split(delim)[-1]}"
        elif kind == "huge_identity":
            body[i] = f"{body[i].split(delim)[0]}{delim}{'9' * int(rng.integers(19, 40))}"
        elif kind == "negative_identity":
            body[i] = f"{body[i].split(delim)[0]}{delim}-{int(rng.integers(1, 2**40))}"
        elif kind == "nan_identity":
            body[i] = f"{body[i].split(delim)[0]}{delim}{rng.choice(['nan', 'inf', '1e30', '3.5', ''])}"
        elif kind == "missing_identity":
            body[i] = body[i].split(delim)[0]
        elif kind == "extra_field":
            body[i] = body[i] + f"{delim}extra"
        elif kind == "nul":
            body[i] = body[i][:2] + "\0" + body[i][2:]
        elif kind == "quoted":
            p, name = body[i].split(delim)[0], body[i].split(delim)[-1]
            body[i] = f'"{p}"{delim}"{name}"'
        elif kind == "missing_file":
            body[i] = f"imgs/gone_{i}.png{delim}{body[i].split(delim)[-1]}"
        elif kind == "directory":
            body[i] = f"imgs{delim}{body[i].split(delim)[-1]}"
        elif kind == "absolute":
            p = body[i].split(delim)[0]
            body[i] = f"{root / p}{delim}{body[i].split(delim)[-1]}" if not p.startswith('"') else body[i]
        elif kind == "no_header":
            head = []
        lines = head + body
        mutations.append(kind)
    raw = "".join(f"{line}\n" for line in lines).encode("utf-8", "surrogateescape")
    if "crlf" in mutations:
        raw = raw.replace(b"\n", b"\r\n")
    if "bad_utf8" in mutations:
        raw = raw.replace(b"imgs/", b"im\xffgs/", 1)
    if "bitflip" in mutations:
        raw = bit_flips(raw, rng, int(rng.integers(1, 6)))[0]
    if "truncate" in mutations:
        raw = raw[: int(rng.integers(0, len(raw) + 1))]
    if "bom" in mutations:
        raw = b"\xef\xbb\xbf" + raw
    path = root / ("list.tsv" if tsv else "list.csv")
    path.write_bytes(raw)
    expected, used = _expected_lines(raw, delim, path.name, root)
    truth = {content_hash(pool[order[i]]): {names[i]} for i in range(n)}
    return Case(path, mutations or ["none"], len(expected), raw.startswith((b"\xff\xfe", b"\xfe\xff")), truth,
                line_names=expected, names=used)


BUILDERS: dict[str, Callable[[Path, np.random.Generator, list[bytes]], Case]] = {
    "images": case_images, "recordio": case_recordio, "bin": case_bin, "list": case_list}


# ------------------------------------------------------------------ running a case


class Refused(Exception):
    """The dataset was refused as a whole (the correct answer for some inputs) with this error."""


def ingest_rows(case: Case, fmt: str, ws: Workspace, run_id: str) -> list[dict[str, Any]]:
    """The ingest flow's work for this dataset without Prefect: plan, then every shard task, rows read back.

    Errors of the planning step are the dataset's refusal (Refused); anything a shard raises is a crash.
    """
    from flows.ingest import build_reader
    from pipeline.ingest_shard import ingest_samples

    try:
        reader = build_reader(str(case.path), READER_KIND[fmt], shard_size=4)
    except CLEAR_ERRORS as e:
        raise Refused(str(e)) from e
    for s in reader.plan():
        ingest_samples(str(ws.root), run_id, s.name, s, reader=reader, dataset=f"fuzz-{fmt}",
                       max_pixels=4096 * 4096)
    rows = [r for p in ShardWriter(ws, "samples", run_id).shards() for r in pq.read_table(p).to_pylist()]
    if len(rows) != len(reader):
        raise AssertionError(f"the reader announced {len(reader)} records but {len(rows)} rows were written")
    return rows


def check(case: Case, fmt: str, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Problems of a finished ingest: (kind, detail)."""
    problems = []
    if case.expected_rows is not None and len(rows) != case.expected_rows:
        problems.append(("lost_rows", f"{len(rows)} rows, expected {case.expected_rows}"))
    ids = Counter(r["sample_id"] for r in rows)
    if any(c > 1 for c in ids.values()):
        problems.append(("duplicate_rows", f"{sum(c - 1 for c in ids.values())} repeated sample ids"))
    if fmt == "list":
        return problems + check_list(case, rows)
    for r in rows:
        if r["status"] != "ok":
            continue
        allowed = case.truth.get(r["content_hash"])
        if allowed is None:
            continue  # mutated bytes that still decode: no known identity
        if fmt == "recordio":
            off = int(r["source"].rsplit("#", 1)[1])
            if r["identity"] not in allowed and off not in case.relabelled:
                problems.append(("wrong_identities", f"record at byte {off}: {r['identity']}, image is {allowed}"))
        elif fmt == "images":
            if r["identity_name"] not in allowed:
                problems.append(("wrong_identities", f"{r['source']!r}: {r['identity_name']!r}, image is {allowed}"))
        elif r["identity"] != -1:
            problems.append(("wrong_identities", f"{r['source']!r}: identity {r['identity']} in a .bin"))
    return problems


def check_list(case: Case, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """List rows: one per data line, each carrying its line's identity name and a consistent number."""
    from pipeline.ids import sample_id

    lines = case.line_names or {}
    by_id = {sample_id("fuzz-list", key): key for key in lines}
    problems = []
    seen = {by_id.get(r["sample_id"]) for r in rows}
    if None in seen or len(seen) != len(lines):
        problems.append(("lost_rows", f"rows for lines {sorted(k for k in seen if k)} but the file has "
                                      f"{sorted(lines)}"))
    names = sorted(case.names)
    integers = all(_fits_int64(n) for n in names)
    for r in rows:
        key = by_id.get(r["sample_id"])
        if key is None or r["status"] != "ok":
            continue
        want = lines[key]
        number = -1 if want is None else int(want) if integers else names.index(want)
        want = None if want is None else _storable(want)
        if (r["identity_name"], r["identity"]) != (want, number):
            problems.append(("wrong_identities", f"{key}: ({r['identity_name']!r}, {r['identity']}), the line "
                                                 f"says ({want!r}, {number})"))
    return problems


def _fits_int64(text: str) -> bool:
    try:
        return -(2**63) <= int(text) < 2**63
    except ValueError:
        return False


def run_case(fmt: str, index: int, seed: int, pool: list[bytes], tmp: Path, tally: Tally,
             failures: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng([seed, FORMATS.index(fmt), index])
    root = tmp / f"{fmt}-{index:04d}"
    root.mkdir()
    case = BUILDERS[fmt](root, rng, pool)
    tally.cases += 1
    tally.mutations.update(case.mutations)
    ws = Workspace(root / "ws")
    try:
        rows = ingest_rows(case, fmt, ws, f"fuzz-{index:04d}")
    except Refused as e:
        tally.refused_datasets += 1
        msg = str(e)
        named = str(case.path) in msg
        if not named or "\n" in msg.strip():
            tally.unclear_errors += 1
            failures.append({"format": fmt, "case": index, "mutations": case.mutations, "kind": "unclear_error",
                             "detail": msg[:300]})
        elif not case.may_refuse:
            tally.lost_rows += 1
            failures.append({"format": fmt, "case": index, "mutations": case.mutations, "kind": "lost_rows",
                             "detail": f"refused a dataset that should ingest: {msg[:300]}"})
        return
    except Exception as e:  # noqa: BLE001 - a crash is what the harness counts
        tally.crashes += 1
        failures.append({"format": fmt, "case": index, "mutations": case.mutations, "kind": "crash",
                         "detail": f"{type(e).__name__}: {str(e)[:300]}",
                         "traceback": traceback.format_exc().splitlines()[-8:]})
        return
    finally:
        shutil.rmtree(ws.root, ignore_errors=True)
    tally.rows += len(rows)
    tally.statuses.update(r["status"] for r in rows)
    for kind, detail in check(case, fmt, rows):
        setattr(tally, kind, getattr(tally, kind) + 1)
        failures.append({"format": fmt, "case": index, "mutations": case.mutations, "kind": kind, "detail": detail})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_inputs", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=500, help="cases per format (default: 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--max-failures", type=int, default=20, help="failures listed in the report (default: 20)")
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")  # before the ingest path first imports Prefect
    t0 = time.perf_counter()
    pool = image_pool(np.random.default_rng(args.seed), 40)
    tallies = {f: Tally() for f in args.formats}
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fiqa-fuzz-") as tmp:
        for fmt in args.formats:
            for i in range(args.cases):
                run_case(fmt, i, args.seed, pool, Path(tmp), tallies[fmt], failures)
                shutil.rmtree(Path(tmp) / f"{fmt}-{i:04d}", ignore_errors=True)
    keys = ("cases", "crashes", "lost_rows", "duplicate_rows", "wrong_identities", "unclear_errors",
            "refused_datasets", "rows")
    report = {
        "benchmark": "fuzz_inputs", "seed": args.seed, "cases_per_format": args.cases,
        "formats": {f: {**{k: getattr(t, k) for k in keys}, "statuses": dict(sorted(t.statuses.items())),
                        "mutations": dict(sorted(t.mutations.items()))} for f, t in tallies.items()},
        "total": {k: sum(getattr(t, k) for t in tallies.values()) for k in keys},
        "failures": failures[: args.max_failures],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    bad = ("crashes", "lost_rows", "duplicate_rows", "wrong_identities", "unclear_errors")
    return 1 if any(report["total"][k] for k in bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
