"""Attribute CNN: crop geometry, targets, metrics, checkpoints, the WIDER training flow and the label stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_manifest import Workspace, catalog
from data_manifest.crops import read_crops
from data_manifest.vocabulary import FACTOR_CLASSES
from models import geometry
from models.attributes import (
    HEADS,
    AttributeNet,
    AttributeNetConfig,
    available_configs,
    load_checkpoint,
    load_config,
    predict_proba,
    save_checkpoint,
    to_input,
)
from models.attributes_train import (
    ArrayImages,
    LabelledCrops,
    TrainConfig,
    auroc,
    balanced_accuracy,
    choose_threshold,
    confusion,
    fit,
    positive_weights,
)
from models.detectors import Detection
from pipeline.labellers.attributes import (
    ALIGNED,
    BOX,
    AttributeStage,
    antialiased_warp,
    box_crop,
    box_transform,
    training_crop,
    wider_targets,
)
from pipeline.labellers.base import NO_FACE, FaceCrop
from pipeline.readers.wider import WiderFace, parse, split_layout

torch.set_num_threads(1)  # robust timing on a shared 2-core machine


def face(occlusion: int = 0, expression: int = 0, illumination: int = 0) -> WiderFace:
    return WiderFace((0, 0, 40, 40), 0, expression, illumination, 0, occlusion, 0)


# ---------------------------------------------------------------- targets and crops


@pytest.mark.parametrize(
    ("occ", "expr", "illum", "expected"),
    [
        (0, 0, 0, [0, 0, 0]),
        (1, 0, 0, [1, 0, 0]),
        (2, 0, 0, [1, 0, 0]),
        (0, 1, 0, [0, 1, 0]),
        (0, 0, 1, [0, 0, 1]),
        (2, 1, 1, [1, 1, 1]),
    ],
)
def test_wider_targets(occ: int, expr: int, illum: int, expected: list[int]) -> None:
    assert HEADS == ("occlusion", "expression", "lighting")
    np.testing.assert_array_equal(wider_targets(face(occ, expr, illum)), np.array(expected, np.float32))


def test_box_transform_geometry() -> None:
    m = box_transform((100, 50, 40, 60), margin=0.25)
    scale = 112 / (60 * 1.5)
    np.testing.assert_allclose(m[:, :2], np.diag([scale, scale]))
    centre = np.array([100 + 39 / 2, 50 + 59 / 2])
    np.testing.assert_allclose(geometry.transform_points(centre[None], m)[0], [55.5, 55.5])
    # the box's top edge lands margin * side below the crop top
    top = geometry.transform_points(np.array([[centre[0], 50 - 0.5]]), m)[0, 1]
    assert top == pytest.approx(-0.5 + 0.25 * 60 * scale, abs=1e-9)
    with pytest.raises(ValueError, match="no area"):
        box_transform((0, 0, 0, 10))


def test_box_crop_places_the_box_and_pads_black() -> None:
    img = np.full((200, 300, 3), 40, np.uint8)
    img[60:100, 150:190] = (250, 10, 10)  # a 40x40 red box
    crop = box_crop(img, (150, 60, 40, 40), margin=0.25)
    assert crop.method == BOX and crop.crop.shape == (112, 112, 3)
    red = (crop.crop[..., 0] > 150) & (crop.crop[..., 1] < 60)
    ys, xs = np.nonzero(red)
    # 40 px box -> 112 / 1.5 = 74.7 px, centred
    assert 70 <= xs.max() - xs.min() + 1 <= 78 and 70 <= ys.max() - ys.min() + 1 <= 78
    assert abs((xs.min() + xs.max()) / 2 - 55.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 55.5) <= 1
    corner = box_crop(img, (0, 0, 40, 40), margin=0.25).crop
    assert corner[:10, :10].max() == 0  # outside the image is black


def test_antialiased_warp_matches_plain_warp_geometry() -> None:
    rng = np.random.default_rng(0)
    smooth = (np.add.outer(np.arange(900), np.arange(900)) % 256).astype(np.uint8)
    img = np.stack([smooth, smooth.T, np.full_like(smooth, 128)], axis=-1)
    img[450:470, 300:320] = 255
    m = box_transform((200, 200, 500, 500), margin=0.1)  # about 5x downscale
    fine = antialiased_warp(img, m)
    plain = geometry.warp(img, m)
    # the white square lands in the same place with and without the area pre-filter
    def centroid(c: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(c.min(axis=-1) > 200)
        return np.array([xs.mean(), ys.mean()])

    np.testing.assert_allclose(centroid(fine), centroid(plain), atol=0.6)
    np.testing.assert_allclose(centroid(fine), geometry.transform_points(np.array([[309.5, 459.5]]), m)[0], atol=0.6)
    small = box_transform((10, 10, 40, 40))  # upscaling: identical to geometry.warp
    noise = rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(antialiased_warp(noise, small), geometry.warp(noise, small))


class StubDetector:
    """Returns fixed detections in the coordinates of the image it is given."""

    name, version = "stub", "1"

    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections
        self.seen: list[tuple[int, int]] = []

    def detect(self, image: np.ndarray) -> list[Detection]:
        self.seen.append(image.shape[:2])
        return self.detections


def test_training_crop_aligns_when_landmarks_fall_inside_the_box() -> None:
    img = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    box = (150, 100, 80, 100)  # x, y, w, h
    # the detector sees the box enlarged by 0.5 on each side: region origin (110, 50)
    lm_src = geometry.ARCFACE_TEMPLATE * 0.7 + np.array([150.0, 110.0])
    det = Detection(np.array([150, 105, 229, 199], float) - [110, 50, 110, 50], 0.99, lm_src - [110, 50])
    tc = training_crop(img, box, detector=StubDetector([det]))
    assert tc.method == ALIGNED
    np.testing.assert_allclose(tc.landmarks, lm_src, atol=1e-4)
    np.testing.assert_allclose(geometry.transform_points(lm_src, tc.transform), geometry.ARCFACE_TEMPLATE, atol=1e-6)
    np.testing.assert_array_equal(tc.crop, geometry.warp(img, tc.transform))

    outside = Detection(det.box, 0.99, det.landmarks + [0, 90])  # mouth below the box
    stub = StubDetector([outside])
    fallback = training_crop(img, box, detector=stub)
    assert fallback.method == BOX and stub.seen == [(200, 160)]
    np.testing.assert_array_equal(fallback.crop, box_crop(img, box).crop)
    assert training_crop(img, box, detector=StubDetector([])).method == BOX


# ---------------------------------------------------------------- metrics


def test_metrics_on_known_values() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([0.2, 0.3]), np.array([1, 1])))
    cm = confusion(np.array([0.1, 0.6, 0.7, 0.2, 0.9]), np.array([0, 0, 1, 1, 1]), 0.5)
    np.testing.assert_array_equal(cm, [[1, 1], [1, 2]])
    assert balanced_accuracy(cm) == pytest.approx((1 / 2 + 2 / 3) / 2)
    p = np.array([0.05, 0.2, 0.3, 0.32, 0.6, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1])
    t = choose_threshold(p, y, min_per_class=1)
    assert 0.3 < t <= 0.32 and balanced_accuracy(confusion(p, y, t)) == 1.0
    assert choose_threshold(p, np.ones(6), min_per_class=1) == 0.5
    assert choose_threshold(p, y) == 0.5  # three of each class: too few to move the default
    assert choose_threshold(np.r_[p, p + 0.01], np.r_[y, y]) == pytest.approx((0.31 + 0.32) / 2)
    np.testing.assert_allclose(positive_weights(np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]), 50.0),
                               [3.0, 50.0, 1 / 3], rtol=1e-6)


# ---------------------------------------------------------------- model and checkpoint


@pytest.mark.parametrize("name", ["attributes_mobilefacenet", "attributes_resnet18", "attributes_tiny"])
def test_bundled_configs_build_and_run(name: str) -> None:
    assert name in available_configs()
    cfg = load_config(name)
    net = AttributeNet(cfg).eval()
    crops = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    p = predict_proba(net, crops)
    assert p.shape == (2, 3) and ((p > 0) & (p < 1)).all()


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_config("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"arch": "mobilefacenet", "colour": 3}))
    with pytest.raises(ValueError, match="colour"):
        load_config(bad)
    with pytest.raises(ValueError, match="arch"):
        AttributeNetConfig(arch="vgg")
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig.from_dict({"epoch": 3})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = AttributeNet(load_config("tiny")).eval()
    path = tmp_path / "a.pt"
    thresholds = {"occlusion": 0.3, "expression": 0.6, "lighting": 0.45}
    save_checkpoint(path, net, thresholds=thresholds, metrics={"occlusion": {"auroc": 0.9}}, version="run-1")
    raw = torch.load(path, weights_only=True)
    assert raw["label_semantics"]["occlusion"]["positive"] == FACTOR_CLASSES["occlusion"][0] == "obstructed"
    assert raw["config"]["name"] == "attributes_tiny"
    ck = load_checkpoint(path)
    assert ck.thresholds == thresholds and ck.version == "run-1" and ck.metrics["occlusion"]["auroc"] == 0.9
    crops = np.random.default_rng(0).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_proba(ck.model, crops), predict_proba(net, crops))
    assert ck.model_id.startswith("attributes_tiny-") and len(ck.model_id) == len("attributes_tiny-") + 12
    store = tmp_path / "store"
    (store / "attributes").mkdir(parents=True)
    (store / "attributes" / "named.pt").write_bytes(path.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIQA_MODELS", str(store))
        assert AttributeStage("named.pt").labeller == ck.model_id  # a bare name is looked up in the model store
        with pytest.raises(FileNotFoundError, match="train-attributes"):
            AttributeStage("absent.pt")
    torch.save({"format": "other"}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not an attribute checkpoint"):
        load_checkpoint(tmp_path / "b.pt")


@pytest.mark.slow
def test_fit_with_balanced_sampler_learns_a_separable_toy_problem() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((48, 3)) < [0.5, 0.3, 0.25]).astype(np.float32)
    crops = np.full((48, 112, 112, 3), 90, np.uint8)
    crops[y[:, 0] == 1, :40] = 250  # each head has its own visible cue
    crops[y[:, 1] == 1, :, :40, 1] = 0
    crops[y[:, 2] == 1, 70:, 70:] = 10
    data = LabelledCrops(ArrayImages(crops), y)
    res = fit(load_config("tiny"), data, TrainConfig(epochs=4, batch_size=16, lr=5e-3, imbalance="sampler"),
              calibration=data)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.info["imbalance"] == "sampler" and res.info["pos_weight"] == dict.fromkeys(HEADS, 1.0)
    for h in HEADS:
        assert res.info["calibration_metrics"][h]["balanced_accuracy"] > 0.9, h


def test_training_crop_with_mtcnn_on_a_real_face(mtcnn_detector, mtcnn_result, real_face) -> None:

    det = mtcnn_detector()
    img = np.ascontiguousarray(real_face("astronaut"))
    res = mtcnn_result("astronaut")  # shared with the alignment tests; continuous coordinates
    full = Detection(res.boxes[0] - 0.5, float(res.scores[0]), res.landmarks[0] - 0.5)
    x1, y1, x2, y2 = full.box
    box = (int(x1), int(y1), int(x2 - x1 + 1), int(y2 - y1 + 1))  # a WIDER-style annotation of the face
    tc = training_crop(img, box, detector=det)
    assert tc.method == ALIGNED and tc.score > 0.9
    np.testing.assert_allclose(tc.landmarks, full.landmarks, atol=3.0)
    np.testing.assert_allclose(tc.transform, geometry.similarity_transform(tc.landmarks), atol=1e-5)
    residual = np.linalg.norm(geometry.transform_points(tc.landmarks, tc.transform) - geometry.ARCFACE_TEMPLATE, axis=1)
    assert residual.max() < 8.0  # a real face fits the template up to a few pixels
    assert training_crop(img, (20, 400, 60, 60), detector=det).method == BOX  # no face in this box


def test_flow_rejects_bad_inputs_before_work(tmp_path: Path) -> None:
    from flows.train_attributes import configure_parser, train_config_from_args
    from pipeline.attribute_training.crops import resolve_detector, resolve_splits
    from pipeline.labellers.attributes import wider_face_key as _face_key

    with pytest.raises(FileNotFoundError, match="train annotation file"):
        resolve_splits(str(tmp_path))
    with pytest.raises(ValueError, match="--wider-root"):
        resolve_splits(None)
    with pytest.raises(ValueError, match="unknown detector"):
        resolve_detector("haar", "cpu")
    assert resolve_detector("none", "cpu")[0] == "none"
    seen: dict[str, int] = {}
    keys = [_face_key("a/b.jpg", (1, 2, 30, 40), seen) for _ in range(2)] + [_face_key("a/b.jpg", (1, 2, 3, 4), seen)]
    assert keys == ["a/b.jpg#1,2,30,40", "a/b.jpg#1,2,30,40~1", "a/b.jpg#1,2,3,4"]
    import argparse

    p = argparse.ArgumentParser()
    configure_parser(p)
    args = p.parse_args(["--wider-root", "x", "--epochs", "3", "--imbalance", "sampler", "--no-amp"])
    assert train_config_from_args(args) == {"epochs": 3, "imbalance": "sampler", "amp": False}


# ---------------------------------------------------------------- the flow and the label stage


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory) -> dict:
    from flows.train_attributes import train_attributes_flow
    from pipeline.synthetic.wider_synthetic import SyntheticSpec, make_dataset

    base = tmp_path_factory.mktemp("attr")
    root = make_dataset(base / "wider", SyntheticSpec(images=160), seed=3)
    # one train image goes missing: its faces must come back as rows with a status, not stop the run
    gt, images = split_layout(root, "train")
    lost = next(r for r in parse(gt) if len(r.faces) == 2)
    (images / lost.path).unlink()
    t0 = time.perf_counter()
    out = train_attributes_flow(
        wider_root=str(root),
        workspace=str(base / "ws"),
        model_config="tiny",
        train_config={"epochs": 8, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5},
        detector="none",
        shard_images=80,
        calibration_fraction=0.15,
        device="cpu",
        torch_threads=1,
    )
    out["seconds"] = time.perf_counter() - t0
    out["ws"] = Workspace(base / "ws")
    out["data_ws"] = Workspace(out["data_workspace"])
    out["lost"] = lost
    return out


@pytest.mark.slow
def test_flow_trains_and_beats_chance(trained: dict) -> None:
    print("train_attributes flow on synthetic WIDER:", json.dumps(trained["metrics"]), f"{trained['seconds']:.1f}s")
    assert trained["seconds"] < 90
    for h in HEADS:
        m = trained["metrics"][h]
        assert m["balanced_accuracy"] > 0.75, (h, m)
        assert m["auroc"] > 0.85, (h, m)
    data = trained["data"]
    assert data["train"]["images"] == 160 and data["train"]["crops"] == data["train"]["kept"] - 2
    assert data["train"]["box"] == data["train"]["crops"] and data["train"]["aligned"] == 0
    assert data["train"]["failed"] == 2 and data["val"]["failed"] == 0
    assert set(data["train"]["skipped"]) <= {"invalid", "too_small"} and sum(data["train"]["skipped"].values()) > 0

    ws, data_ws = trained["ws"], trained["data_ws"]
    assert data_ws.root == ws.root / "wider_face"
    report = Path(trained["report"])
    text = report.read_text()
    assert "- landmark detector: none" in text and "occlusion 2.00" not in text
    assert f"| train | 160 | {data['train']['faces']} | {data['train']['kept']} |" in text
    for h in HEADS:
        assert (report.parent / f"confusion_{h}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{h}](confusion_{h}.png)" in text
    ck = load_checkpoint(trained["checkpoint"])
    assert ck.model_id == trained["model_id"]
    lighting = trained["metrics"]["lighting"]["balanced_accuracy"]
    assert ck.metrics["lighting"]["balanced_accuracy"] == pytest.approx(lighting)
    assert ck.meta["train"]["pos_weight"]["occlusion"] > 1.0  # fewer obstructed than unobstructed faces
    # the crops and ground truth are in the data workspace's catalog, apart from the main workspace's samples
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 0}]
    by_dataset = "SELECT dataset, count(*) AS n FROM labels GROUP BY dataset ORDER BY dataset"
    rows = catalog.query(data_ws, by_dataset).to_pylist()
    assert [r["dataset"] for r in rows] == ["wider_face/train", "wider_face/val"]
    assert sum(r["n"] for r in rows) == data["train"]["kept"] + data["val"]["kept"]
    missing = catalog.query(data_ws, "SELECT s.source, s.status, f.error FROM samples s "
                                     "JOIN faces f USING (sample_id) WHERE s.status <> 'ok'").to_pylist()
    assert len(missing) == 2 and all(m["status"] == "missing" and trained["lost"].path in m["error"] for m in missing)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="attributes-%")))
    kinds = {a.key: a.type for a in arts}
    assert kinds["attributes-report"] == "markdown" and kinds["attributes-metrics"] == "table"
    assert all(kinds[f"attributes-confusion-{h}"] == "image" for h in HEADS)
    run = catalog.query(ws, "SELECT status, metrics FROM runs WHERE flow = 'train_attributes'").to_pylist()
    assert run[0]["status"] == "completed" and json.loads(run[0]["metrics"])["model_id"] == trained["model_id"]


def test_label_stage_equals_direct_forward(trained: dict) -> None:
    ws = trained["data_ws"]
    shard = catalog.query(
        ws, "SELECT sample_id, crop_file, crop_index FROM faces WHERE crop_file LIKE '%part-val-00000%' "
            "ORDER BY crop_index"
    ).to_pylist()
    assert len(shard) > 50
    crops = read_crops(ws, shard[0]["crop_file"], [r["crop_index"] for r in shard])
    ck = load_checkpoint(trained["checkpoint"])
    with torch.inference_mode():
        direct = torch.sigmoid(ck.model(to_input(crops, "cpu", ck.model.config.input_size))).numpy()

    stage = AttributeStage(trained["checkpoint"], batch_size=16)
    assert stage.name == "attributes" and stage.labeller == trained["model_id"]
    batch = [FaceCrop(r["sample_id"], c) for r, c in zip(shard, crops, strict=True)]
    batch.append(FaceCrop("missing-face", None, status=NO_FACE, error="no face found"))
    batch.append(FaceCrop("small-crop", crops[0, :100, :100]))
    rows = stage(batch)
    assert len(rows) == 3 * len(batch)
    got = np.array([[r["value"] for r in rows[3 * i : 3 * i + 3]] for i in range(len(shard))])
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-6)
    for r in rows[: 3 * len(shard)]:
        t = ck.thresholds[r["factor"]]
        assert r["class_index"] == (0 if r["value"] >= t else 1)
        assert r["class_name"] == FACTOR_CLASSES[r["factor"]][r["class_index"]]
        assert r["labeller"] == trained["model_id"] and json.loads(r["thresholds"]) == {"probability": t}
        assert r["status"] == "ok"
    assert [r["factor"] for r in rows[:3]] == list(HEADS)
    no_face, small = rows[-6:-3], rows[-3:]
    assert all(r["status"] == NO_FACE and r["value"] is None and r["error"] == "no face found" for r in no_face)
    assert all(r["status"] == "error" and r["value"] is None and "100x100" in r["error"] for r in small)


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_stage_engines_equal_eager_torch(tmp_path, arch) -> None:
    """The CPU default (frozen TorchScript) and onnxruntime give eager torch's probabilities and classes."""
    cfg = load_config(arch) if arch == "tiny" else AttributeNetConfig(
        name="small_resnet", arch="resnet18", input_size=32, stem_channels=8, blocks=[[8, 1, 1], [16, 1, 2]],
        embedding_dim=16)
    torch.manual_seed(4)
    net = AttributeNet(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics and PReLU slopes, so a wrong fold would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.4)
    ckpt = tmp_path / "net.pt"
    save_checkpoint(ckpt, net, thresholds={"occlusion": 0.3})
    crops = np.random.default_rng(2).integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)
    batch = [FaceCrop(f"c{i}", c) for i, c in enumerate(crops)] + [FaceCrop("none", None, status=NO_FACE)]
    eager = AttributeStage(ckpt, backend="torch")
    want = eager(batch)
    assert AttributeStage(ckpt).backend == "torchscript" and eager.fast is None
    for backend in ("torchscript", "onnx"):
        stage = AttributeStage(ckpt, backend=backend, forward_batch=3)
        assert stage.fast is not None and stage.fast.engine == backend
        got = stage(batch)
        assert [(r["sample_id"], r["factor"], r["status"], r["class_index"]) for r in got] == \
            [(r["sample_id"], r["factor"], r["status"], r["class_index"]) for r in want]
        np.testing.assert_allclose([r["value"] for r in got[:-3]], [r["value"] for r in want[:-3]], rtol=0, atol=1e-6)
        np.testing.assert_allclose(stage.probabilities(crops), eager.probabilities(crops), rtol=0, atol=1e-6)
    assert np.ptp([r["value"] for r in want[:-3]]) > 1e-3  # the crops do not all give one value
    with pytest.raises(ValueError, match="CPU only"):
        AttributeStage(ckpt, device="cuda", backend="onnx")
