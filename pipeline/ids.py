"""Stable sample identifiers and content hashes."""

from __future__ import annotations

import hashlib


def sample_id(dataset: str, key: str) -> str:
    """A 32-hex-digit id derived from the dataset name and the record's key within it (stable across runs)."""
    if not dataset:
        raise ValueError("sample_id: the dataset name must not be empty")
    return hashlib.blake2b(f"{dataset}\x00{key}".encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the encoded bytes (comparable with `sha256sum`)."""
    return hashlib.sha256(data).hexdigest()
