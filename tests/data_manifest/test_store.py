"""A workspace on object storage: files then a commit marker; only committed shards are visible to a reader's
catalog (its local cache); a bad URL, an unreachable endpoint or a missing bucket fails naming the URL."""

from __future__ import annotations

import json

import pytest

from data_manifest import ShardWriter, Workspace, catalog, commits, runs, store


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"sample_id": f"s{i:03d}", "dataset": "d", "source_kind": "list", "source": f"/x/{i}.png",
             "status": "ok"} for i in range(start, start + n)]


def _ids(ws: Workspace) -> list[str]:
    return catalog.query(ws, "SELECT sample_id FROM samples ORDER BY sample_id").column("sample_id").to_pylist()


def _other_client(monkeypatch, tmp_path, url: str, name: str = "other") -> Workspace:
    """The same workspace opened by another client: its own cache."""
    monkeypatch.setenv("FIQA_CACHE", str(tmp_path / name))
    return Workspace(url)


def test_a_store_workspace_caches_locally_and_names_its_url(s3_workspace, tmp_path):
    ws = Workspace(s3_workspace)
    assert ws.location == s3_workspace and repr(ws) == f"Workspace({s3_workspace!r})"
    assert ws.root.is_relative_to(tmp_path / "cache") and ws.manifests.is_dir()
    assert Workspace(s3_workspace + "/").root == ws.root  # one cache per workspace
    assert Workspace(tmp_path / "local").store is None and Workspace(tmp_path / "local").push() == 0


def test_committed_shards_reach_another_client_row_for_row(s3_workspace, tmp_path, monkeypatch):
    ws = Workspace(s3_workspace)
    ShardWriter(ws, "samples", "r1").write(0, _rows(3))
    ShardWriter(ws, "samples", "r1").write(1, _rows(2, 3))
    assert ws.push() == 2 and ws.push() == 0  # unchanged files are not committed again
    reader = _other_client(monkeypatch, tmp_path, s3_workspace)
    assert reader.root != ws.root
    assert _ids(reader) == _ids(ws) == [f"s{i:03d}" for i in range(5)]
    mine = catalog.query(ws, "SELECT * EXCLUDE (created_at) FROM samples ORDER BY sample_id")
    theirs = catalog.query(reader, "SELECT * EXCLUDE (created_at) FROM samples ORDER BY sample_id")
    assert theirs.to_pylist() == mine.to_pylist()
    markers = sorted((reader.root / store.COMMITS).glob("*.json"))
    assert len(markers) == 1 and sorted(json.loads(markers[0].read_text())["files"]) == [
        "manifests/samples/run=r1/part-00000.parquet", "manifests/samples/run=r1/part-00001.parquet"]
    # a shard rewritten and committed again replaces the old one for the reader
    ShardWriter(ws, "samples", "r1").write(1, _rows(1, 10))
    assert ws.push() == 1 and reader.pull() == 1
    assert _ids(reader) == ["s000", "s001", "s002", "s010"]
    lost = reader.manifests / "samples" / "run=r1" / "part-00000.parquet"
    lost.unlink()  # a cache file lost: the next opening restores it, a pull of the new commits only does not
    assert reader.pull(repair=False) == 0 and not lost.exists()
    assert Workspace(s3_workspace).pull() == 0 and lost.is_file() and len(_ids(reader)) == 4


def test_many_files_move_at_once_with_the_same_result(s3_workspace, tmp_path, monkeypatch):
    """Pushes and pulls move `FIQA_S3_TRANSFERS` files at once: 40 shards in 8 commits reach a client pulling with
    16 transfers and one pulling with 1 identically; a bad setting is refused naming it."""
    ws = Workspace(s3_workspace)
    for commit in range(8):
        for k in range(5):
            ShardWriter(ws, "samples", f"r{commit}").write(k, _rows(2, 10 * (5 * commit + k)))
        assert ws.push() == 5
    got = {}
    for n in ("16", "1"):
        monkeypatch.setenv(store.ENV_TRANSFERS, n)
        reader = _other_client(monkeypatch, tmp_path, s3_workspace, name=f"t{n}")
        files = sorted(p.relative_to(reader.root).as_posix() for p in reader.manifests.rglob("*.parquet"))
        got[n] = (files, _ids(reader))
    assert got["16"] == got["1"] and len(got["1"][0]) == 40 and len(got["1"][1]) == 80
    monkeypatch.setenv(store.ENV_TRANSFERS, "0")
    with pytest.raises(store.StoreError, match="FIQA_S3_TRANSFERS must be a whole number >= 1"):
        store.transfers()


def test_files_without_a_commit_marker_are_invisible(s3_workspace, tmp_path, monkeypatch):
    """A worker killed after uploading its files, before their marker: no reader sees them, in any cache."""
    ws = Workspace(s3_workspace)
    ShardWriter(ws, "samples", "r1").write(0, _rows(2))
    ws.push()
    killed = ShardWriter(ws, "samples", "r2").write(0, _rows(3, 100))  # written into this cache only ...
    rel = killed.relative_to(ws.root).as_posix()
    with open(killed, "rb") as src, ws.store.fs.open_output_stream(ws.store.key(rel)) as out:
        out.write(src.read())  # ... and uploaded, but never committed
    assert _ids(ws) == ["s000", "s001"]  # not even in the cache it was written into
    reader = _other_client(monkeypatch, tmp_path, s3_workspace)
    assert not (reader.root / rel).exists() and _ids(reader) == ["s000", "s001"]
    ws.push([rel])  # the marker: now it is committed
    assert reader.pull() == 1 and _ids(reader) == ["s000", "s001", "s100", "s101", "s102"]


def test_runs_and_shard_records_are_committed_and_a_resume_elsewhere_skips_them(s3_workspace, tmp_path,
                                                                                 monkeypatch):
    ws = Workspace(s3_workspace)
    rid = runs.start_run(ws, "ingest", {"a": 1}, "ingest-r")
    ShardWriter(ws, "samples", rid).write("00000", _rows(2))
    runs.mark_shard_done(ws, rid, "00000", {"rows": 2})
    runs.finish_run(ws, rid, runs.COMPLETED)
    other = _other_client(monkeypatch, tmp_path, s3_workspace)
    assert runs.shard_done(other, rid, "00000") and not runs.shard_done(other, rid, "00001")
    assert runs.run_info(other, rid)["status"] == runs.COMPLETED
    assert runs.shard_counts(other, rid) == {"rows": 2}
    assert catalog.query(other, "SELECT status FROM runs").column("status").to_pylist() == [runs.COMPLETED]
    assert not any(p.name in store.LOCAL_ONLY for p in (ws.root / "runs").rglob("*")
                   if ws.store.fs.get_file_info(ws.store.key(p.relative_to(ws.root).as_posix())).is_file)
    assert ws.store.fs.get_file_info(ws.store.key("catalog.duckdb")).type.name == "NotFound"


def test_a_shard_task_commits_its_files_and_the_flow_verifies_them_from_the_store(s3_workspace, tmp_path,
                                                                                    monkeypatch):
    """The receipted task on a worker with its own cache; the flow's process pulls what it committed."""
    flow_ws = Workspace(s3_workspace)
    rid = runs.start_run(flow_ws, "ingest", {}, "ingest-w")
    commits.expect_shards(flow_ws, rid)

    @commits.receipted
    def body(ws_root, run_id, shard):
        assert Workspace(ws_root).root != flow_ws.root
        ShardWriter(Workspace(ws_root), "samples", run_id).write(shard, _rows(4))
        return {"rows": 4}

    monkeypatch.setenv("FIQA_CACHE", str(tmp_path / "worker"))
    out = body(flow_ws.location, rid, "00000")
    monkeypatch.setenv("FIQA_CACHE", str(tmp_path / "cache"))
    counts, worker = commits.verified(flow_ws, out)
    assert counts == {"rows": 4} and worker == commits.worker_name()
    assert _ids(flow_ws) == [f"s{i:03d}" for i in range(4)]
    with pytest.raises(commits.WorkspaceNotShared, match="does not find run nope-run"):
        body(flow_ws.location, "nope-run", "00000")


def test_files_handed_to_tasks_reach_another_machine_through_the_store(s3_workspace, tmp_path, monkeypatch):
    import numpy as np

    from data_manifest.crops import PackReader, write_pack

    ws = Workspace(s3_workspace)
    outside = tmp_path / "models" / "tiny.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"weights")
    ref = ws.share(outside)  # copied under checkpoints/imported/<digest>/, keeping its folder and name, committed
    assert ref.startswith("checkpoints/imported/") and ref.endswith("/models/tiny.pt") and ws.share(outside) == ref
    ShardWriter(ws, "samples", "r1").write(0, _rows(2))
    inside = ws.share(ws.manifests / "samples" / "run=r1" / "part-00000.parquet")
    assert inside == "manifests/samples/run=r1/part-00000.parquet"  # a workspace file: its relative path
    pack = write_pack(ws, "r1", 0, np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3))
    ShardWriter(ws, "samples", "r1").write(1, _rows(2, 2))
    assert ws.push() == 2  # the pack and the other shard
    local = Workspace(tmp_path / "disk")
    assert local.share(outside) == str(outside) and local.local(str(outside)) == outside  # a shared disk: as is

    with store.no_sync():  # a worker: its own cache, which pulls only what it opens
        other = _other_client(monkeypatch, tmp_path, s3_workspace)
        assert not (other.root / ref).exists() and not (other.root / pack).exists()
        reads, read = [], store.Store._read
        monkeypatch.setattr(store.Store, "_read", lambda self, key: reads.append(key) or read(self, key))
        assert other.local(ref).read_bytes() == b"weights"
        markers = len(reads)
        assert markers >= 3 and other.local(inside).is_file() and len(reads) == markers  # markers are read once
        assert PackReader(other).read(pack, 1).tolist() == PackReader(ws).read(pack, 1).tolist()
        assert not (other.root / "manifests" / "samples" / "run=r1" / "part-00001.parquet").exists()  # not read


def test_bad_urls_missing_buckets_and_unreachable_stores_fail_naming_the_url(s3_env, monkeypatch):
    for url, match in [("s3://", "not a valid bucket"), ("s3://Bad_Bucket/x", "not a valid bucket"),
                       ("gs://bucket/x", "unsupported scheme 'gs'"), ("s3://bucket/../x", "'.' or '..'"),
                       ("s3://bucket/x?y=1", "without credentials, '\\?'")]:
        with pytest.raises(store.StoreError, match=match) as e:
            Workspace(url)
        assert url in str(e.value)
    with pytest.raises(store.StoreError, match="s3://no-such-bucket/ws: bucket 'no-such-bucket' does not exist"):
        Workspace("s3://no-such-bucket/ws")
    monkeypatch.setenv("FIQA_S3_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(store.StoreError, match=r"s3://b-unreachable/ws: cannot reach the object store at "
                                               r"http://127.0.0.1:9"):
        Workspace("s3://b-unreachable/ws")


def test_a_hostile_marker_cannot_write_outside_the_cache(s3_workspace, tmp_path, monkeypatch):
    ws = Workspace(s3_workspace)
    with ws.store.fs.open_output_stream(ws.store.key(f"{store.COMMITS}/00-evil.json")) as out:
        out.write(json.dumps({"files": {"../../escaped.txt": [1, 1]}}).encode())
    with pytest.raises(store.StoreError, match="lists '../../escaped.txt', which is not a workspace file"):
        _other_client(monkeypatch, tmp_path, s3_workspace)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_cli_refuses_a_bad_store_before_any_work_naming_the_url(s3_env, capsys):
    from flows import cli

    for argv in (["sql", "SELECT 1"], ["ingest", "/nonexistent", "--dataset", "d"]):
        assert cli.main([*argv, "--workspace", "s3://no-such-bucket/ws"]) == 2, argv
        err = capsys.readouterr().err
        assert "s3://no-such-bucket/ws: bucket 'no-such-bucket' does not exist" in err and "Traceback" not in err


def test_a_checkpoint_spares_a_new_client_every_marker_and_a_late_marker_still_counts(s3_workspace, tmp_path,
                                                                                      monkeypatch):
    from flows.compact import compact

    ws = Workspace(s3_workspace)
    for k in range(5):  # five commits, one marker each
        ShardWriter(ws, "samples", f"r{k}").write(0, _rows(2, 2 * k))
        assert ws.push() == 1
    ShardWriter(ws, "samples", "r0").write(0, _rows(1, 50))  # a file committed twice: the newest stamp wins
    assert ws.push() == 1
    out = compact(ws)["commits"]
    assert out["markers_covered"] == 6 and out["checkpoint"].endswith(store.CHECKPOINT)
    ShardWriter(ws, "samples", "r9").write(0, _rows(1, 90))  # committed after the checkpoint
    assert ws.push() == 1
    folder = ws.store.key(store.COMMITS)
    late = f"{0:020d}-{'0' * 12}.json"  # a marker named before the checkpoint, written after it (a clock behind)
    ShardWriter(ws, "samples", "late").write(0, _rows(1, 70))
    rel = "manifests/samples/run=late/part-00000.parquet"
    st = store._stamp(ws.root / rel)
    with ws.store.fs.open_output_stream(ws.store.key(rel)) as dst:
        dst.write((ws.root / rel).read_bytes())
    with ws.store.fs.open_output_stream(f"{folder}/{late}") as dst:
        dst.write(json.dumps({"files": {rel: list(st)}}).encode())

    read: list[str] = []
    real = store.Store._read
    monkeypatch.setattr(store.Store, "_read", lambda self, key: read.append(key.rsplit("/", 1)[-1]) or real(self, key))
    monkeypatch.setattr(store.Store, "_open", {})  # a new process: nothing read yet
    reader = _other_client(monkeypatch, tmp_path, s3_workspace)
    markers = [n for n in read if n.endswith(".json")]
    assert out["checkpoint"] in markers and late in markers and len(markers) == 3, markers  # not the six it covers
    want = [*(f"s{i:03d}" for i in range(2, 10)), "s050", "s070", "s090"]
    assert _ids(reader) == want
    assert reader.pull() == 0 and _ids(reader) == want  # the covered markers count as seen
    assert _ids(Workspace(s3_workspace)) == want  # the writer, which saw every marker, agrees
