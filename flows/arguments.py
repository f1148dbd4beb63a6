"""Argument types shared by the `fiqa` commands (no Prefect import: `fiqa sql` stays fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# What a user can fix: a bad value, a missing or unreadable file, a busy run id, a missing optional package.
INPUT_ERRORS = (ValueError, OSError, RuntimeError)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a message naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_sql_limits(p: argparse.ArgumentParser, prefix: str = "sql-") -> None:
    """The time and memory limits of the user SQL a command runs (`--timeout` / `--memory` of `fiqa sql`,
    `--sql-timeout` / `--sql-memory` of the flows that take `--where` or `--query`)."""
    p.add_argument(f"--{prefix}timeout", type=seconds, default=None, metavar="SECONDS",
                   help="stop a query after this many seconds (default: $FIQA_SQL_TIMEOUT or 300)")
    p.add_argument(f"--{prefix}memory", default=None, metavar="SIZE",
                   help="DuckDB memory limit of a query, e.g. 2GB (default: $FIQA_SQL_MEMORY or 4GB); "
                        "a query never spills to disk")


def apply_sql_limits(args: argparse.Namespace) -> None:
    """Make a flow's --sql-timeout / --sql-memory the limits of every user query of this process and its workers."""
    import os

    from data_manifest import catalog

    for attr, env in (("sql_timeout", catalog.ENV_TIMEOUT), ("sql_memory", catalog.ENV_MEMORY)):
        value = getattr(args, attr, None)
        if value is not None:
            os.environ[env] = str(value)
