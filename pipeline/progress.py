"""Progress on stderr for long work: a shard progress line (tqdm when installed) and timed, logged steps."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Progress:
    """A minimal progress line on stderr (tqdm when installed), safe to disable."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.perf_counter()
        self._bar = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, leave=True)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r{self.desc}: {self.n}/{self.total} ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


@contextlib.contextmanager
def timed_step(name: str, timings: dict[str, float], prefix: str = "") -> Iterator[None]:
    """Log `name ...` on stderr, run the block, record its seconds in `timings[name]` and log them."""
    t0 = time.perf_counter()
    print(f"{prefix}{name} ...", file=sys.stderr, flush=True)
    yield
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"{prefix}{name} done in {timings[name]} s", file=sys.stderr, flush=True)
