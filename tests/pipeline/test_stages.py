"""The label stage registry and the pure parts of the WIDER training data, without Prefect."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.labellers import registry as S
from pipeline.labellers.attributes import split_calibration


def test_stage_names_are_validated_ordered_and_exclusive_per_factor():
    assert S.parse_stages("pose, align ,blur,pose") == ["align", "pose", "blur"]
    assert S.parse_stages(["lighting", "expression"]) == ["lighting", "expression"]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['sharpness'\]"):
        S.parse_stages("align,sharpness")
    with pytest.raises(ValueError, match="'attributes' and 'occlusion' both label 'occlusion'"):
        S.parse_stages("attributes,occlusion")
    with pytest.raises(ValueError, match="no stages given"):
        S.parse_stages(" , ")


def test_label_options_validate_once_and_parse_threshold_names():
    assert S.options_from({"blur_thresholds": "paper"}).blur_thresholds == (0.35, 0.7)
    assert S.options_from({"pose_thresholds": [12, 30]}).pose_thresholds == (12.0, 30.0)
    with pytest.raises(ValueError, match="pose thresholds must be ordered"):
        S.LabelOptions(pose_thresholds=(25.0, 10.0))
    with pytest.raises(ValueError, match="align_mode must be"):
        S.options_from({"align_mode": "rotated"})
    with pytest.raises(ValueError, match=r"unknown label option\(s\) \['yaw_limit'\]"):
        S.options_from({"yaw_limit": 3})


def test_built_stages_are_cached_per_options_and_registering_replaces():
    built = []
    S.register_stage("probe", ("blur",), lambda o: built.append(o.device) or object())
    try:
        a = S.get_stage("probe", S.LabelOptions())
        assert S.get_stage("probe", S.LabelOptions()) is a and built == ["cpu"]
        assert S.get_stage("probe", S.LabelOptions(device="cuda")) is not a and built == ["cpu", "cuda"]
        S.register_stage("probe", ("blur",), lambda o: "rebuilt")
        assert S.get_stage("probe", S.LabelOptions()) == "rebuilt"
    finally:
        S.STAGES.pop("probe", None)


def test_calibration_split_holds_out_whole_images():
    images = [f"img{i // 3}.jpg" for i in range(30)]  # 10 images, 3 faces each
    held = split_calibration(images, 0.2, seed=0)
    assert held.sum() == 6 and len({im for im, h in zip(images, held, strict=True) if h}) == 2
    assert all(held[i] == held[i - i % 3] for i in range(30))  # faces of one image stay together
    np.testing.assert_array_equal(held, split_calibration(images, 0.2, seed=0))
    with pytest.raises(ValueError, match="calibration fraction"):
        split_calibration(images, 1.0, seed=0)


def test_one_insightface_pack_lookup_for_names(tmp_path, monkeypatch):
    """A pack name resolves in $FIQA_MODELS/insightface first, then $INSIGHTFACE_HOME/models."""
    from models.weights import MissingWeightsError, insightface_pack

    store, home = tmp_path / "store", tmp_path / "home"
    monkeypatch.setenv("FIQA_MODELS", str(store))
    monkeypatch.setenv("INSIGHTFACE_HOME", str(home))
    (home / "models" / "mypack").mkdir(parents=True)
    (home / "models" / "mypack" / "rec.onnx").write_bytes(b"x")
    assert insightface_pack("mypack") == (home / "models" / "mypack").resolve()
    (store / "insightface" / "mypack").mkdir(parents=True)
    (store / "insightface" / "mypack" / "rec.onnx").write_bytes(b"x")
    assert insightface_pack("mypack") == (store / "insightface" / "mypack").resolve()
    with pytest.raises(MissingWeightsError, match="'other' not found"):
        insightface_pack("other")
