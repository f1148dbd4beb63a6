"""Prefect flows and the `fiqa` CLI.

Importing this package sets offline-friendly Prefect defaults (before Prefect
itself is imported): analytics off and a server start-up timeout that survives
a fresh PREFECT_HOME. A user's own settings always win. It does not touch the
Hugging Face hub settings: whether downloads are allowed is the caller's choice
(`make test` and `make demo` set HF_HUB_OFFLINE=1).
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_key, _value)
