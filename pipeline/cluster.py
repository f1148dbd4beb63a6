"""Waiting for a flow's shard tasks, bounded while its Dask cluster has no worker.

A scheduler whose workers all died keeps the tasks queued, and the flow would wait for them forever. Here
the wait asks the scheduler, whenever nothing finished for a while, how many workers it has; after
$FIQA_CLUSTER_TIMEOUT seconds with none the run ends (it resumes with the same run id). Prefect-free and
Dask-free: flows/runtime.py hands in the Dask client of the flow's task runner.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

ENV_TIMEOUT = "FIQA_CLUSTER_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # seconds without any worker before a run gives up (nannies restart workers in seconds)


class ClusterLost(RuntimeError):
    """No worker was connected to the scheduler for longer than the cluster timeout."""


def cluster_timeout() -> float:
    """$FIQA_CLUSTER_TIMEOUT in seconds (default 300); must be a positive number."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"${ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return value


class WorkerWatch:
    """How long the client's scheduler has had no worker; `lost()` names it once that passes the timeout."""

    def __init__(self, client: Any, timeout: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.client, self.clock = client, clock
        self.timeout = cluster_timeout() if timeout is None else timeout
        self.since: float | None = None

    def workers(self) -> int:
        try:
            return len(self.client.nthreads())
        except Exception:  # noqa: BLE001 - a scheduler that does not answer has no worker for us
            return 0

    def lost(self) -> str | None:
        if self.workers():
            self.since = None
            return None
        now = self.clock()
        self.since = now if self.since is None else self.since
        if now - self.since < self.timeout:
            return None
        address = getattr(getattr(self.client, "scheduler", None), "address", "?")
        return (f"no Dask worker connected to the scheduler {address} for {now - self.since:.0f} s "
                f"(${ENV_TIMEOUT}={self.timeout:g}); start workers for it")


def as_completed(futures: list[Any], lost: Callable[[], str | None] | None = None, poll: float = 2.0
                 ) -> Iterator[Any]:
    """Yield futures (anything with add_done_callback) as they finish; raise ClusterLost once `lost()` gives a
    reason. `lost` is asked only while nothing finishes, every `poll` seconds."""
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for fut in futures:
        fut.add_done_callback(done.put)
    for _ in range(len(futures)):
        while True:
            try:
                fut = done.get(timeout=poll)
            except queue.Empty:
                if lost is not None and (reason := lost()):
                    raise ClusterLost(reason) from None
                continue
            yield fut
            break
