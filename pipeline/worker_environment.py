"""Environment variables for a Dask cluster's workers while a flow runs on it (a worker plugin).

The flow's Prefect API reaches the workers this way: without it each worker process starts a temporary
Prefect server of its own (seconds per worker, orphaned when the worker is killed) and its task runs never
show up in the flow's server.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "fiqa-worker-environment"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class WorkerEnvironment(WorkerPlugin):
    """Environment variables on every worker, also one that joins or restarts later; restored on removal.

    A loopback URL (a temporary Prefect server of the flow's process) is set only on workers of the flow's
    own host: another machine cannot reach it.
    """

    def __init__(self, env: Mapping[str, str], host: str) -> None:
        self.env, self.host, self.saved = dict(env), host, {}

    def setup(self, worker: Any) -> None:
        hosts = [urlparse(v).hostname for k, v in self.env.items() if k.endswith("_URL")]
        if any(h in LOOPBACK for h in hosts) and socket.gethostname() != self.host:
            return
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def teardown(self, worker: Any) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def worker_environment(client: Any, env: Mapping[str, str], before_exit: Callable[[], None] | None = None
                       ) -> Iterator[None]:
    """Set `env` on the client's workers (current and future) for the duration of the block.

    `before_exit` runs on every worker at the end, before the environment is restored (e.g. to deliver what
    the workers still hold for the API the environment names, while it is up).
    """
    client.register_plugin(WorkerEnvironment(env, socket.gethostname()), name=PLUGIN_NAME)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a cluster already gone has nothing to restore
            if before_exit is not None:
                client.run(before_exit)
            client.unregister_worker_plugin(PLUGIN_NAME)
