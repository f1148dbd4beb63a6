"""Argument types shared by the `fiqa` commands (no Prefect import: `fiqa sql` stays fast)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

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


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """The JSON object an option gives (None when unset); a clear error naming the option otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} must be a JSON object, got {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {type(value).__name__}")
    return value


def add_sql_limits(p: argparse.ArgumentParser, prefix: str = "sql-") -> None:
    """The time and memory limits of the user SQL a command runs (`--timeout` / `--memory` of `fiqa sql`,
    `--sql-timeout` / `--sql-memory` of the flows that take `--where` or `--query`)."""
    p.add_argument(f"--{prefix}timeout", type=seconds, default=None, metavar="SECONDS",
                   help="stop a query after this many seconds (default: $FIQA_SQL_TIMEOUT or 300)")
    p.add_argument(f"--{prefix}memory", default=None, metavar="SIZE",
                   help="DuckDB memory limit of a query, e.g. 2GB (default: $FIQA_SQL_MEMORY or 4GB); "
                        "a query never spills to disk")


@contextlib.contextmanager
def sql_limits(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs, its --sql-timeout / --sql-memory are the limits of every user query of the process
    and of the workers it starts (through $FIQA_SQL_TIMEOUT / $FIQA_SQL_MEMORY); afterwards they are as before."""
    from data_manifest import catalog

    given = {env: str(value) for attr, env in (("sql_timeout", catalog.ENV_TIMEOUT), ("sql_memory", catalog.ENV_MEMORY))
             if (value := getattr(args, attr, None)) is not None}
    before = {env: os.environ.get(env) for env in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for env, old in before.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old
