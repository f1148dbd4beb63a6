"""A real Dask cluster on 127.0.0.1: a scheduler and two worker processes started here, working elsewhere.

The refresh and relabel deployments' flows and score on a shared disk, and ingest -> label -> anchors -> score
through `fiqa ... --runner dask --address` with the workspace on the local S3 server (the workers given its
endpoint and credentials in their environment, each with a cache of its own), equal a local run row for row,
every sharded step (anchors' centres and search included) done by the workers; the workers report to the flow's
Prefect API instead of starting servers of their own; a worker killed mid-label (S3) loses and duplicates
nothing; a scheduler without workers ends the run after $FIQA_CLUSTER_TIMEOUT, and a worker that does not see
the workspace fails it naming itself (both resume on a working cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_manifest import Workspace, catalog

pytestmark = [pytest.mark.flows, pytest.mark.slow]
distributed = pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
LABEL = ["--stages", "align,blur", "--detector", "mtcnn"]
ANCHORS = ["--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # no API: the CLI's own server
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


class Cluster:
    """`dask scheduler` and `dask worker` processes (with nannies), each in its own session."""

    def __init__(self, root: Path, workers: int, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        """`env`: the workers' extra environment ("{n}" in a value: the process's number); `prefix`: their
        command's."""
        self.root, self.procs, self.env, self.prefix = root, [], env or {}, prefix
        root.mkdir(parents=True)
        sched = root / "scheduler.json"
        self._start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched)])
        deadline = time.time() + 60
        while not sched.exists() and time.time() < deadline:
            time.sleep(0.1)
        self.address = json.loads(sched.read_text())["address"]
        for _ in range(workers):
            self.add_worker(prefix)
        self.client = distributed.Client(self.address, timeout=60)
        self.client.wait_for_workers(workers, timeout=120)

    def _start(self, args: list[str], prefix: tuple[str, ...] = ()) -> None:
        cwd = self.root / "elsewhere"  # workers do not run in the checkout
        cwd.mkdir(exist_ok=True)
        log = open(self.root / f"proc-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        env = _env(**{k: v.format(n=len(self.procs)) for k, v in self.env.items()})
        self.procs.append(subprocess.Popen([*prefix, sys.executable, "-m", *args], cwd=cwd, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def add_worker(self, prefix: tuple[str, ...] = ()) -> None:
        self._start(["distributed.cli.dask_worker", self.address, "--nworkers", "1", "--nthreads", "1",
                     "--no-dashboard"], prefix)

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask") / "cluster", workers=2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def s3_cluster(tmp_path_factory, s3_server):
    """A cluster whose workers reach the S3 server as a user's would: endpoint and credentials in their
    environment, each with a workspace cache of its own. `client` is a folder for the client's cache and files
    that the workers cannot see (an empty file system over it, where mount namespaces are allowed), as on
    another machine."""
    root, client = tmp_path_factory.mktemp("dask_s3") / "cluster", tmp_path_factory.mktemp("client")
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "FIQA_CACHE": str(root / "cache-{n}")}
    hide = subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    c = Cluster(root, workers=2, env=env, prefix=("unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{client}" && '
                                                 'exec "$0" "$@"') if hide else ())
    c.client_dir = client
    yield c
    c.close()


@pytest.fixture(scope="module")
def faces_folder(tmp_path_factory, mtcnn_detector) -> Path:
    """Two identities at two blur levels, plus three broken files (7 samples)."""
    import cv2

    from models.fit_data.face_sets import shipped_images
    from pipeline.synthetic.demo_data import build

    mtcnn_detector()  # skips with a reason when the MTCNN weights are not fetched
    imgs = shipped_images()
    faces = {"astronaut": imgs["astronaut"][30:260, 120:350].copy(), "tom": imgs["tom_hanks"]}
    faces = {k: cv2.resize(v, (224, 224), interpolation=cv2.INTER_AREA) for k, v in faces.items()}
    root = tmp_path_factory.mktemp("cluster_data") / "data"
    build(root, faces, levels=(2,), kinds=("blur",))
    return root


@pytest.fixture
def api_env(prefect_harness):
    """The environment of a `fiqa` process that reports to the test's Prefect API (no temporary server of its
    own, as with a user's PREFECT_API_URL); extra variables as keywords."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the harness sets the API URL"
    return lambda **extra: _env(PREFECT_API_URL=url, **extra)


def _fiqa(*commands: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Several `fiqa` commands in one process (one temporary Prefect server), stopping at the first failure."""
    code = ("import json, sys; from flows.cli import main\n"
            "for argv in json.loads(sys.argv[1]):\n    rc = main(argv)\n    rc and sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, json.dumps(commands)], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _rows(ws: Workspace, table: str, cols: str) -> list[dict]:
    return catalog.query(ws, f"SELECT {cols} FROM {table}_history ORDER BY ALL").to_pylist()


ANCHOR_STEPS = ("anchors-*/shards/embed-*", "anchors-*/shards/centers-*", "anchors-*/shards/search-*")
COMPARED = {"samples": "sample_id, dataset, identity, status, error, content_hash",
            "faces": "sample_id, status, n_faces, crop_index, round(score, 4) AS score",
            "factors": "sample_id, factor, round(value, 6) AS value, class_name, status, error",
            "embeddings": "sample_id, status, [round(x, 4) FOR x IN embedding] AS embedding",
            "anchors": "sample_id, status, round(anchor, 4) AS anchor, nearest_negative",
            "scores": "sample_id, method, status, round(quality, 4) AS quality"}


def _server_processes(pids) -> list[str]:
    """Prefect API servers among the descendants of the given processes."""
    found = []
    for pid in pids:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:  # ended meanwhile
                continue
            if "uvicorn" in cmd or "prefect.server" in cmd:
                found.append(f"{pid}: {cmd[:120]}")
    return found


def _local_run(root: Path, faces_folder: Path, checkpoint: str) -> Workspace:
    """ingest -> label -> anchors -> score in this process, on the local disk: what a cluster's run must equal."""
    from flows.anchors import anchors_flow
    from flows.ingest import ingest
    from flows.label import label
    from flows.score import score_flow

    ws = Workspace(root)
    ingest(path=str(faces_folder), dataset="c", workspace=str(ws.root), shard_size=2, progress=False)
    label(stages=["align", "blur"], options={"detector": "mtcnn"}, workspace=str(ws.root), shard_size=2,
          progress=False)
    anchors_flow(workspace=str(ws.root), device="cpu", shard_size=2, progress=False)
    score_flow(workspace=str(ws.root), checkpoint=checkpoint, device="cpu", shard_size=2, progress=False)
    return ws


def _cluster_run(faces_folder: Path, checkpoint: str, workspace: str, cluster: Cluster) -> Workspace:
    """The same four steps through `fiqa` on the cluster, in one client process (no server per worker)."""
    where = ["--workspace", workspace, "--runner", "dask", "--address", cluster.address]
    t0 = time.perf_counter()
    out = _fiqa(["ingest", str(faces_folder), "--dataset", "c", "--shard-size", "2", *where],
                ["label", *LABEL, "--shard-size", "2", "--no-progress", *where],
                ["anchors", *ANCHORS, "--shard-size", "2", *where],
                ["score", "--checkpoint", checkpoint, "--device", "cpu", "--shard-size", "2", *where])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert time.perf_counter() - t0 < 120, "no worker may start a Prefect server of its own (~20 s each)"
    return Workspace(workspace)


def _same_rows_by_workers(local: Workspace, ws: Workspace) -> set[str]:
    """Assert every table equals the local run's row for row; the workers that labelled (never this process)."""
    for table, cols in COMPARED.items():
        theirs, ours = _rows(local, table, cols), _rows(ws, table, cols)
        assert len(ours) > 0 and ours == theirs, table
    markers = [json.loads(p.read_text()) for p in ws.runs_dir.glob("label-*/shards/*.json")]
    workers = {m["worker"] for m in markers}
    assert len(markers) == 4 and all(f"(pid {os.getpid()})" not in w for w in workers)
    for pattern in ANCHOR_STEPS:  # every sharded step of anchors ran on the workers
        steps = [json.loads(p.read_text()) for p in ws.runs_dir.glob(f"{pattern}.json")]
        assert steps and all(f"(pid {os.getpid()})" not in m["worker"] for m in steps), pattern
    return workers


def test_a_pipeline_on_the_cluster_with_the_workspace_on_s3_equals_a_local_run(
        s3_cluster, faces_folder, tmp_path, prefect_harness, tiny_checkpoint, s3_workspace, monkeypatch):
    local = _local_run(tmp_path / "local", faces_folder, tiny_checkpoint)
    client = s3_cluster.client_dir / "pipeline"  # the client's cache and checkpoint: out of the workers' sight
    monkeypatch.setenv("FIQA_CACHE", str(client / "cache"))
    checkpoint = client / "ckpt" / Path(tiny_checkpoint).name
    checkpoint.parent.mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, checkpoint)
    ws = _cluster_run(faces_folder, str(checkpoint), s3_workspace, s3_cluster)
    assert ws.root.is_relative_to(client / "cache")
    workers = _same_rows_by_workers(local, ws)
    assert len(workers) == 2, workers  # both workers took shards
    for n in (1, 2):  # each worker wrote into its own cache and committed to the store: shards of every step
        cache = next((s3_cluster.root / f"cache-{n}").iterdir())
        for table in ("samples", "faces", "embeddings", "scores"):
            assert list(cache.glob(f"manifests/{table}/run=*/part-*.parquet")), (n, table)
        for scratch in ("anchor_centers", "anchor_stats"):  # the centres' sums and the search ran here
            assert list(cache.glob(f"runs/anchors-*/{scratch}/part-*.parquet")), (n, scratch)
        assert not list(cache.glob("manifests/anchors/run=*/*.parquet"))  # the normalisation: in the client
    imported = list(ws.checkpoints.glob("imported/*/*/" + Path(tiny_checkpoint).name))
    assert len(imported) == 1 and imported[0].read_bytes() == Path(tiny_checkpoint).read_bytes()


def test_a_worker_killed_mid_label_loses_and_duplicates_nothing(s3_cluster, s3_workspace, faces_folder,
                                                                monkeypatch, api_env):
    # The workers commit to the store; the client's cache is out of their sight.
    dask_cluster, location = s3_cluster, s3_workspace
    monkeypatch.setenv("FIQA_CACHE", str(dask_cluster.client_dir / "kill"))
    ws = Workspace(location)  # on S3: the client's cache, where its run records land
    where = ["--workspace", location, "--runner", "dask", "--address", dask_cluster.address]
    out = _fiqa(["ingest", str(faces_folder), "--dataset", "c", "--shard-size", "3", *where], env=api_env())
    assert out.returncode == 0, out.stderr[-3000:]
    n = catalog.query(ws, "SELECT count(*) AS n FROM samples").column("n")[0].as_py()
    label_cmd = ["label", *LABEL, "--shard-size", "1", "--no-progress", "--run-id", "label-kill", *where]
    code = "import sys, json; from flows.cli import main; sys.exit(main(json.loads(sys.argv[1])))"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(label_cmd)], cwd=ROOT, env=api_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        deadline = time.time() + 120
        run_json = ws.runs_dir / "label-kill" / "run.json"
        while not run_json.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        victim = sorted(dask_cluster.worker_pids().values())[0]
        os.kill(victim, signal.SIGKILL)
        committed_at_kill = len(list((ws.runs_dir / "label-kill" / "shards").glob("*.json")))
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert committed_at_kill < n, "the worker must die before the run's last shard"
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    if proc.returncode != 0:  # the killed worker's shard may fail the run: the resume finishes it
        assert "re-run with --run-id label-kill" in log, log[-3000:]
    out = _fiqa(label_cmd, env=api_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    per_sample = catalog.query(ws, "SELECT sample_id, count(*) AS k FROM faces_history WHERE run_id = 'label-kill' "
                                   "GROUP BY 1").to_pylist()
    assert len(per_sample) == n and all(r["k"] == 1 for r in per_sample)
    per_factor = catalog.query(ws, "SELECT count(*) AS k, count(DISTINCT sample_id) AS d FROM factors_history "
                                   "WHERE run_id = 'label-kill'").to_pylist()[0]
    assert per_factor == {"k": n, "d": n}
    dask_cluster.client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker
    assert victim not in dask_cluster.worker_pids().values()


def test_a_cluster_that_cannot_do_the_work_fails_the_run_naming_why_and_it_resumes_on_one_that_can(
        dask_cluster, faces_folder, tmp_path, api_env):
    ws = Workspace(tmp_path / "shared" / "ws")
    broken = Cluster.__new__(Cluster)  # a scheduler without workers first
    broken.root, broken.procs, broken.env = tmp_path / "broken", [], {}
    broken.root.mkdir()
    broken._start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                   "--scheduler-file", str(broken.root / "s.json")])
    try:
        deadline = time.time() + 60
        while not (broken.root / "s.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        broken.address = json.loads((broken.root / "s.json").read_text())["address"]
        cmd = ["ingest", str(faces_folder), "--dataset", "c", "--shard-size", "3", "--run-id", "ing",
               "--workspace", str(ws.root), "--runner", "dask"]
        out = _fiqa([*cmd, "--address", broken.address], env=api_env(FIQA_CLUSTER_TIMEOUT="3"))
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
        assert f"no Dask worker connected to the scheduler {broken.address}" in out.stderr
        assert "FIQA_CLUSTER_TIMEOUT=3" in out.stderr and "re-run with --run-id ing" in out.stderr

        # A worker that does not see the workspace: its own empty file system over the workspace's folder.
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode == 0:
            broken.add_worker(prefix=("unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{ws.root.parent}" && '
                                      'exec "$0" "$@"'))
            out = _fiqa([*cmd, "--address", broken.address], env=api_env())
            assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
            assert "cannot see the workspace" in out.stderr and str(ws.root) in out.stderr
            assert f"{os.uname().nodename} (pid " in out.stderr and "same path" in out.stderr
            assert catalog.query(ws, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 0
    finally:
        for p in broken.procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    out = _fiqa([*cmd, "--address", dask_cluster.address], env=api_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert catalog.query(ws, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM samples_history "
                             "WHERE run_id = 'ing'").to_pylist() == [{"n": 7, "d": 7}]



def _deployment_steps(ws: str, faces_folder: Path, checkpoint: str, **runner: str) -> Workspace:
    """What the refresh and relabel deployments run (their flows, called as a served run calls them), then score."""
    from flows.scheduled import refresh_dataset, relabel_subset
    from flows.score import score_flow

    out = refresh_dataset(dataset_path=str(faces_folder), dataset="c", workspace=ws, label_stages=["align", "blur"],
                          label_options={"detector": "mtcnn"}, device="cpu", shard_size=2, **runner)
    assert out["new_samples"] == 7 and out["samples_without_anchors"] > 0, out
    again = relabel_subset(where="blur_class IS NOT NULL", stages=["blur"], workspace=ws, shard_size=1,
                           blur_thresholds="paper", **runner)
    assert again["selected"] > 0, again
    score_flow(workspace=ws, checkpoint=checkpoint, device="cpu", shard_size=2, progress=False, **runner)
    return Workspace(ws)


def test_the_deployments_flows_and_score_on_the_cluster_equal_a_local_run_and_report_to_the_flows_api(
        dask_cluster, faces_folder, tmp_path, prefect_harness, tiny_checkpoint):
    local = _deployment_steps(str(tmp_path / "local"), faces_folder, tiny_checkpoint)
    ws = _deployment_steps(str(tmp_path / "cluster"), faces_folder, tiny_checkpoint, runner="dask",
                           address=dask_cluster.address)
    for table, cols in COMPARED.items():
        theirs, ours = _rows(local, table, cols), _rows(ws, table, cols)
        assert len(ours) > 0 and ours == theirs, table
    relabelled = catalog.query(ws, "SELECT count(*) AS n FROM factors_history WHERE run_id LIKE 'relabel-%'")
    assert relabelled.column("n")[0].as_py() > 0
    for pattern in ("label-*/shards/*", "relabel-*/shards/*", "score-*/shards/*", *ANCHOR_STEPS):
        markers = [json.loads(p.read_text()) for p in ws.runs_dir.glob(f"{pattern}.json")]
        assert markers and all(f"(pid {os.getpid()})" not in m["worker"] for m in markers), pattern
    assert not _server_processes(dask_cluster.worker_pids().values())
