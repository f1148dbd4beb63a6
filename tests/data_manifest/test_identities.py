"""The append-only identity map of a dataset."""

from __future__ import annotations

from data_manifest import ShardWriter, identities


def test_names_keep_their_numbers_and_new_ones_are_appended(workspace):
    assert identities.assign(workspace, "d", ["b", "c"]) == {"b": 0, "c": 1}
    assert identities.assign(workspace, "d", ["a", "b", "c"]) == {"b": 0, "c": 1, "a": 2}
    assert identities.assign(workspace, "d", ["c"]) == {"b": 0, "c": 1, "a": 2}  # a missing folder keeps its number
    assert identities.assign(workspace, "other/set", ["z"]) == {"z": 0}  # one map per dataset
    assert identities.map_path(workspace, "other/set").name == "other%2Fset.json"
    assert identities.read_map(workspace, "d") == {"b": 0, "c": 1, "a": 2}


def test_a_workspace_without_a_map_is_seeded_from_its_samples(workspace):
    ShardWriter(workspace, "samples", "r1").write("00000", [
        {"sample_id": f"s{i}", "dataset": ds, "source_kind": "folder", "source": f"/x/{i}", "status": "ok",
         "identity": ident, "identity_name": name}
        for i, (ds, name, ident) in enumerate([("d", "bob", 0), ("d", "carol", 1), ("d", "carol", 1),
                                               ("d", None, -1), ("e", "zed", 0)])])
    assert identities.assign(workspace, "d", ["aaron", "bob", "carol"]) == {"bob": 0, "carol": 1, "aaron": 2}
