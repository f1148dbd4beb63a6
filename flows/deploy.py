"""`fiqa deploy serve|register|worker|recover|commands`: scheduled deployments of refresh, relabel, train+score.

`serve` runs the deployments in this process; `register` creates them on work pools (refresh and relabel on a
CPU process pool, train+score on a GPU pool) for `prefect worker start --pool NAME`, or for `worker`, which
starts that worker after ending the runs a dead one left; `recover` is that check alone (flows.recover);
`commands` prints the commands that start a server, create the pools and limits, and start the workers. Every
option is checked before a deployment is created, and a deployment another route created is never replaced
(names, routes and commands: pipeline.deployments). See docs/operations.md.
"""

from __future__ import annotations

import argparse
import functools
import threading
from pathlib import Path
from typing import Any

from flows import command, recover, relabel, scheduled
from flows.arguments import json_object
from pipeline import deployments as D
from pipeline import recovery as R

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def refresh_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters of the refresh deployment (paths made absolute for workers), checked as the sub-flows check them."""
    path = Path(args.dataset_path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"--dataset-path {path} does not exist")
    params: dict[str, Any] = {
        "dataset_path": str(path), "dataset": args.dataset, "workspace": args.workspace,
        "format": args.format, "steps": D.parse_steps(args.steps), "label_stages": args.label_stages.split(","),
        "label_options": json_object(args.label_options, "--label-options"), "fr_model": args.fr_model,
        "device": args.device, "shard_size": args.shard_size, "runner": args.runner, "workers": args.workers,
        "address": args.address}
    params = {k: v for k, v in params.items() if v is not None}
    scheduled.check_refresh(params)
    return params


def relabel_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Flat parameters of the relabel deployment (labeller options one by one), checked as `fiqa relabel` does."""
    from pipeline.labellers.registry import options_from

    labeller = json_object(args.label_options, "--label-options") or {}
    options_from(labeller)  # unknown names fail with the label flow's message
    params = {"where": args.where, "stages": args.stages.split(",") if args.stages else None,
              "workspace": args.workspace, "shard_size": args.shard_size, "runner": args.runner,
              "workers": args.workers, "address": args.address, **labeller}
    relabel.checked_options(params)
    return {k: v for k, v in params.items() if v is not None}


def train_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters of the train+score deployment, checked as the train flow checks them."""
    params: dict[str, Any] = {
        "workspace": args.workspace, "model": args.model_config,
        "train_config": json_object(args.train_config, "--train-config"), "where": args.train_where,
        "score_where": args.score_where, "device": args.gpu_device}
    params = {k: v for k, v in params.items() if v is not None}
    scheduled.check_train(params)
    return params


def plans(args: argparse.Namespace, route: str) -> list[dict[str, Any]]:
    """The deployments one command creates: flow, entrypoint, pool (None when served) and the deployment's
    keyword arguments (name, parameters, UTC schedule, tags with the route, concurrency 1)."""
    from prefect.schedules import Cron

    args.workspace = args.workspace and str(Path(args.workspace).expanduser().resolve())  # the same on workers

    def plan(flow: Any, entrypoint: str, name: str, params: dict, cron: str | None, pool: str, tag: str,
             description: str) -> dict[str, Any]:
        return {"flow": flow, "entrypoint": entrypoint, "pool": None if route == "serve" else pool, "kwargs": {
            "name": name, "parameters": params, "tags": ["fiqa", D.route_tag(route), tag], "description": description,
            "concurrency_limit": 1, "schedules": [Cron(cron, timezone=D.TIMEZONE)] if cron else None}}

    if args.relabel:
        if not args.where:
            raise ValueError("--relabel NAME needs --where SQL (the samples to re-label)")
        return [plan(scheduled.relabel_subset, D.RELABEL_ENTRYPOINT, D.deployment_name("relabel", args.relabel),
                     relabel_parameters(args), args.cron, getattr(args, "cpu_pool", None), "cpu",
                     f"re-label where {args.where} with {args.stages or relabel.DEFAULT_STAGES}")]
    if not (args.dataset_path and args.dataset):
        raise ValueError("give --dataset-path and --dataset (the refresh), or --relabel NAME --where SQL")
    name = args.name or D.deployment_name("refresh", args.dataset)
    out = [plan(scheduled.refresh_dataset, D.REFRESH_ENTRYPOINT, name, refresh_parameters(args),
                args.cron or D.DEFAULT_CRON, getattr(args, "cpu_pool", None), "cpu",
                f"ingest + label + anchors of the new samples of {args.dataset}")]
    train_cron = args.train_cron_serve if route == "serve" else (None if args.no_train else args.train_cron)
    if train_cron:
        out.append(plan(scheduled.train_and_score, D.TRAIN_ENTRYPOINT,
                        args.train_name or D.deployment_name("train-and-score", args.dataset), train_parameters(args),
                        train_cron, getattr(args, "gpu_pool", None), D.GPU_TAG, "train CLIB-FIQA, then score with it"))
    return out


def check_names(plans: list[dict[str, Any]], route: str) -> None:
    """Refuse to replace a deployment of the same name that another route or another work pool created."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for plan in plans:
            full = f"{plan['flow'].name}/{plan['kwargs']['name']}"
            try:
                found = client.read_deployment_by_name(full)
            except ObjectNotFound:
                continue
            if why := D.ownership_conflict(full, found.tags, found.work_pool_name, route, plan["pool"]):
                raise ValueError(why)


def pools(names: list[str], cpu_pool: str, gpu_pool: str, *, create: bool) -> list[str]:
    """Check that the work pools exist. With `create`, make the missing ones (process pools, the GPU one with
    concurrency 1, and the `gpu` tag limit) and return what was made; without, fail with the creating commands."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    made, missing = [], []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                limit = D.GPU_POOL_LIMIT if name == gpu_pool else None
                if create:
                    client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=limit))
                made.append(f"work pool {name} (process{'' if limit is None else f', concurrency {limit}'})")
                missing.append(name)
        if create and gpu_pool in names:
            try:
                client.read_concurrency_limit_by_tag(D.GPU_TAG)
            except ObjectNotFound:
                client.create_concurrency_limit(tag=D.GPU_TAG, concurrency_limit=1)
                made.append(f"concurrency limit on tag '{D.GPU_TAG}' (1)")
    if missing and not create:
        cmds = "\n  ".join(c for c in D.setup_commands(cpu_pool, gpu_pool) if "worker start" not in c and (
            any(f" {m} " in f"{c} " for m in missing) or (gpu_pool in missing and "concurrency-limit create" in c)))
        raise RuntimeError(f"work pool(s) {', '.join(missing)} do not exist; create them with\n  {cmds}\n"
                           "or pass --create-pools")
    return made


def register(args: argparse.Namespace) -> list[str]:
    """Create the deployments on the work pools; returns their full names."""
    from prefect import Flow

    todo = plans(args, "register")
    for line in pools(list(dict.fromkeys(p["pool"] for p in todo)), args.cpu_pool, args.gpu_pool,
                      create=args.create_pools):
        print(f"created {line}")
    check_names(todo, "register")
    source = str(Path(args.source).expanduser().resolve())
    for plan in todo:
        Flow.from_source(source=source, entrypoint=plan["entrypoint"]).deploy(
            work_pool_name=plan["pool"], build=False, push=False, print_next_steps=False, **plan["kwargs"])
    return [f"{p['flow'].name}/{p['kwargs']['name']}" for p in todo]


def serve(args: argparse.Namespace) -> None:
    """Serve the deployments from this process until interrupted; runs a dead serve left are ended first."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY

    todo = plans(args, "serve")
    check_names(todo, "serve")
    deployments = [p["flow"].to_deployment(entrypoint_type=EntrypointType.MODULE_PATH, **p["kwargs"])
                   for p in todo]
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    R.recover_workspaces(p["kwargs"]["parameters"].get("workspace") for p in todo)
    check = functools.partial(recover.check_runs, [d.name for d in deployments], R.Notices())
    check()
    threading.Thread(target=R.repeat, args=(check, PREFECT_RUNNER_POLL_FREQUENCY.value()), daemon=True).start()
    print(f"serving {', '.join(names)}; trigger with: prefect deployment run '{names[0]}'", flush=True)
    prefect_serve(*deployments, limit=args.limit, print_starting_message=False)


def _add_deployment_args(p: argparse.ArgumentParser) -> None:
    for flag, default, help_text in D.OPTIONS:  # the options of serve and register, with their help
        p.add_argument(flag, default=default, help=help_text, **({"type": int} if isinstance(default, int) else {}))
    command.add_runner_args(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    fmt = p.formatter_class  # each action's help names its defaults too
    text = "serve the refresh (or relabel) deployment from this process (no worker needed)"
    s = sub.add_parser("serve", formatter_class=fmt, help=text, description=text)
    _add_deployment_args(s)
    s.add_argument("--train-cron-serve", default=None,
                   help="also serve train+score on this schedule (this machine must have the GPU)")
    s.add_argument("--limit", type=int, default=None, help="most concurrent flow runs of this process")
    text = "create deployments on work pools (run by `prefect worker start --pool NAME`)"
    r = sub.add_parser("register", formatter_class=fmt, help=text, description=text)
    _add_deployment_args(r)
    r.add_argument("--cpu-pool", default=D.DEFAULT_CPU_POOL, help="process pool of the refresh and relabel")
    r.add_argument("--gpu-pool", default=D.DEFAULT_GPU_POOL, help="process pool of train+score")
    r.add_argument("--train-cron", default=D.DEFAULT_TRAIN_CRON, help="train+score schedule, UTC")
    r.add_argument("--no-train", action="store_true", help="register the refresh deployment only")
    r.add_argument("--create-pools", action="store_true",
                   help="create missing process pools (GPU pool with concurrency 1) and the 'gpu' tag limit")
    r.add_argument("--source", default=str(PROJECT_ROOT),
                   help="project checkout the workers load the flows from (default: this checkout)")
    text = "end the dead runs of this project's deployments (a worker's, after a crash) as Crashed"
    v = sub.add_parser("recover", formatter_class=fmt, help=text, description=text)
    v.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="keep checking every SECONDS (run it beside `prefect worker start` on the worker's machine)")
    v.add_argument("--workspace", dest="workspaces", action="append", default=None,
                   help="workspace whose dead runs are recorded as crashed (repeatable; default: the deployments')")
    text = "a `prefect worker` on POOL that first ends the dead runs a killed worker left, and checks at every poll"
    w = sub.add_parser("worker", formatter_class=fmt, help=text, description=text)
    w.add_argument("--pool", required=True, help="the work pool (e.g. fiqa-cpu)")
    w.add_argument("--limit", type=int, default=None, help="most concurrent flow runs of the worker")
    w.add_argument("--workspace", dest="workspaces", action="append", default=None,
                   help="workspace whose dead runs are recorded as crashed (repeatable; default: the deployments')")
    text = "print the commands that start a server, create pools, start workers"
    c = sub.add_parser("commands", formatter_class=fmt, help=text, description=text)
    c.add_argument("--cpu-pool", default=D.DEFAULT_CPU_POOL, help="process pool of the refresh")
    c.add_argument("--gpu-pool", default=D.DEFAULT_GPU_POOL, help="pool of train+score")
    c.add_argument("--api-url", default=D.DEFAULT_SERVER, help="the Prefect server's API address")


def run_cli(args: argparse.Namespace) -> int:
    if args.action == "commands":
        print("\n".join(D.setup_commands(args.cpu_pool, args.gpu_pool, args.api_url)))
        return 0
    if args.action == "serve":
        serve(args)
        return 0
    if args.action == "recover":
        recover.recover(args)
        return 0
    if args.action == "worker":
        return recover.worker(args)
    names = register(args)
    print("registered " + ", ".join(names))
    pools = {args.cpu_pool} | ({args.gpu_pool} if any(n.startswith("train-and-score/") for n in names) else set())
    print("start the workers with:\n  " + "\n  ".join(c for c in D.setup_commands(args.cpu_pool, args.gpu_pool)
                                                   if "worker start" in c and any(p in c for p in pools)))
    return 0


if __name__ == "__main__":
    raise SystemExit(command.main_for("flows.deploy")())
