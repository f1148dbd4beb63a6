"""The manifest store: Parquet tables per run, shard commits, crop packs and the DuckDB catalog."""

from data_manifest import catalog, commits, crops, runs, schemas, snapshots
from data_manifest.workspace import Workspace
from data_manifest.writer import ShardWriter

__all__ = ["Workspace", "ShardWriter", "catalog", "commits", "crops", "runs", "schemas", "snapshots"]
