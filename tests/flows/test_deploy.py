"""Scheduled deployments against a real local Prefect server: serve + trigger (twice, incremental) and register."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifest import Workspace, catalog
from flows import deploy, scheduled
from flows.label import LabelRunOptions
from pipeline import deployments as D

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0
DATASET = "watched"
# Cheap labelling for the test: inputs are already-aligned 112x112 crops, so no detector model runs.
LABEL_OPTIONS = {"detector": "none", "align_mode": "already_aligned"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Kill the whole process group (the server and runners spawn children), then reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    else:  # the leader exited: make sure no child of its group survives
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            value = check()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; the process group dies after."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    env = {**_prefect_env(home, None), "PREFECT_SERVER_UI_ENABLED": "false"}
    proc = _start([*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        def healthy() -> bool:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as r:
                return r.status == 200

        _wait_for(healthy, "prefect server", proc, log)
        yield {"api_url": api_url, "home": home}
        from prefect.logging.handlers import APILogWorker

        with _api(api_url):  # send this process's queued log lines while their server is up
            APILogWorker.drain_all(timeout=30)
    finally:
        _stop(proc)


@contextlib.contextmanager
def _api(url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _write_face(path: Path, seed: int) -> None:
    """A 112x112 smooth random texture (an 'already aligned' input) with a sharp edge, saved as PNG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((112, 112), Image.BICUBIC)).copy()
    img[40:72, 40:72] = 255 - img[40:72, 40:72]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _run_logs(api_url: str, parent_id) -> list[str]:
    """Every log line the API keeps for a flow run and its sub-flow runs (polled: the handler sends in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        with _api(api_url), get_client(sync_client=True) as c:
            children = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
            ids = [parent_id, *(r.id for r in children)]
            lines = [log.message for log in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                                        limit=200)]
        if any("completed: counts" in line for line in lines) and any("new sample(s)" in line for line in lines):
            return lines
        time.sleep(1.0)
    return lines


def _run(api_url: str, name: str):
    from prefect.deployments import run_deployment

    with _api(api_url):
        return run_deployment(name, timeout=TIMEOUT, poll_interval=1)


@pytest.mark.slow
def test_serve_refresh_incremental(prefect_server, tmp_path):
    data = tmp_path / "data"
    for i, (ident, stem) in enumerate([("alice", "a0"), ("alice", "a1"), ("bob", "b0")]):
        _write_face(data / ident / f"{stem}.png", i)
    ws = Workspace(tmp_path / "ws")
    api_url = prefect_server["api_url"]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "serve", "--dataset-path", str(data), "--dataset", DATASET,
           "--workspace", str(ws.root), "--name", "served", "--cron", "0 3 * * *", "--steps", "ingest,label",
           "--label-stages", "align,blur", "--label-options", json.dumps(LABEL_OPTIONS)]
    proc = _start(cmd, _prefect_env(prefect_server["home"], api_url), log)
    try:
        from prefect.client.orchestration import get_client

        def registered():
            with _api(api_url), get_client(sync_client=True) as c:
                return c.read_deployment_by_name("refresh-dataset/served")

        dep = _wait_for(registered, "served deployment", proc, log)
        assert dep.parameters["dataset"] == DATASET and dep.parameters["steps"] == ["ingest", "label"]
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]

        run = _run(api_url, "refresh-dataset/served")
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
        # the served run logs what `fiqa` prints: shards, counts, the closing summary of each sub-flow
        lines = _run_logs(api_url, run.id)
        assert sum(line.startswith("shard 00000 of run ") and " committed: " in line for line in lines) >= 2, lines
        assert sum(line.startswith(("ingest run ", "label run ")) and " completed: counts " in line
                   for line in lines) == 2, lines
        assert f"{DATASET}: 3 new sample(s) labelled" in lines, lines
        rows = catalog.query(ws, "SELECT sample_id, dataset FROM samples ORDER BY sample_id").to_pylist()
        assert len(rows) == 3 and {r["dataset"] for r in rows} == {DATASET}
        first = [r["sample_id"] for r in rows]
        faces = catalog.query(ws, "SELECT sample_id, status FROM faces_history ORDER BY sample_id").to_pylist()
        assert [f["sample_id"] for f in faces] == first and {f["status"] for f in faces} == {"ok"}

        _write_face(data / "bob" / "b1.png", 99)  # a new file arrives in the watched folder
        run = _run(api_url, "refresh-dataset/served")
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
        samples = catalog.query(ws, "SELECT sample_id, identity_name FROM samples ORDER BY sample_id").to_pylist()
        assert len(samples) == 4
        (new,) = [s["sample_id"] for s in samples if s["sample_id"] not in first]
        assert {s["identity_name"] for s in samples if s["sample_id"] == new} == {"bob"}
        per_run = catalog.query(ws, "SELECT run_id, list(sample_id ORDER BY sample_id) AS ids FROM faces_history "
                                    "GROUP BY run_id ORDER BY min(created_at)").to_pylist()
        assert [r["ids"] for r in per_run] == [first, [new]]  # the second label run touched the new sample only
        blur = catalog.query(ws, "SELECT sample_id, count(*) AS n FROM factors_history WHERE factor = 'blur' "
                                 "GROUP BY sample_id ORDER BY sample_id").to_pylist()
        assert [(b["sample_id"], b["n"]) for b in blur] == [(s["sample_id"], 1) for s in samples]
        flows_run = catalog.query(ws, "SELECT flow, count(*) AS n FROM runs WHERE status = 'completed' "
                                      "GROUP BY flow ORDER BY flow").to_pylist()
        assert flows_run == [{"flow": "ingest", "n": 2}, {"flow": "label", "n": 2}]

        before = {r["sample_id"]: r["identity"] for r in catalog.query(ws, "SELECT sample_id, identity FROM samples")
                  .to_pylist()}
        _write_face(data / "aaron" / "x0.png", 7)  # a new identity folder that sorts before every other
        run = _run(api_url, "refresh-dataset/served")
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
        after = {r["sample_id"]: (r["identity"], r["identity_name"]) for r in catalog.query(
            ws, "SELECT sample_id, identity, identity_name FROM samples").to_pylist()}
        assert {k: after[k][0] for k in before} == before  # every existing sample keeps its identity number
        (added,) = [v for k, v in after.items() if k not in before]
        assert added == (max(before.values()) + 1, "aaron")  # the new folder gets the next number
    finally:
        _stop(proc)


@pytest.mark.slow
def test_refresh_recomputes_anchors_for_all(prefect_server, tmp_path):
    data = tmp_path / "data"
    for i, (ident, stem) in enumerate([("alice", "a0"), ("alice", "a1"), ("bob", "b0")]):
        _write_face(data / ident / f"{stem}.png", i)
    kwargs = {"dataset_path": str(data), "dataset": DATASET, "workspace": str(tmp_path / "ws"),
              "label_stages": ["align", "blur"], "label_options": LABEL_OPTIONS, "fr_model": "dlib", "device": "cpu"}
    ws = Workspace(tmp_path / "ws")
    with _api(prefect_server["api_url"]):
        first = scheduled.refresh_dataset(**kwargs)
        _write_face(data / "bob" / "b1.png", 99)
        second = scheduled.refresh_dataset(**kwargs)
        third = scheduled.refresh_dataset(**kwargs)  # nothing new: neither labels nor anchors run
    assert (first["new_samples"], second["new_samples"], third["new_samples"]) == (3, 1, 0)
    assert (first["label"]["selected"], second["label"]["selected"]) == (3, 1)
    assert (first["anchors"]["selected"], second["anchors"]["selected"]) == (3, 4)
    assert "label" not in third and "anchors" not in third and third["samples_without_anchors"] == 0
    ids = catalog.query(ws, "SELECT sample_id FROM samples ORDER BY sample_id").column("sample_id").to_pylist()
    # anchors depend on every sample (centers, min/max): the second run recomputed them for all four
    per_run = catalog.query(ws, "SELECT run_id, list(sample_id ORDER BY sample_id) AS ids FROM anchors_history "
                                "GROUP BY run_id ORDER BY min(created_at)").to_pylist()
    assert [len(r["ids"]) for r in per_run] == [3, 4] and per_run[1]["ids"] == ids
    latest = catalog.query(ws, "SELECT run_id, status, anchor FROM anchors").to_pylist()
    assert {r["run_id"] for r in latest} == {second["anchors"]["run_id"]} and {r["status"] for r in latest} == {"ok"}
    assert min(r["anchor"] for r in latest) == 0.0 and max(r["anchor"] for r in latest) == 1.0


@pytest.mark.slow
def test_train_and_score_tags_gpu_work(prefect_server, workspace, write_train_catalog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    ids = write_train_catalog(workspace, n=24)
    config = {"stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 12, "lr": 1e-3, "num_workers": 0}
    with _api(prefect_server["api_url"]):
        out = scheduled.train_and_score(workspace=str(workspace.root), model="clib-tiny", train_config=config,
                                        device="cpu")
        with get_client(sync_client=True) as c:
            tagged = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[D.GPU_TAG])))
            names = {c.read_flow(r.flow_id).name for r in tagged if r.state.is_completed()}
    assert Path(out["train"]["checkpoint"]).is_file()
    assert out["score"]["selected"] == len(ids) + 1  # every sample, the faceless one included
    scores = catalog.query(workspace, "SELECT run_id, status, quality FROM scores "
                                      "WHERE method = 'clib-fiqa'").to_pylist()
    assert len(scores) == len(ids) + 1 and {r["run_id"] for r in scores} == {out["score"]["run_id"]}
    assert sum(r["status"] == "ok" and 0.1 <= r["quality"] <= 0.9 for r in scores) == len(ids)
    assert {"train", "score"} <= names  # both sub-flows ran under the `gpu` tag


def _fiqa(api_url: str, argv: list[str]) -> int:
    """`fiqa ARGV` in this process against the test server."""
    from flows.cli import main

    with _api(api_url):
        return main(argv)


def test_register_creates_pool_deployments(prefect_server, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    data = tmp_path / "data"
    _write_face(data / "carol" / "c0.png", 7)
    api_url = prefect_server["api_url"]
    rc = _fiqa(api_url, ["deploy", "register", "--dataset-path", str(data), "--dataset", "reg", "--workspace",
                         str(tmp_path / "ws"), "--cpu-pool", "t-cpu", "--gpu-pool", "t-gpu", "--cron", "*/15 * * * *",
                         "--train-cron", "0 4 * * 0", "--create-pools"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "registered refresh-dataset/refresh-reg, train-and-score/train-and-score-reg" in out.out
    assert "prefect worker start --pool t-cpu" in out.out and "prefect worker start --pool t-gpu" in out.out
    with _api(api_url), get_client(sync_client=True) as c:
        cpu, gpu = c.read_work_pool("t-cpu"), c.read_work_pool("t-gpu")
        assert (cpu.type, cpu.concurrency_limit) == ("process", None)
        assert (gpu.type, gpu.concurrency_limit) == ("process", 1)
        assert c.read_concurrency_limit_by_tag(D.GPU_TAG).concurrency_limit == 1
        refresh = c.read_deployment_by_name("refresh-dataset/refresh-reg")
        train = c.read_deployment_by_name("train-and-score/train-and-score-reg")
    assert refresh.work_pool_name == "t-cpu" and train.work_pool_name == "t-gpu"
    assert refresh.entrypoint == D.REFRESH_ENTRYPOINT and train.entrypoint == D.TRAIN_ENTRYPOINT
    assert [(s.schedule.cron, s.schedule.timezone) for s in refresh.schedules] == [("*/15 * * * *", "UTC")]
    assert "route:register" in refresh.tags and "route:register" in train.tags
    assert [s.schedule.cron for s in train.schedules] == ["0 4 * * 0"]
    assert refresh.parameters["dataset_path"] == str(data.resolve()) and refresh.parameters["dataset"] == "reg"
    assert refresh.parameters["workspace"] == str((tmp_path / "ws").resolve())
    assert train.parameters["device"] == "cuda" and D.GPU_TAG in train.tags
    # a pull step brings the worker into the project checkout
    assert json.dumps(refresh.pull_steps).count(str(ROOT)) == 1


def test_register_refuses_missing_pool(prefect_server, tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    rc = _fiqa(prefect_server["api_url"], ["deploy", "register", "--dataset-path", str(data), "--dataset", "x",
                                           "--cpu-pool", "absent-pool", "--no-train"])
    assert rc == 2
    assert "prefect work-pool create absent-pool --type process" in capsys.readouterr().err
    rc = _fiqa(prefect_server["api_url"], ["deploy", "register", "--dataset-path", str(data), "--dataset", "x",
                                           "--cpu-pool", "absent-pool", "--gpu-pool", "absent-gpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "prefect work-pool set-concurrency-limit absent-gpu 1" in err
    assert "prefect concurrency-limit create gpu 1" in err
    # a bad configuration fails at registration, not at the first scheduled run, with the label flow's message
    label_message = {}
    for option, value in (("detector", "bogus"), ("pose_backend", "nope")):
        with pytest.raises(ValueError) as e:
            LabelRunOptions(stages=("align", "pose"), options={option: value}).check()
        label_message[option] = str(e.value)
    assert "unknown detector 'bogus'" in label_message["detector"]
    assert "unknown pose backend 'nope'" in label_message["pose_backend"]
    base = ["deploy", "register", "--dataset-path", str(data), "--dataset", "x", "--no-train"]
    relabel = ["deploy", "register", "--relabel", "r", "--cpu-pool", "absent-pool"]
    for argv, message in (
            (base + ["--label-stages", "blur"], "must include 'align'"),
            (base + ["--label-options", '{"detectr": "mtcnn"}'], "unknown label option(s) ['detectr']"),
            (base + ["--label-options", '{"detector": "bogus"}'], label_message["detector"]),
            (base + ["--label-stages", "align,pose", "--label-options", '{"detector": "none", "align_mode": '
                     '"already_aligned", "pose_backend": "nope"}'], label_message["pose_backend"]),
            (base + ["--steps", "ingest,train"], "unknown or no refresh steps"),
            (base + ["--runner", "threads", "--address", "tcp://x:1"], "--address names a Dask cluster"),
            (base + ["--steps", "anchors", "--fr-model", "nope"], "nope"),
            (relabel, "--relabel NAME needs --where"),
            (relabel + ["--where", "1 = 1", "--stages", "blur,bogus"], "unknown stage(s) ['bogus']"),
            (relabel + ["--where", "1 = 1", "--stages", "pose", "--label-options", '{"pose_backend": "nope"}'],
             label_message["pose_backend"]),
            (relabel + ["--where", "1 = 1) OR (SELECT count(*) FROM json_execute_serialized_sql('x')) > 0 OR (1 = 1"],
             "refused: table function"),
            (relabel + ["--where", "1 = 1", "--shard-size", "0"], "--shard-size must be >= 1")):
        assert _fiqa(prefect_server["api_url"], argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_relabel_deployment_runs_with_its_typed_parameters(prefect_server, tmp_path, capsys):
    """`fiqa deploy register --relabel`: flat typed parameters, checked; its parameters run the flow to COMPLETED."""
    from prefect.client.orchestration import get_client

    data, ws = tmp_path / "data", Workspace(tmp_path / "ws")
    for i, (ident, stem) in enumerate([("alice", "a0"), ("alice", "a1"), ("bob", "b0")]):
        _write_face(data / ident / f"{stem}.png", i)
    api_url = prefect_server["api_url"]
    with _api(api_url):
        scheduled.refresh_dataset(dataset_path=str(data), dataset=DATASET, workspace=str(ws.root), steps=["ingest",
                                  "label"], label_stages=["align", "blur"], label_options=LABEL_OPTIONS)
    where = "sample_id IN (SELECT sample_id FROM samples WHERE identity_name = 'alice')"
    rc = _fiqa(api_url, ["deploy", "register", "--relabel", "alice-blur", "--where", where, "--stages", "blur",
                         "--workspace", str(ws.root), "--cpu-pool", "t-relabel", "--create-pools",
                         "--label-options", '{"blur_thresholds": [0.2, 0.9]}', "--shard-size", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "registered relabel-subset/relabel-alice-blur" in out.out
    with _api(api_url), get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name("relabel-subset/relabel-alice-blur")
    assert dep.entrypoint == D.RELABEL_ENTRYPOINT and dep.work_pool_name == "t-relabel" and dep.schedules == []
    assert dep.parameters == {"where": where, "stages": ["blur"], "workspace": str(ws.root.resolve()),
                              "shard_size": 1, "runner": "threads", "blur_thresholds": [0.2, 0.9]}
    schema = dep.parameter_openapi_schema["properties"]  # typed, flat parameters the UI shows
    assert {"where", "stages", "shard_size", "detector", "pose_backend", "blur_thresholds", "runner"} <= set(schema)
    assert schema["where"]["type"] == "string" and schema["stages"]["anyOf"][0]["type"] == "array"
    with _api(api_url):
        out = scheduled.relabel_subset(**dep.parameters)
    alice = catalog.query(ws, "SELECT sample_id FROM samples WHERE identity_name = 'alice' "
                              "ORDER BY sample_id").column("sample_id").to_pylist()
    assert out["selected"] == 2
    rows = catalog.query(ws, "SELECT f.sample_id, f.run_id, f.thresholds, r.flow FROM factors_history f "
                             "JOIN runs r USING (run_id) WHERE factor = 'blur' ORDER BY f.created_at").to_pylist()
    relabelled = [r for r in rows if r["run_id"] == out["run_id"]]
    assert sorted(r["sample_id"] for r in relabelled) == alice and {r["flow"] for r in relabelled} == {"relabel"}
    assert all(json.loads(r["thresholds"]) == {"hazy_below": 0.2, "clear_above": 0.9} for r in relabelled)
    assert len(rows) == 3 + 2  # the first label run's rows stay in the history
    status = catalog.query(ws, f"SELECT status FROM runs WHERE run_id = '{out['run_id']}'").column("status")
    assert status.to_pylist() == ["completed"]


def test_a_deployment_of_another_route_is_not_taken_over(prefect_server, tmp_path, capsys):
    data = tmp_path / "data"
    _write_face(data / "dave" / "d0.png", 3)
    common = ["--dataset-path", str(data), "--dataset", "owned", "--workspace", str(tmp_path / "ws"), "--steps",
              "ingest"]
    api_url = prefect_server["api_url"]
    assert _fiqa(api_url, ["deploy", "register", *common, "--cpu-pool", "own-cpu", "--no-train",
                           "--create-pools"]) == 0
    capsys.readouterr()
    assert _fiqa(api_url, ["deploy", "serve", *common]) == 2  # refused before serving anything
    assert "refresh-dataset/refresh-owned exists and was created by register" in capsys.readouterr().err
    assert _fiqa(api_url, ["deploy", "register", *common, "--cpu-pool", "own-cpu-2", "--no-train",
                           "--create-pools"]) == 2
    assert "on work pool own-cpu, not own-cpu-2" in capsys.readouterr().err
    assert _fiqa(api_url, ["deploy", "register", *common, "--cpu-pool", "own-cpu", "--no-train"]) == 0


@pytest.mark.slow
def test_prefect_yaml_deploys(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    api_url = prefect_server["api_url"]
    with _api(api_url):
        deploy.pools([D.DEFAULT_CPU_POOL, D.DEFAULT_GPU_POOL], D.DEFAULT_CPU_POOL, D.DEFAULT_GPU_POOL, create=True)
    env = {**_prefect_env(prefect_server["home"], api_url), "FIQA_PROJECT_ROOT": str(ROOT),
           "FIQA_WATCH_PATH": str(tmp_path / "incoming"), "FIQA_WATCH_DATASET": "incoming",
           "FIQA_WORKSPACE": str(tmp_path / "ws")}
    out = subprocess.run([*_prefect_cli(), "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True)
    assert out.returncode == 0, out.stdout + out.stderr
    with _api(api_url), get_client(sync_client=True) as c:
        refresh = c.read_deployment_by_name("refresh-dataset/refresh-incoming-yaml")
        train = c.read_deployment_by_name("train-and-score/train-and-score-incoming-yaml")
    assert (refresh.work_pool_name, train.work_pool_name) == (D.DEFAULT_CPU_POOL, D.DEFAULT_GPU_POOL)
    assert "route:yaml" in refresh.tags and "route:yaml" in train.tags
    assert refresh.parameters["dataset"] == "incoming" and refresh.parameters["workspace"] == str(tmp_path / "ws")
    assert [s.schedule.cron for s in refresh.schedules] == ["0 * * * *"]
    assert [s.schedule.cron for s in train.schedules] == ["0 3 * * 0"]
    assert train.parameters == {"workspace": str(tmp_path / "ws"), "model": "clib-rn50", "device": "cuda"}
    assert json.dumps(refresh.pull_steps).count(str(ROOT)) == 1


def _flow_run_state(api_url: str, run_id) -> tuple[str, str, object]:
    from prefect.client.orchestration import get_client

    with _api(api_url), get_client(sync_client=True) as c:
        run = c.read_flow_run(run_id)
    return run.state_type.value, run.state_name, run


def _markers(ws: Workspace, run_id: str) -> dict[str, str]:
    """The run's shard commit records, by file name, as written."""
    return {p.name: p.read_text() for p in sorted((ws.runs_dir / run_id / "shards").glob("*.json"))}


@pytest.mark.slow
def test_a_restarted_serve_ends_the_dead_run_and_resumes_its_committed_shards(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment

    from data_manifest import runs

    n, shard = 60, 2
    data = tmp_path / "data"
    for i in range(n):
        _write_face(data / f"id{i % 5}" / f"s{i:02d}.png", 1000 + i)
    ws, api_url, name = Workspace(tmp_path / "ws"), prefect_server["api_url"], "refresh-dataset/crashy"
    env = {**_prefect_env(prefect_server["home"], api_url), "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5"}
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "serve", "--dataset-path", str(data), "--dataset", DATASET,
           "--workspace", str(ws.root), "--name", "crashy", "--cron", "0 3 * * *", "--steps", "ingest,label",
           "--label-stages", "align,blur", "--label-options", json.dumps(LABEL_OPTIONS), "--shard-size", str(shard),
           "--workers", "1"]
    log1, log2 = tmp_path / "serve1.log", tmp_path / "serve2.log"
    proc = _start(cmd, env, log1)
    try:
        def registered():
            with _api(api_url), get_client(sync_client=True) as c:
                return c.read_deployment_by_name(name)

        _wait_for(registered, "served deployment", proc, log1)
        with _api(api_url):
            first = run_deployment(name, timeout=0)
        deadline, label_rid = time.monotonic() + TIMEOUT, None
        while not label_rid and time.monotonic() < deadline:  # labelling takes well under a second: poll tightly
            found = [p.name for p in ws.runs_dir.glob("label-*") if (p / "shards").is_dir()] if ws.runs_dir.is_dir() \
                else []
            label_rid = found[0] if found and _markers(ws, found[0]) else None
            time.sleep(0.001)
        assert label_rid, log1.read_text()[-3000:]
        child = runs.lock_holder(ws, label_rid)["pid"]
        os.kill(child, signal.SIGSTOP)  # frozen mid-label: it can neither commit nor report anything
        committed = _markers(ws, label_rid)
        assert 0 < len(committed) < n // shard, committed
        _, _, running = _flow_run_state(api_url, first.id)
        assert (running.state_type.value, running.infrastructure_pid) == ("RUNNING", f"{socket.gethostname()}:{child}")

        with _api(api_url):  # a second trigger waits for the slot, and says which run holds it
            waiting = run_deployment(name, timeout=0)
        why = (f"flow run {waiting.name} ({waiting.id}) waits for a slot of deployment crashy (concurrency limit 1),"
               f" held by flow run {first.name} ({first.id}), RUNNING since ")
        _wait_for(lambda: why in log1.read_text(), "slot-wait line", proc, log1, timeout=20)
        assert _flow_run_state(api_url, waiting.id)[1] == "AwaitingConcurrencySlot"
        with _api(api_url), get_client(sync_client=True) as c:
            _wait_for(lambda: [g.message for g in c.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[waiting.id]))) if g.message.startswith(why)], "its log line",
                proc, log1, timeout=10)
            c.delete_flow_run(waiting.id)
            subs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first.id])))
            lines = [g.message for g in c.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[first.id, *(r.id for r in subs)])), limit=200)]
        # The dead run has log lines on the server; which ones depends on the handler's last batch before it froze.
        assert any(line.startswith("Beginning flow run") for line in lines), lines

        os.kill(proc.pid, signal.SIGKILL)  # serve and its run die together
        os.kill(child, signal.SIGKILL)
        proc.wait(timeout=15)
        assert _markers(ws, label_rid) == committed
        assert _flow_run_state(api_url, first.id)[0] == "RUNNING"  # nobody told the server
        assert runs.run_info(ws, label_rid).get("status") is None  # nor the workspace

        proc = _start(cmd, env, log2)  # the restarted serve
        _wait_for(lambda: "serving " in log2.read_text(), "restarted serve", proc, log2)
        text = log2.read_text()
        assert f"workspace run {label_rid} was running in a process that died: recorded as crashed" in text, text
        assert f"the process of flow run {first.name} ({first.id}; " in text, text
        state, _, crashed = _flow_run_state(api_url, first.id)
        assert state == "CRASHED" and "is gone: marked Crashed by a restarted serve or worker" in crashed.state.message
        with _api(api_url), get_client(sync_client=True) as c:
            subs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first.id])))
            assert sorted(r.state_type.value for r in subs) == ["COMPLETED", "CRASHED"]  # ingest done, label dead
            assert c.read_deployment_by_name(name).global_concurrency_limit.active_slots == 0  # slot released
        assert runs.run_info(ws, label_rid)["status"] == "crashed"

        t0 = time.monotonic()
        with _api(api_url):
            second = run_deployment(name, timeout=0)
        _wait_for(lambda: _flow_run_state(api_url, second.id)[0] != "SCHEDULED", "second run", proc, log2, timeout=30)
        assert time.monotonic() - t0 < 30
        _wait_for(lambda: _flow_run_state(api_url, second.id)[0] in ("COMPLETED", "FAILED", "CRASHED"),
                  "second run end", proc, log2)
        assert _flow_run_state(api_url, second.id)[0] == "COMPLETED", log2.read_text()[-3000:]
        lines = _run_logs(api_url, second.id)
        assert f"{DATASET}: resuming crashed label run {label_rid}" in lines, lines
        assert any(line.startswith(f"{DATASET}: ingest run ingest-") and f" read {n} record(s)" in line
                   for line in lines), lines  # what fiqa prints reaches the run's logs
        assert sum(line.startswith("shard ") and " committed: " in line for line in lines) >= 1, lines
        after = _markers(ws, label_rid)
        assert len(after) == n // shard and {k: after[k] for k in committed} == committed  # not relabelled
        statuses = catalog.query(ws, f"SELECT status FROM runs_history WHERE run_id = '{label_rid}' "
                                     "ORDER BY created_at").column("status").to_pylist()
        assert statuses == ["running", "crashed", "running", "completed"]
        ids = catalog.query(ws, "SELECT sample_id FROM samples").column("sample_id").to_pylist()
        for table, cond in (("faces_history", "TRUE"), ("factors_history", "factor = 'blur'")):
            rows = catalog.query(ws, f"SELECT sample_id, count(*) AS n, min(run_id) AS r FROM {table} WHERE {cond} "
                                     "GROUP BY sample_id").to_pylist()
            assert sorted(r["sample_id"] for r in rows) == sorted(ids) and len(ids) == n
            assert {(r["n"], r["r"]) for r in rows} == {(1, label_rid)}  # every sample once, by the resumed run
    finally:
        _stop(proc)


def _registered_with_runs(api_url: str, tmp_path: Path, dataset: str, pids: list[int]) -> tuple[Workspace, list]:
    """A refresh deployment of `dataset` registered on pool `<dataset>-cpu`, and one Running flow run of it per pid
    (its recorded process `host:pid`); returns the workspace and the runs."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from pipeline import recovery as R

    data, ws = tmp_path / "data", Workspace(tmp_path / "ws")
    _write_face(data / "p" / "0.png", 3)
    assert _fiqa(api_url, ["deploy", "register", "--dataset-path", str(data), "--dataset", dataset, "--workspace",
                           str(ws.root), "--cpu-pool", f"{dataset}-cpu", "--no-train", "--create-pools"]) == 0
    found = []
    with _api(api_url), get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name(f"refresh-dataset/{D.deployment_name('refresh', dataset)}")
        for pid in pids:
            run = c.create_flow_run_from_deployment(dep.id)
            c.set_flow_run_state(run.id, Running(), force=True)
            c.update_flow_run(run.id, infrastructure_pid=R.process_key(pid))
            found.append(run)
    return ws, found


def _gone_pid() -> int:
    """The pid of a finished process: it names no running process."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_recover_ends_a_dead_worker_run_and_its_workspace_run(prefect_server, tmp_path, capsys):
    """`fiqa deploy recover`: a Running run of a registered deployment whose process (a worker's child) is gone
    ends Crashed, and its workspace's dead run is recorded crashed; a run whose process lives is left alone."""
    from data_manifest import runs
    from pipeline import recovery as R

    api_url, gone = prefect_server["api_url"], _gone_pid()
    ws, (dead, live) = _registered_with_runs(api_url, tmp_path, "rec", [gone, os.getpid()])
    dead_rid = runs.start_run(ws, "label", {"stages": ["align"]})  # recorded running, its lock held by nobody
    capsys.readouterr()
    assert _fiqa(api_url, ["deploy", "recover"]) == 0
    out = capsys.readouterr().out
    assert f"({dead.id}; {R.process_key(gone)}) is gone: marked Crashed" in out
    assert str(live.id) not in out and "refresh-rec" in out
    assert _flow_run_state(api_url, dead.id)[0] == "CRASHED"
    assert _flow_run_state(api_url, live.id)[0] == "RUNNING"
    assert f"workspace run {dead_rid} was running in a process that died" in out
    assert runs.run_info(ws, dead_rid) is not None and not runs.is_running(runs.run_info(ws, dead_rid))


@pytest.mark.slow
def test_deploy_worker_ends_a_dead_run_first_then_serves_the_pool(prefect_server, tmp_path):
    """`fiqa deploy worker --pool P`: the runs a killed worker left are ended Crashed before its `prefect worker`
    starts polling P; SIGTERM stops the worker it started."""
    from prefect.client.orchestration import get_client

    api_url = prefect_server["api_url"]
    _, (dead,) = _registered_with_runs(api_url, tmp_path, "wrk", [_gone_pid()])
    log = tmp_path / "worker.log"
    proc = _start([sys.executable, "-m", "flows.cli", "deploy", "worker", "--pool", "wrk-cpu"],
                  _prefect_env(prefect_server["home"], api_url), log)
    try:
        _wait_for(lambda: "marked Crashed" in log.read_text(), "dead run ended", proc, log)
        assert _flow_run_state(api_url, dead.id)[0] == "CRASHED"

        def online() -> bool:
            with _api(api_url), get_client(sync_client=True) as c:
                return any(w.status.value == "ONLINE" for w in c.read_workers_for_work_pool("wrk-cpu"))

        _wait_for(online, "the worker polls its pool", proc, log)
        os.kill(proc.pid, signal.SIGTERM)  # the fiqa process only: it stops the worker it started
        proc.wait(timeout=60)
        time.sleep(1.0)
        children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children == [], log.read_text()[-2000:]
    finally:
        _stop(proc)
