"""Argument types shared by the `fiqa` commands (no Prefect import: `fiqa sql` stays fast)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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
