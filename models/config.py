"""Dataclass configs from JSON mappings, refusing unknown keys with a message that lists the known ones."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], data: dict[str, Any], what: str) -> T:
    """Build the dataclass `cls` from `data`; unknown keys raise ValueError naming `what`."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {what} key(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)
