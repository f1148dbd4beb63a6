"""`fiqa deploy serve|register|commands`: scheduled deployments of the refresh and train+score flows.

`serve` runs the deployments in this process; `register` creates them on work pools (refresh on a CPU
process pool, train+score on a GPU pool) for `prefect worker start --pool NAME`; `commands` prints the
commands that start a server, create the pools and limits, and start the workers. See docs/operations.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows import command, scheduled
from flows.arguments import json_object

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REFRESH_ENTRYPOINT = "flows/scheduled.py:refresh_dataset"
TRAIN_ENTRYPOINT = "flows/scheduled.py:train_and_score"
DEFAULT_CPU_POOL = "fiqa-cpu"
DEFAULT_GPU_POOL = "fiqa-gpu"
DEFAULT_CRON = "0 * * * *"  # hourly refresh
DEFAULT_TRAIN_CRON = "0 3 * * 0"  # weekly, Sunday 03:00
DEFAULT_SERVER = "http://127.0.0.1:4200/api"
GPU_POOL_LIMIT = 1


def refresh_name(dataset: str) -> str:
    return f"refresh-{dataset}"


def refresh_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters of the refresh deployment from the CLI options (paths made absolute for workers)."""
    if not args.dataset or not args.dataset.strip():
        raise ValueError("--dataset must be a non-empty name")
    path = Path(args.dataset_path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"--dataset-path {path} does not exist")
    from pipeline.labellers.registry import ALIGN, options_from, parse_stages

    steps = scheduled.parse_steps(args.steps)
    stages = parse_stages(args.label_stages)
    if "label" in steps and ALIGN not in stages:
        raise ValueError(f"--label-stages must include '{ALIGN}': refresh labels new, never aligned samples")
    label_options = json_object(args.label_options, "--label-options")
    options_from(label_options)  # unknown names or bad thresholds fail now, not at the first scheduled run
    params: dict[str, Any] = {
        "dataset_path": str(path), "dataset": args.dataset,
        "workspace": str(Path(args.workspace).expanduser().resolve()) if args.workspace else None,
        "format": args.format, "steps": steps, "label_stages": stages, "label_options": label_options,
        "fr_model": args.fr_model, "device": args.device, "shard_size": args.shard_size,
        "runner": args.runner, "workers": args.workers, "address": args.address,
    }
    return {k: v for k, v in params.items() if v is not None}


def train_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters of the train+score deployment from the CLI options."""
    params: dict[str, Any] = {
        "workspace": str(Path(args.workspace).expanduser().resolve()) if args.workspace else None,
        "model": args.model_config, "train_config": json_object(args.train_config, "--train-config"),
        "where": args.train_where, "score_where": args.score_where, "device": args.gpu_device,
    }
    return {k: v for k, v in params.items() if v is not None}


def setup_commands(cpu_pool: str = DEFAULT_CPU_POOL, gpu_pool: str = DEFAULT_GPU_POOL,
                   api_url: str = DEFAULT_SERVER) -> list[str]:
    """Shell commands: local server, API URL, pools, GPU limits, workers (one per line, in order)."""
    return [
        "prefect server start --host 127.0.0.1  # in its own terminal; UI at http://127.0.0.1:4200",
        f"prefect config set PREFECT_API_URL={api_url}",
        f"prefect work-pool create {cpu_pool} --type process",
        f"prefect work-pool create {gpu_pool} --type process",
        f"prefect work-pool set-concurrency-limit {gpu_pool} {GPU_POOL_LIMIT}  # one GPU flow run at a time",
        f"prefect concurrency-limit create {scheduled.GPU_TAG} 1  # one task run tagged {scheduled.GPU_TAG!r} at once",
        f"prefect worker start --pool {cpu_pool}  # on a CPU machine, in the project checkout",
        f"CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {gpu_pool}  # on the GPU machine",
    ]


def ensure_pools(cpu_pool: str, gpu_pool: str | None) -> list[str]:
    """Create missing process pools (GPU pool with concurrency 1) and the `gpu` tag limit; returns what was made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    made: list[str] = []
    with get_client(sync_client=True) as client:
        for name, limit in ((cpu_pool, None), (gpu_pool, GPU_POOL_LIMIT)):
            if name is None:
                continue
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=limit))
                made.append(f"work pool {name} (process{'' if limit is None else f', concurrency {limit}'})")
        if gpu_pool is not None:
            try:
                client.read_concurrency_limit_by_tag(scheduled.GPU_TAG)
            except ObjectNotFound:
                client.create_concurrency_limit(tag=scheduled.GPU_TAG, concurrency_limit=1)
                made.append(f"concurrency limit on tag '{scheduled.GPU_TAG}' (1)")
    return made


def check_pools(names: list[str], cpu_pool: str, gpu_pool: str) -> None:
    """Fail with the creating commands when a work pool does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                missing.append(name)
    if missing:
        cmds = "\n  ".join(c for c in setup_commands(cpu_pool, gpu_pool) if any(m in c for m in missing))
        raise RuntimeError(f"work pool(s) {', '.join(missing)} do not exist; create them with\n  {cmds}\n"
                           "or pass --create-pools")


def register(args: argparse.Namespace) -> list[str]:
    """Create the deployments on the work pools; returns their full names."""
    from prefect import Flow

    params = refresh_parameters(args)
    pools = [args.cpu_pool] + ([] if args.no_train else [args.gpu_pool])
    if args.create_pools:
        for line in ensure_pools(args.cpu_pool, None if args.no_train else args.gpu_pool):
            print(f"created {line}")
    else:
        check_pools(pools, args.cpu_pool, args.gpu_pool)
    source = str(Path(args.source).expanduser().resolve())
    names = []
    refresh = Flow.from_source(source=source, entrypoint=REFRESH_ENTRYPOINT)
    refresh.deploy(name=args.name or refresh_name(args.dataset), work_pool_name=args.cpu_pool, cron=args.cron,
                   parameters=params, tags=["fiqa", "cpu"], build=False, push=False, print_next_steps=False,
                   concurrency_limit=1,
                   description=f"ingest + label + anchors of the new samples of {args.dataset}")
    names.append(f"{refresh.name}/{args.name or refresh_name(args.dataset)}")
    if not args.no_train:
        train = Flow.from_source(source=source, entrypoint=TRAIN_ENTRYPOINT)
        train.deploy(name=args.train_name, work_pool_name=args.gpu_pool, cron=args.train_cron,
                     parameters=train_parameters(args), tags=["fiqa", scheduled.GPU_TAG], build=False, push=False,
                     concurrency_limit=GPU_POOL_LIMIT, print_next_steps=False,
                     description="train CLIB-FIQA then score with the new checkpoint")
        names.append(f"{train.name}/{args.train_name}")
    return names


def serve(args: argparse.Namespace) -> None:
    """Serve the refresh (and optionally train+score) deployment from this process until interrupted."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    deployments = [scheduled.refresh_dataset.to_deployment(
        name=args.name or refresh_name(args.dataset), cron=args.cron, parameters=refresh_parameters(args),
        tags=["fiqa", "cpu"], entrypoint_type=EntrypointType.MODULE_PATH, concurrency_limit=1)]
    if args.train_cron_serve:
        deployments.append(scheduled.train_and_score.to_deployment(
            name=args.train_name, cron=args.train_cron_serve, parameters=train_parameters(args),
            tags=["fiqa", scheduled.GPU_TAG], entrypoint_type=EntrypointType.MODULE_PATH, concurrency_limit=1))
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    print(f"serving {', '.join(names)}; trigger with: prefect deployment run '{names[0]}'", flush=True)
    prefect_serve(*deployments, limit=args.limit, print_starting_message=False)


def _add_refresh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-path", required=True, help="the watched dataset (image folder, .rec, .bin or list)")
    p.add_argument("--dataset", required=True, help="dataset name (part of every sample_id)")
    p.add_argument("--workspace", default=None, help="workspace directory (default: the worker's $FIQA_WORKSPACE)")
    p.add_argument("--name", default=None, help="refresh deployment name (default: refresh-DATASET)")
    p.add_argument("--cron", default=DEFAULT_CRON, help="refresh schedule (default: %(default)r, hourly)")
    p.add_argument("--format", default="auto", help="dataset reader (default: auto)")
    p.add_argument("--steps", default=",".join(scheduled.STEPS), help="refresh steps (default: %(default)s)")
    p.add_argument("--label-stages", default=",".join(scheduled.DEFAULT_LABEL_STAGES),
                   help="label stages for new samples (default: %(default)s)")
    p.add_argument("--label-options", default=None,
                   help='label options as JSON, e.g. \'{"detector": "scrfd", "pose_backend": "dlib"}\'')
    p.add_argument("--fr-model", default=None, help="anchors recogniser spec (default: the anchors flow's)")
    p.add_argument("--device", default="auto", help="device of the anchors stage (default: auto)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    command.add_runner_args(p)
    p.add_argument("--train-name", default="weekly", help="train+score deployment name (default: weekly)")
    p.add_argument("--model-config", default="clib-rn50", help="CLIB-FIQA model config (default: clib-rn50)")
    p.add_argument("--train-config", default=None, help="TrainConfig overrides as JSON")
    p.add_argument("--train-where", default=None, help="SQL filter on the training set")
    p.add_argument("--score-where", default=None, help="SQL filter on the samples to score (default: all)")
    p.add_argument("--gpu-device", default="cuda", help="device of train+score (default: cuda)")


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    fmt = p.formatter_class  # each action's help names its defaults too
    s = sub.add_parser("serve", formatter_class=fmt,
                       help="serve the refresh deployment from this process (no worker needed)")
    _add_refresh_args(s)
    s.add_argument("--train-cron-serve", default=None,
                   help="also serve train+score on this schedule (this machine must have the GPU)")
    s.add_argument("--limit", type=int, default=None, help="most concurrent flow runs of this process")
    r = sub.add_parser("register", formatter_class=fmt, help="create deployments on work pools (run by workers)")
    _add_refresh_args(r)
    r.add_argument("--cpu-pool", default=DEFAULT_CPU_POOL, help="process pool of the refresh (default: %(default)s)")
    r.add_argument("--gpu-pool", default=DEFAULT_GPU_POOL, help="pool of train+score (default: %(default)s)")
    r.add_argument("--train-cron", default=DEFAULT_TRAIN_CRON, help="train+score schedule (default: %(default)r)")
    r.add_argument("--no-train", action="store_true", help="register the refresh deployment only")
    r.add_argument("--create-pools", action="store_true",
                   help="create missing process pools (GPU pool with concurrency 1) and the 'gpu' tag limit")
    r.add_argument("--source", default=str(PROJECT_ROOT),
                   help="project checkout the workers load the flows from (default: this checkout)")
    c = sub.add_parser("commands", formatter_class=fmt,
                       help="print the commands that start a server, create pools, start workers")
    c.add_argument("--cpu-pool", default=DEFAULT_CPU_POOL, help="process pool of the refresh")
    c.add_argument("--gpu-pool", default=DEFAULT_GPU_POOL, help="pool of train+score")
    c.add_argument("--api-url", default=DEFAULT_SERVER, help="the Prefect server's API address")


def run_cli(args: argparse.Namespace) -> int:
    if args.action == "commands":
        print("\n".join(setup_commands(args.cpu_pool, args.gpu_pool, args.api_url)))
        return 0
    if args.action == "serve":
        serve(args)
        return 0
    names = register(args)
    print("registered " + ", ".join(names))
    pools = [args.cpu_pool] + ([] if args.no_train else [args.gpu_pool])
    print("start the workers with:\n  " + "\n  ".join(c for c in setup_commands(args.cpu_pool, args.gpu_pool)
                                                   if "worker start" in c and any(p in c for p in pools)))
    return 0


if __name__ == "__main__":

    raise SystemExit(command.main_for("flows.deploy")())
