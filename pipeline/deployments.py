"""What the scheduled deployments are, without Prefect: names, routes, refresh steps and conditions, setup commands.

A deployment's name comes from its action and its subject (`refresh-<dataset>`, `relabel-<name>`,
`train-and-score-<dataset>`), and every deployment carries a `route:<serve|register|yaml>` tag, so a
deployment created one way is never silently replaced by another (flows/deploy.py refuses). See
docs/operations.md, "Scheduled runs".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from data_manifest import Workspace, catalog
from data_manifest.sql_guard import sql_str

REFRESH_ENTRYPOINT = "flows/scheduled.py:refresh_dataset"
TRAIN_ENTRYPOINT = "flows/scheduled.py:train_and_score"
RELABEL_ENTRYPOINT = "flows/scheduled.py:relabel_subset"
DEFAULT_CPU_POOL = "fiqa-cpu"
DEFAULT_GPU_POOL = "fiqa-gpu"
DEFAULT_CRON = "0 * * * *"  # hourly refresh
DEFAULT_TRAIN_CRON = "0 3 * * 0"  # weekly, Sunday 03:00
DEFAULT_SERVER = "http://127.0.0.1:4200/api"
TIMEZONE = "UTC"  # every schedule, whichever route created it (prefect.yaml too)
GPU_POOL_LIMIT = 1
GPU_TAG = "gpu"
ROUTES = ("serve", "register", "yaml")
STEPS = ("ingest", "label", "anchors")
DEFAULT_LABEL_STAGES = ("align", "blur", "pose", "attributes")  # all five factors, real-face labellers
RELABEL_STAGES = "blur,pose"  # `fiqa relabel`'s default
# (flag, default, help) of each option of `fiqa deploy serve|register` (flows/deploy.py adds the task runner's)
OPTIONS: tuple[tuple[str, str | int | None, str], ...] = (
    ("--dataset-path", None, "the watched dataset (image folder, .rec, .bin or list)"),
    ("--dataset", None, "dataset name (part of every sample_id)"),
    ("--relabel", None, "create the relabel deployment relabel-NAME instead of the refresh (needs --where)"),
    ("--where", None, "relabel: SQL condition on the `labels` view choosing the samples"),
    ("--stages", None, f"relabel: stages to re-run (default: {RELABEL_STAGES})"),
    ("--workspace", None, "workspace directory (default: the worker's $FIQA_WORKSPACE)"),
    ("--name", None, "refresh deployment name (default: refresh-DATASET)"),
    ("--cron", None, f"schedule, UTC (default: refresh {DEFAULT_CRON!r}, hourly; relabel: none, run on demand)"),
    ("--format", "auto", "dataset reader"),
    ("--steps", ",".join(STEPS), "refresh steps"),
    ("--label-stages", ",".join(DEFAULT_LABEL_STAGES), "label stages for new samples (must include align)"),
    ("--label-options", None, 'labeller options (LabelOptions) as JSON, e.g. \'{"detector": "scrfd", '
                              '"pose_backend": "dlib", "blur_thresholds": [0.3, 0.65]}\''),
    ("--fr-model", None, "anchors recogniser spec (default: the anchors flow's)"),
    ("--device", "auto", "device of the anchors stage"),
    ("--shard-size", 1000, "samples per shard"),
    ("--train-name", None, "train+score deployment name (default: train-and-score-DATASET)"),
    ("--model-config", "clib-rn50", "CLIB-FIQA model config"),
    ("--train-config", None, "TrainConfig overrides as JSON"),
    ("--train-where", None, "SQL filter on the training set"),
    ("--score-where", None, "SQL filter on the samples to score (default: all)"),
    ("--gpu-device", "cuda", "device of train+score"),
)


def deployment_name(action: str, subject: str) -> str:
    """`<action>-<subject>`, e.g. refresh-incoming: one deployment per action and dataset (or relabel name)."""
    if not subject or not re.fullmatch(r"[\w.-]+", subject):
        raise ValueError(f"a deployment needs a name of letters, digits, '.', '_' or '-', got {subject!r}")
    return f"{action}-{subject}"


def route_tag(route: str) -> str:
    """The tag recording which route created a deployment."""
    if route not in ROUTES:
        raise ValueError(f"unknown deployment route {route!r}; one of {ROUTES}")
    return f"route:{route}"


def ownership_conflict(name: str, tags: Sequence[str], pool: str | None, route: str,
                       new_pool: str | None) -> str | None:
    """Why a deployment `name` (with these tags and work pool) must not be replaced by `route` on `new_pool`."""
    owner = next((t.removeprefix("route:") for t in tags if t.startswith("route:")), None)
    if owner != route:
        return (f"deployment {name} exists and was created by {owner or 'another tool'} (not fiqa deploy {route}); "
                f"choose another --name, or delete it first: prefect deployment delete '{name}'")
    if (pool or None) != (new_pool or None):
        return (f"deployment {name} exists on work pool {pool or '(served, no pool)'}, not {new_pool}; choose "
                f"another --name, or delete it first: prefect deployment delete '{name}'")
    return None


def new_samples_where(dataset: str) -> str:
    """Condition on the `labels` view: samples of the dataset that have never been aligned (no `faces` row)."""
    return f"dataset = {sql_str(dataset)} AND sample_id NOT IN (SELECT sample_id FROM faces)"


def missing_anchors_where(dataset: str) -> str:
    """Condition on the `labels` view: samples of the dataset without an `anchors` row."""
    return f"dataset = {sql_str(dataset)} AND sample_id NOT IN (SELECT sample_id FROM anchors)"


def count_where(ws: Workspace, where: str) -> int:
    """Number of `labels` rows matching a condition."""
    return int(catalog.query(ws, f"SELECT count(*) AS n FROM labels WHERE {where}").column("n")[0].as_py())


def parse_steps(steps: str | Sequence[str]) -> list[str]:
    """Validated refresh steps in pipeline order."""
    names = [s.strip() for s in (steps.split(",") if isinstance(steps, str) else steps) if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise ValueError(f"unknown or no refresh steps {names!r}; choose from {', '.join(STEPS)}")
    return [s for s in STEPS if s in names]


def setup_commands(cpu_pool: str = DEFAULT_CPU_POOL, gpu_pool: str = DEFAULT_GPU_POOL,
                   api_url: str = DEFAULT_SERVER) -> list[str]:
    """Shell commands: local server, API URL, pools, GPU limits, workers (one per line, in order)."""
    where = urlsplit(api_url)
    host, port = where.hostname or "127.0.0.1", where.port or 4200
    return [
        f"prefect server start --host {host} --port {port}  # in its own terminal; UI at http://{host}:{port}",
        f"prefect config set PREFECT_API_URL={api_url}",
        f"prefect work-pool create {cpu_pool} --type process",
        f"prefect work-pool create {gpu_pool} --type process",
        f"prefect work-pool set-concurrency-limit {gpu_pool} {GPU_POOL_LIMIT}  # one GPU flow run at a time",
        f"prefect concurrency-limit create {GPU_TAG} 1  # one task run tagged {GPU_TAG!r} at once",
        f"prefect worker start --pool {cpu_pool}  # on a CPU machine, in the project checkout",
        f"CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {gpu_pool}  # on the GPU machine",
    ]
