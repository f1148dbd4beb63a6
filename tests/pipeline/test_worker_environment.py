"""The worker plugin that hands the flow's Prefect API to Dask workers, and takes it back."""

from __future__ import annotations

import os
import socket

import cloudpickle

from pipeline.worker_environment import WorkerEnvironment

KEY = "FIQA_TEST_PREFECT_API_URL"


def test_the_environment_is_set_on_setup_and_restored_on_teardown(monkeypatch):
    monkeypatch.setenv(KEY, "http://before:1/api")
    plugin = cloudpickle.loads(cloudpickle.dumps(WorkerEnvironment({KEY: "http://127.0.0.1:8021/api"},
                                                                   socket.gethostname())))
    plugin.setup(worker=None)
    assert os.environ[KEY] == "http://127.0.0.1:8021/api"
    plugin.teardown(worker=None)
    assert os.environ[KEY] == "http://before:1/api"
    monkeypatch.delenv(KEY)
    plugin.setup(worker=None)
    plugin.teardown(worker=None)
    assert KEY not in os.environ


def test_a_loopback_url_is_not_set_on_another_host(monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    WorkerEnvironment({KEY: "http://127.0.0.1:8021/api"}, "some-other-host").setup(worker=None)
    assert KEY not in os.environ
    plugin = WorkerEnvironment({KEY: "http://prefect.internal:4200/api"}, "some-other-host")
    plugin.setup(worker=None)
    assert os.environ[KEY] == "http://prefect.internal:4200/api"
    plugin.teardown(worker=None)
    assert KEY not in os.environ
