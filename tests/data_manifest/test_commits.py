"""Shard commit receipts: a worker that does not see the workspace fails its shard, naming itself and the path."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from data_manifest import ShardWriter, Workspace, commits
from data_manifest.crops import write_pack


def _started(ws: Workspace, run_id: str = "run-1") -> str:
    commits.expect_shards(ws, run_id)
    return run_id


def _body(ws_root: str, run_id: str, shard: str, n: int) -> dict[str, int]:
    ws = Workspace(ws_root)
    ShardWriter(ws, "samples", run_id).write(shard, [{"sample_id": f"s{i}", "dataset": "d", "source_kind": "folder",
                                                      "source": f"/d/{i}", "status": "ok"} for i in range(n)])
    write_pack(ws, run_id, shard, np.zeros((n, 4, 4, 3), np.uint8))
    return {"rows": n}


def test_a_receipt_lists_the_shards_files_with_their_rows_and_passes_where_they_are(workspace):
    rid = _started(workspace)
    counts = commits.receipted(_body)(str(workspace.root), rid, "a", 3)
    receipt = counts[commits.RECEIPT]
    assert receipt["worker"] == f"{socket.gethostname()} (pid {os.getpid()})"
    assert receipt["files"] == {f"crops/faces/{rid}/part-a.npy": 3, f"manifests/samples/run={rid}/part-a.parquet": 3}
    assert commits.verified(workspace, counts) == ({"rows": 3}, receipt["worker"])
    assert commits.verified(workspace, {"rows": 1}) == ({"rows": 1}, None)  # a body run in the flow's process


def test_a_worker_without_the_workspace_fails_before_writing_naming_itself_and_the_path(tmp_path):
    elsewhere = tmp_path / "not-shared"
    called = []
    with pytest.raises(commits.WorkspaceNotShared) as err:
        commits.receipted(lambda *a: called.append(a))(str(elsewhere), "run-1", "a")
    msg = str(err.value)
    assert socket.gethostname() in msg and f"pid {os.getpid()}" in msg and str(elsewhere) in msg
    assert "same path" in msg and not called and not elsewhere.exists()


def test_files_the_flow_does_not_see_fail_the_commit(workspace):
    rid = _started(workspace)
    counts = commits.receipted(_body)(str(workspace.root), rid, "a", 3)
    (workspace.root / f"manifests/samples/run={rid}/part-a.parquet").unlink()
    with pytest.raises(commits.WorkspaceNotShared, match=r"part-a.parquet \(3 rows there\) is missing here"):
        commits.verified(workspace, counts)
    _body(str(workspace.root), rid, "a", 2)  # another file under the same name: the row count differs
    counts[commits.RECEIPT]["files"][f"crops/faces/{rid}/part-a.npy"] = 2
    with pytest.raises(commits.WorkspaceNotShared, match=r"part-a.parquet has 2 rows here, 3 there") as err:
        commits.verified(workspace, counts)
    assert counts[commits.RECEIPT]["worker"] in str(err.value) and str(workspace.root) in str(err.value)
