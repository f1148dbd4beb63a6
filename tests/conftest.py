"""Shared fixtures: offline environment, a temporary workspace, one Prefect test server per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

from data_manifest import Workspace  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for the whole session; flows run against it."""
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (Prefect defaults)

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """A fresh workspace under the test's temporary directory."""
    return Workspace(tmp_path / "ws")
