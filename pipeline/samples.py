"""The ingest stage: source records in, one validated `samples` row each out (bad input included)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from pipeline import images
from pipeline.ids import content_hash, sample_id
from pipeline.readers import Record


def sample_row(dataset: str, rec: Record, *, max_pixels: int = images.MAX_PIXELS) -> dict[str, Any]:
    """Validate one record's bytes (full decode, no pixels kept) and describe it as a `samples` row."""
    row: dict[str, Any] = {
        "sample_id": sample_id(dataset, rec.key),
        "dataset": dataset,
        "source_kind": rec.kind,
        "source": rec.source,
        "identity": rec.identity,
        "identity_name": rec.identity_name,
        "width": None, "height": None, "channels": None, "format": None,
        "bytes": None, "content_hash": None,
    }
    if rec.data is None:
        row["status"] = rec.status or images.UNREADABLE
        row["error"] = rec.error or "no data"
        return row
    dec = images.decode(rec.data, max_pixels=max_pixels, pixels=False)
    row.update(width=dec.width, height=dec.height, channels=dec.channels, format=dec.format,
               bytes=len(rec.data), content_hash=content_hash(rec.data), status=dec.status, error=dec.error)
    return row


def sample_rows(dataset: str, records: Iterable[Record], *,
                max_pixels: int = images.MAX_PIXELS) -> list[dict[str, Any]]:
    """sample_row for every record of a batch (a shard)."""
    return [sample_row(dataset, r, max_pixels=max_pixels) for r in records]


def status_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """{'rows': n, 'status_<s>': count} for a batch of samples rows."""
    c = Counter(r["status"] for r in rows)
    return {"rows": sum(c.values()), **{f"status_{k}": v for k, v in sorted(c.items())}}
