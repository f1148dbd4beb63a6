"""A lock that belongs to one process: created on first use, never sent to another process.

A module-level `threading.Lock` makes everything that reaches the module's globals unpicklable: a task
or flow pickled by value for a Dask worker (or another runner) fails with "cannot pickle
'_thread.lock' object". A ProcessLock pickles as an empty shell; each process creates its own lock
the first time it is taken, which is what a per-process lock means anyway.
"""

from __future__ import annotations

import threading
from typing import Any


class ProcessLock:
    """A context-manager lock, one per process, created lazily; pickles (and copies) as a fresh lock."""

    def __init__(self, reentrant: bool = False) -> None:
        self.reentrant = reentrant

    def _get(self) -> Any:
        lock = self.__dict__.get("_lock")
        if lock is None:  # setdefault is atomic: of two threads creating it at once, one lock wins
            lock = self.__dict__.setdefault("_lock", threading.RLock() if self.reentrant else threading.Lock())
        return lock

    def __enter__(self) -> bool:
        return self._get().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._get().__exit__(*exc)

    def __reduce__(self) -> tuple[Any, tuple[bool]]:
        return ProcessLock, (self.reentrant,)
