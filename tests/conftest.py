"""Shared fixtures: offline environment, a temporary workspace, one Prefect test server per session, and the
helpers several test modules use (real faces, MTCNN, generated catalogs, SQL-escape probes).

Tests never import each other: a helper shared by two modules lives here and reaches them as a fixture. Those
fixtures hand out the (cached) helper function itself, so a test calls it as before, e.g.
`def test_x(real_face): real_face("tom_hanks")`.
"""

from __future__ import annotations

import os
from functools import lru_cache

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Flows run in the test process log warnings only: their INFO lines would queue for servers that module
# fixtures stop, and the harness waits for its log queue at the end. Subprocess runs (the served runs of
# tests/flows/test_deploy.py) log at Prefect's default level, as in production.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from data_manifest import Workspace  # noqa: E402

FLOW_FIXTURES = {"prefect_harness", "prefect_server"}  # a test that needs a Prefect API runs flows


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """Mark `flows` every test that uses a Prefect API, directly or through its fixtures."""
    for item in items:
        if FLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.flows)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for the whole session; flows run against it."""
    from prefect.testing.utilities import prefect_test_harness


    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """A fresh workspace under the test's temporary directory."""
    return Workspace(tmp_path / "ws")


@pytest.fixture
def previous_bundled_sql() -> dict[str, str]:
    """The bundled questions as written before the kept class counts (scans of the views): the peer of
    benchmarks/scale.py, which the catalog tests compare the kept counts' answers with."""
    from benchmarks.scale import PREVIOUS_SQL

    return PREVIOUS_SQL


# ------------------------------------------------------------------ a local S3-compatible server (moto)


@pytest.fixture(scope="session")
def s3_server() -> str:
    """An S3-compatible server on 127.0.0.1 (moto's, from PyPI) for the session; its endpoint URL."""
    import logging
    import socket

    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _make_bucket(endpoint: str, bucket: str) -> None:
    from pyarrow import fs

    s3 = fs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
                         allow_bucket_creation=True)
    s3.create_dir(bucket)


@pytest.fixture
def s3_env(s3_server, tmp_path, monkeypatch):
    """The environment of a client of the test server: endpoint, dummy credentials, a cache under tmp_path;
    returns a function `bucket(name)` that creates a bucket and returns its `s3://` URL."""
    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "FIQA_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    for key in ("FIQA_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)

    def bucket(name: str) -> str:
        _make_bucket(s3_server, name)
        return f"s3://{name}"

    return bucket


@pytest.fixture
def s3_workspace(s3_env, request) -> str:
    """The URL of an empty workspace on the test server: a fresh bucket per test, prefix `ws`."""
    import hashlib

    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    return s3_env(name) + "/ws"


# ------------------------------------------------------------------ real faces (package-shipped) and MTCNN


def _shipped(name: str) -> np.ndarray:
    from models.fit_data.face_sets import shipped_images

    return shipped_images()[name]


REAL_FACES = {name: (lambda name=name: _shipped(name)) for name in ("t1", "tom_hanks", "astronaut")}


@lru_cache(maxsize=1)
def _mtcnn_detector():
    """The MTCNN detector, or a skip naming the command that fetches its weights."""
    from models.weights import MissingWeightsError, mtcnn_paths

    try:
        mtcnn_paths()
    except MissingWeightsError as e:
        pytest.skip(f"MTCNN weights missing: {e}")
    import torch

    torch.set_num_threads(2)
    from models.detectors import MTCNNDetector

    return MTCNNDetector()


@lru_cache(maxsize=8)
def _real_face(name: str) -> np.ndarray:
    """A package-shipped real image by name (read once per test session, read-only)."""
    img = REAL_FACES[name]()
    img.setflags(write=False)
    return img


@lru_cache(maxsize=16)
def _mtcnn_result(name: str, flipped: bool = False):
    """MTCNN's raw result on a real image (optionally flipped left-right), computed once per session."""
    img = _real_face(name)
    return _mtcnn_detector().model.detect(np.ascontiguousarray(img[:, ::-1]) if flipped else img)


@lru_cache(maxsize=1)
def _aligned_build() -> tuple[tuple[str, np.ndarray], ...]:
    dlib = pytest.importorskip("dlib")
    frm = pytest.importorskip("face_recognition_models")
    from models.fit_data.face_sets import shipped_images
    from models.geometry import similarity_transform, warp

    imgs = shipped_images()
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(frm.pose_predictor_model_location())
    out = [("tom_hanks", imgs["tom_hanks"])]  # shipped already aligned
    for name in ("t1", "astronaut"):
        rects = sorted(det(imgs[name], 1), key=lambda r: -r.area())
        # astronaut: the largest box (the other detection is the mission badge); t1: left to right
        rects = rects[:1] if name == "astronaut" else sorted(rects, key=lambda r: r.left())
        for i, r in enumerate(rects):
            p = np.array([[q.x, q.y] for q in sp(imgs[name], r).parts()], dtype=np.float64)
            # 68-point landmarks -> the template's 5 points: eye centres, nose tip, mouth corners
            five = np.array([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
            out.append((f"{name}_{i}", warp(imgs[name], similarity_transform(five))))
    return tuple(out)


def _aligned_identities() -> dict[str, np.ndarray]:
    """name -> aligned crop (dlib HOG detector + 68 landmarks + Umeyama to the ArcFace template)."""
    return {k: v.copy() for k, v in _aligned_build()}


@pytest.fixture(scope="session")
def real_faces() -> dict:
    """name -> loader of a package-shipped real image ("t1", "tom_hanks", "astronaut")."""
    return REAL_FACES


@pytest.fixture(scope="session")
def real_face():
    """real_face(name): a package-shipped real image, cached and read-only."""
    return _real_face


@pytest.fixture(scope="session")
def mtcnn_detector():
    """mtcnn_detector(): the shared MTCNN detector; calling it skips the test when its weights are missing."""
    return _mtcnn_detector


@pytest.fixture(scope="session")
def mtcnn_result():
    """mtcnn_result(name, flipped=False): MTCNN's raw detections on a real image, computed once."""
    return _mtcnn_result


@pytest.fixture(scope="session")
def aligned_identities():
    """aligned_identities(): one ArcFace-aligned 112x112 crop per face that installed packages ship."""
    return _aligned_identities


def _real_labellers() -> object:
    """The default `attributes` stage (occlusion CNN, FER expression, analytic lighting), or a skip naming why."""
    from models.weights import MissingWeightsError
    from pipeline.labellers import registry as L

    try:
        return L.get_stage("attributes", L.LabelOptions())
    except MissingWeightsError as e:
        pytest.skip(f"real-face labeller weights missing: {e}")


@pytest.fixture(scope="session")
def real_labellers():
    """real_labellers(): the default real-face labeller group; calling it skips when their weights are missing."""
    return _real_labellers


# ------------------------------------------------------------------ generated training data and catalogs


def _brightness_faces(n: int, seed: int, size: int = 112) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured crops whose mean brightness b sets the anchor (0.1 + 0.8 b) and the lighting label."""
    from data_manifest.vocabulary import FACTORS

    rng = np.random.default_rng(seed)
    b = rng.uniform(0, 1, n).astype(np.float32)
    texture = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    imgs = np.clip(texture * 0.25 + 20 + b[:, None, None, None] * 190, 0, 255).astype(np.uint8)
    labels = rng.integers(0, 2, (n, len(FACTORS)))
    labels[:, FACTORS.index("blur")] = rng.integers(0, 3, n)
    labels[:, FACTORS.index("pose")] = rng.integers(0, 3, n)
    labels[:, FACTORS.index("lighting")] = (b > 0.3).astype(int)  # dark -> extreme lighting
    return imgs, (0.1 + 0.8 * b).astype(np.float32), labels


def _write_train_catalog(ws, n: int = 40) -> list[str]:
    """samples + faces (packed crops) + factors + anchors for n generated faces, plus one unaligned sample."""
    from data_manifest import ShardWriter, catalog
    from data_manifest.crops import write_pack
    from data_manifest.vocabulary import FACTORS

    imgs, anchors, labels = _brightness_faces(n, seed=3)
    ids = [f"gen-{i:03d}" for i in range(n)]
    rel = write_pack(ws, "align-1", 0, imgs)
    samples = [{"sample_id": s, "dataset": "gen", "source_kind": "list", "source": f"/gen/{s}.png", "status": "ok"}
               for s in [*ids, "gen-noface"]]
    ShardWriter(ws, "samples", "ingest-1").write(0, samples)
    faces = [{"sample_id": s, "crop_file": rel, "crop_index": i, "status": "ok"} for i, s in enumerate(ids)]
    faces.append({"sample_id": "gen-noface", "status": "no_face", "error": "no face detected"})
    ShardWriter(ws, "faces", "align-1").write(0, faces)
    factors = [{"sample_id": s, "factor": f, "class_index": int(labels[i, m]), "labeller": "gen",
                "labeller_version": "1", "status": "ok"}
               for i, s in enumerate(ids) for m, f in enumerate(FACTORS)]
    factors[0] = {**factors[0], "class_index": None, "status": "error", "error": "unreadable"}  # a missing label
    ShardWriter(ws, "factors", "label-1").write(0, factors)
    rows = [{"sample_id": s, "model_id": "gen", "anchor": float(anchors[i]), "status": "ok"}
            for i, s in enumerate(ids)]
    ShardWriter(ws, "anchors", "anchors-1").write(0, rows)
    catalog.refresh(ws)
    return ids


@pytest.fixture(scope="session")
def brightness_faces():
    """brightness_faces(n, seed, size=112) -> (crops, anchors, labels): quality follows mean brightness."""
    return _brightness_faces


@pytest.fixture(scope="session")
def write_train_catalog():
    """write_train_catalog(ws, n=40) -> sample ids: a catalog `fiqa train` and `fiqa score` can run on."""
    return _write_train_catalog


# ------------------------------------------------------------------ snapshots: latest views vs history


def _history_answer(ws: Workspace, view: str) -> list[tuple]:
    """The view computed from the shards alone (no snapshot): every latest view by definition."""
    from data_manifest import catalog

    with catalog.history_connection(ws) as con:
        return sorted(con.execute(f"SELECT * FROM {view}").fetchall(), key=repr)


def _snapshot_answer(ws: Workspace, view: str) -> list[tuple]:
    from data_manifest import catalog

    con = catalog.connect(ws)
    try:
        return sorted(con.execute(f"SELECT * FROM {view}").fetchall(), key=repr)
    finally:
        con.close()


def _assert_views_match_history(ws: Workspace) -> dict:
    """Every latest view through catalog.connect equals the history window; returns the snapshot states used."""
    import duckdb

    from data_manifest import snapshots
    from data_manifest.schemas import TABLES

    for view in (*TABLES, "labels", *snapshots.COUNTS):
        got, want = _snapshot_answer(ws, view), _history_answer(ws, view)
        assert got == want, f"{view}: {len(got)} rows from the snapshot, {len(want)} from the history"
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        return snapshots.table_states(ws, con)


@pytest.fixture(scope="session")
def assert_views_match_history():
    """assert_views_match_history(ws) -> {table: TableState}: every latest view equals the history window."""
    return _assert_views_match_history


# ------------------------------------------------------------------ SQL escape probes


@pytest.fixture(scope="session")
def file_hashes():
    """file_hashes(*roots) -> {path: sha256 or link target}: to show a refused statement changed nothing."""
    from benchmarks.sql_fuzz import file_hashes

    return file_hashes


@pytest.fixture
def hostile(tmp_path):
    """(workspace, outside folder, shard): 34 samples, a secret outside, a symlink out, a file above the link."""
    from benchmarks.sql_fuzz import workspace_beside_outside

    (tmp_path / "top.txt").write_text("above the link\n")
    return workspace_beside_outside(tmp_path, 34)


@pytest.fixture(scope="session")
def where_injection():
    """where_injection(stmt): a `--where` value that tries to close the filter and run stmt."""
    return lambda stmt: f"true); {stmt}; SELECT * FROM labels WHERE (true"


@pytest.fixture(scope="session")
def query_injection():
    """query_injection(stmt): a `--query` value that tries to close the subquery and run stmt."""
    return lambda stmt: f"SELECT * FROM labels) AS t; {stmt}; SELECT * FROM (SELECT * FROM labels"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An untrained tiny CLIB-FIQA checkpoint (scores are deterministic, which is all these tests need)."""
    import torch

    from models.clib import ClibConfig, ClibFiqa
    from models.train import CHECKPOINT_FORMAT, save_checkpoint

    torch.manual_seed(0)
    cfg = ClibConfig(model_name="TinyRN-test", pretrained=None)
    model = ClibFiqa.from_config(cfg, load_pretrained=False)
    with torch.no_grad():  # away from the symmetric init, so every crop gets its own score
        for param in [*model.parameters(), model.text_features]:
            param.add_(0.3 * torch.randn_like(param))
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model_config": cfg.to_dict(),
                           "model": model.state_for_checkpoint()})
    return str(path)
