"""A watchdog process: stop one process (SIGTERM, then SIGKILL) when another dies, kill -9 included.

The temporary Prefect server (started by Prefect when no PREFECT_API_URL is set) is a child process that
Prefect stops at interpreter exit, which kill -9 of the flow skips (flows.bookkeeping.watch_temporary_server).
Linux only: it waits on pidfds.
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHDOG = r"""
import os, select, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
srv = pidfd(server)
if srv is None:
    sys.exit(0)
par = pidfd(parent)
if par is not None:
    ready, _, _ = select.select([par, srv], [], [])
    if srv in ready:
        sys.exit(0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        signal.pidfd_send_signal(srv, sig)
    except ProcessLookupError:
        sys.exit(0)
    if select.select([srv], [], [], 5)[0]:
        sys.exit(0)
"""


def spawn_watchdog(server_pid: int, parent_pid: int | None = None) -> subprocess.Popen:
    """Start the watchdog that terminates `server_pid` when `parent_pid` (default: this process) dies."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(parent_pid or os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
