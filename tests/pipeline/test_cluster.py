"""The bounded wait for shard tasks: futures as they finish, and a cluster without workers ends the wait."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from pipeline import cluster


class FakeClient:
    def __init__(self, workers):
        self.n = workers
        self.scheduler = type("S", (), {"address": "tcp://10.0.0.1:8786"})()

    def nthreads(self):
        if self.n is None:
            raise OSError("scheduler gone")
        return {f"w{i}": 1 for i in range(self.n)}


def test_futures_come_back_as_they_finish():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        gate = threading.Event()
        slow = pool.submit(gate.wait, 5)
        fast = pool.submit(lambda: 1)
        order = []
        for fut in cluster.as_completed([slow, fast], lost=lambda: None, poll=0.05):
            order.append(fut)
            gate.set()
    assert order == [fast, slow]


def test_a_cluster_without_workers_ends_the_wait_after_the_timeout_naming_the_scheduler():
    now = [0.0]
    client = FakeClient(2)
    watch = cluster.WorkerWatch(client, timeout=30, clock=lambda: now[0])
    assert watch.lost() is None
    client.n = 0
    assert watch.lost() is None  # the clock starts
    now[0] = 29
    assert watch.lost() is None
    client.n = 1  # a worker came back: the clock resets
    now[0] = 40
    assert watch.lost() is None
    client.n = None  # the scheduler does not answer: no worker either
    now[0] = 50
    assert watch.lost() is None
    now[0] = 81
    reason = watch.lost()
    assert reason and "tcp://10.0.0.1:8786" in reason and "FIQA_CLUSTER_TIMEOUT=30" in reason and "31 s" in reason
    never = concurrent.futures.Future()
    with pytest.raises(cluster.ClusterLost, match="10.0.0.1:8786"):
        list(cluster.as_completed([never], lost=watch.lost, poll=0.01))


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(cluster.ENV_TIMEOUT, raising=False)
    assert cluster.cluster_timeout() == cluster.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(cluster.ENV_TIMEOUT, "2.5")
    assert cluster.WorkerWatch(FakeClient(1)).timeout == 2.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(cluster.ENV_TIMEOUT, bad)
        with pytest.raises(ValueError, match="FIQA_CLUSTER_TIMEOUT must be a positive number"):
            cluster.cluster_timeout()
