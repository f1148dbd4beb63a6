"""Explicit pyarrow schemas of the manifest tables and their latest-wins keys."""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

_COMMON = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", TS, nullable=False),
]
_STATUS = [pa.field("status", pa.string(), nullable=False), pa.field("error", pa.string())]


def _schema(*fields: pa.Field, common: bool = True) -> pa.Schema:
    return pa.schema([*(_COMMON if common else []), *fields, *_STATUS])


SCHEMAS: dict[str, pa.Schema] = {
    # One row per source record of a dataset.
    "samples": _schema(
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source_kind", pa.string(), nullable=False),  # folder | recordio | bin | list | wider
        pa.field("source", pa.string(), nullable=False),  # absolute path, or "<path>#<index>"
        pa.field("identity", pa.int64()),  # integer label (-1: unknown)
        pa.field("identity_name", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("channels", pa.int8()),
        pa.field("format", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("content_hash", pa.string()),
    ),
    # Alignment result: one row per sample.
    "faces": _schema(
        pa.field("detector", pa.string()),
        pa.field("detector_version", pa.string()),
        pa.field("n_faces", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in source pixels
        pa.field("landmarks", pa.list_(pa.float32(), 10)),  # 5 (x, y) in source pixels
        pa.field("transform", pa.list_(pa.float32(), 6)),  # 2x3 source -> crop, row-major
        pa.field("crop_file", pa.string()),  # relative to the workspace root
        pa.field("crop_index", pa.int32()),
        pa.field("aligned_mode", pa.string()),  # detect | already_aligned | box (WIDER box crop)
    ),
    # Long format: one row per (sample, factor).
    "factors": _schema(
        pa.field("factor", pa.string(), nullable=False),  # blur | occlusion | pose | expression | lighting
        pa.field("value", pa.float64()),  # CPBD, yaw in degrees, or adverse-class probability
        pa.field("class_index", pa.int8()),  # index into data_manifest.vocabulary.FACTOR_CLASSES[factor]
        pa.field("class_name", pa.string()),
        pa.field("labeller", pa.string(), nullable=False),
        pa.field("labeller_version", pa.string(), nullable=False),
        pa.field("thresholds", pa.string()),  # JSON
        pa.field("details", pa.string()),  # JSON
    ),
    # Recognition embeddings (L2-normalised), one row per (sample, model).
    "embeddings": _schema(
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("identity", pa.int64()),
        pa.field("embedding", pa.list_(pa.float32())),
    ),
    # CR-FIQA-style quality anchors.
    "anchors": _schema(
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("identity", pa.int64()),
        pa.field("ccs", pa.float32()),
        pa.field("nnccs", pa.float32()),
        pa.field("nearest_negative", pa.int64()),
        pa.field("raw", pa.float32()),
        pa.field("anchor", pa.float32()),
        pa.field("norm_min", pa.float64()),
        pa.field("norm_max", pa.float64()),
        pa.field("center_source", pa.string()),  # mean | head
    ),
    # Quality scores of any method, one row per (sample, method).
    "scores": _schema(
        pa.field("method", pa.string(), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("quality", pa.float32()),
        pa.field("quality_probs", pa.list_(pa.float32())),
        pa.field("confidence", pa.float32()),
        pa.field("marginals", pa.string()),  # JSON: factor -> list of class probabilities
    ),
    # Run registry: one row per run event (start, finish); latest per run_id.
    "runs": pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("created_at", TS, nullable=False),
            pa.field("flow", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),  # running | completed | failed
            pa.field("parameters", pa.string()),  # JSON
            pa.field("code_version", pa.string()),
            pa.field("started_at", TS),
            pa.field("ended_at", TS),
            pa.field("counts", pa.string()),  # JSON
            pa.field("metrics", pa.string()),  # JSON
            pa.field("host", pa.string()),
            pa.field("error", pa.string()),
        ]
    ),
}

# Columns identifying "the same thing" across runs: the `<table>` view keeps the newest row per key.
KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("sample_id",),
    "faces": ("sample_id",),
    "factors": ("sample_id", "factor"),
    "embeddings": ("sample_id", "model_id"),
    "anchors": ("sample_id",),
    "scores": ("sample_id", "method"),
    "runs": ("run_id",),
}

TABLES: tuple[str, ...] = tuple(SCHEMAS)


def duck_type(t: pa.DataType) -> str:
    """The DuckDB column type of an Arrow type of the schemas."""
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP"
    if pa.types.is_fixed_size_list(t):
        return f"{duck_type(t.value_type)}[{t.list_size}]"
    if pa.types.is_list(t):
        return f"{duck_type(t.value_type)}[]"
    simple = {pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
              pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}
    if t in simple:
        return simple[t]
    raise TypeError(f"no DuckDB type mapping for {t}")


def schema(table: str) -> pa.Schema:
    """The schema of a manifest table, with a clear error for an unknown name."""
    try:
        return SCHEMAS[table]
    except KeyError as e:
        raise KeyError(f"unknown manifest table {table!r}; tables: {', '.join(TABLES)}") from e
