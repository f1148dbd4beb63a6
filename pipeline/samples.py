"""The ingest stage: source records in, one validated `samples` row each out (bad input included)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from pipeline import images
from pipeline.ids import content_hash, sample_id
from pipeline.readers import Record

# The columns of a samples row this stage fills (the writer adds run_id and created_at).
SAMPLE_COLUMNS: tuple[str, ...] = ("sample_id", "dataset", "source_kind", "source", "identity", "identity_name",
                                   "width", "height", "channels", "format", "bytes", "content_hash", "status",
                                   "error")


def sample_columns(dataset: str, records: Iterable[Record], *,
                   max_pixels: int = images.MAX_PIXELS) -> dict[str, list[Any]]:
    """The samples rows of a batch of records (a shard) as columns: each record's bytes validated (full decode,
    no pixels kept), one value per record in every column of SAMPLE_COLUMNS."""
    cols: dict[str, list[Any]] = {name: [] for name in SAMPLE_COLUMNS}
    ids, kinds, sources, idents, names = (cols[c].append for c in ("sample_id", "source_kind", "source", "identity",
                                                                   "identity_name"))
    widths, heights, channels, formats = (cols[c].append for c in ("width", "height", "channels", "format"))
    sizes, hashes, statuses, errors = (cols[c].append for c in ("bytes", "content_hash", "status", "error"))
    for rec in records:
        ids(sample_id(dataset, rec.key))
        kinds(rec.kind)
        sources(rec.source)
        idents(rec.identity)
        names(rec.identity_name)
        if rec.data is None:
            for add in (widths, heights, channels, formats, sizes, hashes):
                add(None)
            statuses(rec.status or images.UNREADABLE)
            errors(rec.error or "no data")
            continue
        dec = images.decode(rec.data, max_pixels=max_pixels, pixels=False)
        widths(dec.width)
        heights(dec.height)
        channels(dec.channels)
        formats(dec.format)
        sizes(len(rec.data))
        hashes(content_hash(rec.data))
        statuses(dec.status)
        errors(dec.error)
    cols["dataset"] = [dataset] * len(cols["sample_id"])
    return cols


def sample_rows(dataset: str, records: Iterable[Record], *,
                max_pixels: int = images.MAX_PIXELS) -> list[dict[str, Any]]:
    """sample_columns as one dict per record."""
    cols = sample_columns(dataset, records, max_pixels=max_pixels)
    return [dict(zip(SAMPLE_COLUMNS, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    """{'rows': n, 'status_<s>': count} for the statuses of a batch of samples rows."""
    c = Counter(statuses)
    return {"rows": sum(c.values()), **{f"status_{k}": v for k, v in sorted(c.items())}}
