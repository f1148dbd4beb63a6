"""Task runners and the compute pool: where a flow's shard bodies execute.

Nothing here imports Prefect at module level (the CLI imports RUNNERS to parse `--runner`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pipeline.worker_threads import one_thread_per_worker

T = TypeVar("T")
RUNNERS = ("threads", "processes", "dask")


def make_task_runner(kind: str = "threads", max_workers: int | None = None, address: str | None = None) -> Any:
    """Build a Prefect task runner by name (dask: a local cluster, or the one at `address`)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or min(4, os.cpu_count() or 1))
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=max_workers or os.cpu_count() or 1,
                                     initializer=one_thread_per_worker)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("--runner dask needs the 'prefect-dask' package: pip install prefect-dask") from e
        if address:
            return DaskTaskRunner(address=address)
        kwargs = {"n_workers": max_workers or os.cpu_count() or 1, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    raise ValueError(f"unknown task runner {kind!r}; choose one of {', '.join(RUNNERS)}")


def with_runner(flow_obj: Any, opts: Any, *, pooled: bool = False) -> Any:
    """The flow with the task runner its options ask for (RunOptions or parsed CLI arguments): the one runner helper.

    A `pooled` flow runs its shard bodies in a `compute_pool` under `--runner processes`: its Prefect tasks
    then run on threads of the flow's process, each handing its shard to a pool worker and waiting for it.
    """
    kind = getattr(opts, "runner", "threads")
    workers = getattr(opts, "workers", None)
    if pooled and kind == "processes":
        kind, workers = "threads", workers or os.cpu_count() or 1
    return flow_obj.with_options(task_runner=make_task_runner(kind, workers, getattr(opts, "address", None)))


def dask_client() -> Any | None:
    """The Dask client of the running flow's task runner when it is a Dask runner, else None."""
    from prefect.context import EngineContext

    runner, dask = getattr(EngineContext.get(), "task_runner", None), sys.modules.get("prefect_dask")
    return runner.client if dask is not None and isinstance(runner, dask.DaskTaskRunner) else None


@contextlib.contextmanager
def shared_api(client: Any | None = None) -> Iterator[None]:
    """While a flow's shards run, point its workers at this process's temporary Prefect server: without an API
    URL, each worker (of the processes runner, or of a Dask cluster: `client`) would start its own (seconds each;
    a killed Dask worker orphans it). The processes runner passes os.environ on; Dask workers get a plugin."""
    from prefect.settings import get_current_settings

    server_module = sys.modules.get("prefect.server.api.server")  # imported by Prefect when it starts one
    server = server_module.SubprocessASGIServer() if server_module else None  # the instance flows use
    proc = getattr(server, "server_process", None)
    if get_current_settings().api.url or "PREFECT_API_URL" in os.environ or proc is None or proc.poll() is not None:
        yield
        return
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with contextlib.ExitStack() as stack:
            if client is not None:
                from pipeline.worker_environment import worker_environment

                stack.enter_context(worker_environment(client, {"PREFECT_API_URL": server.api_url}, drain_services))
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def drain_services() -> None:
    """On a worker: deliver its queued Prefect logs and events now, while the flow's API is up, and stop them."""
    import threading

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    # a thread without an event loop: drain_all waits there (on the worker's loop it would return a coroutine)
    t = threading.Thread(target=lambda: [s.drain_all(timeout=10, at_exit=False) for s in (APILogWorker, EventsWorker)])
    t.start()
    t.join()


def _worker_ready() -> int:
    return os.getpid()


def _start_worker(warm: tuple[Callable[..., Any], tuple[Any, ...]] | None) -> None:
    """A pool worker's initializer: one compute thread, then the flow's warm-up (e.g. loading its models)."""
    one_thread_per_worker()
    if warm is not None:
        with contextlib.suppress(Exception):  # the flow's own check, run in this worker, raises it with its message
            warm[0](*warm[1])


_STARTED: list[tuple[Any, Any]] = []  # (warm, pool) of the pools `prestarted` opened for the flow about to run


@contextlib.contextmanager
def compute_pool(opts: Any, warm: tuple[Callable[..., Any], tuple[Any, ...]] | None = None) -> Iterator[Any]:
    """Dataloader-style worker processes for a pooled flow under `--runner processes`, else None.

    Prefect's processes runner starts every worker as a fresh interpreter that imports Prefect and the
    flow module and reports each task to the API (about 3 s of start-up on 2 cores, per run). Shard
    bodies that import neither (`pipeline.ingest_shard`) run here instead: the workers import only what those
    bodies need, start while the flow sets up (one compute thread each), and stay until the flow ends.
    `warm`: (function, args) each worker runs once when it starts, before its first shard (the label
    flow's model loading), so the models load in parallel with the flow's planning, once per worker.
    A pool `prestarted` opened with the same `warm` is adopted (and left to it to close).
    """
    if getattr(opts, "runner", "threads") != "processes":
        yield None
        return
    for started_warm, started in _STARTED:
        if started_warm == warm:
            yield started
            return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = getattr(opts, "workers", None) or os.cpu_count() or 1
    # spawn, like Prefect's runner: the flow's process has threads (Prefect's event loops), so no fork.
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(warm,))
    try:
        for _ in range(n):
            pool.submit(_worker_ready)  # start the workers now, while the flow plans its shards
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # a failed or interrupted flow does not wait for queued shards
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def prestarted(opts: Any, warm: tuple[Callable[..., Any], tuple[Any, ...]] | None = None) -> Iterator[Any]:
    """Open the flow's compute pool before the flow starts, for its `compute_pool(opts, warm)` to adopt; yields
    the pool (None without `--runner processes`).

    The workers then start and warm up while this process checks the options and Prefect starts its
    server and the flow run (seconds), instead of after: a small run is not mostly start-up.
    """
    with compute_pool(opts, warm) as pool:
        if pool is None:
            yield None
            return
        entry = (warm, pool)
        _STARTED.append(entry)
        try:
            yield pool
        finally:
            _STARTED.remove(entry)


@contextlib.contextmanager
def api_starting() -> Iterator[None]:
    """Start Prefect's temporary server on a thread while the block runs (the client's own checks), when the flow
    about to run would start one: its seconds of start-up overlap the checks instead of following them."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    import threading

    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        with contextlib.suppress(Exception):  # the flow starts it itself, and reports why it cannot
            SubprocessASGIServer().start()  # the instance (port None) the flow's client uses

    thread = threading.Thread(target=start, name="fiqa-prefect-server-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()  # also after a failed check: a server half started at exit would outlive this process


def offload(pool: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a compute_pool worker when there is a pool, else right here."""
    if pool is None:
        return fn(*args, **kwargs)
    return pool.submit(fn, *args, **kwargs).result()
