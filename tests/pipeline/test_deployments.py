"""Deployment names, routes, refresh conditions and setup commands (no Prefect)."""

from __future__ import annotations

import pytest

from data_manifest import ShardWriter
from pipeline import deployments as D


def test_where_conditions_select_new_samples(workspace):
    ShardWriter(workspace, "samples", "r1").write("00000", [
        {"sample_id": sid, "dataset": ds, "source_kind": "folder", "source": f"/x/{sid}", "status": "ok"}
        for sid, ds in (("d:a", "o'k"), ("d:b", "o'k"), ("e:c", "other"))])
    ShardWriter(workspace, "faces", "r2").write("00000", [{"sample_id": "d:a", "status": "ok"}])
    assert D.count_where(workspace, D.new_samples_where("o'k")) == 1
    assert D.count_where(workspace, D.missing_anchors_where("o'k")) == 2
    assert D.parse_steps("anchors,ingest") == ["ingest", "anchors"]
    with pytest.raises(ValueError, match="unknown or no refresh steps"):
        D.parse_steps("ingest,train")


def test_names_come_from_action_and_subject():
    assert D.deployment_name("refresh", "incoming") == "refresh-incoming"
    assert D.deployment_name("train-and-score", "lfw") == "train-and-score-lfw"
    for bad in ("", "a b", "x/y"):
        with pytest.raises(ValueError, match="deployment needs a name"):
            D.deployment_name("relabel", bad)


def test_a_deployment_of_another_route_or_pool_is_not_replaced():
    name = "refresh-dataset/refresh-incoming"
    assert D.ownership_conflict(name, ["fiqa", "route:serve"], None, "serve", None) is None
    assert D.ownership_conflict(name, ["route:register"], "fiqa-cpu", "register", "fiqa-cpu") is None
    why = D.ownership_conflict(name, ["fiqa", "route:serve"], None, "register", "fiqa-cpu")
    assert "created by serve (not fiqa deploy register)" in why and "prefect deployment delete" in why
    assert "created by yaml" in D.ownership_conflict(name, ["route:yaml"], "fiqa-cpu", "register", "fiqa-cpu")
    assert "created by another tool" in D.ownership_conflict(name, ["fiqa"], "fiqa-cpu", "register", "fiqa-cpu")
    assert "on work pool other-cpu, not fiqa-cpu" in D.ownership_conflict(
        name, ["route:register"], "other-cpu", "register", "fiqa-cpu")


def test_setup_commands_follow_the_api_url():
    lines = D.setup_commands("c", "g", "http://127.0.0.1:4391/api")
    assert lines[0].startswith("prefect server start --host 127.0.0.1 --port 4391 ")
    assert "http://127.0.0.1:4391" in lines[0] and "4200" not in lines[0]
    assert lines[1] == "prefect config set PREFECT_API_URL=http://127.0.0.1:4391/api"
    assert D.setup_commands()[0].startswith("prefect server start --host 127.0.0.1 --port 4200 ")
    assert "prefect concurrency-limit create gpu 1" in " ".join(D.setup_commands())
