"""The flows' own queries, kept in data_manifest/sql/flows/ apart from the `fiqa stats` reports."""

from __future__ import annotations

from data_manifest.catalog import SQL_DIR


def flow_sql(name: str) -> str:
    """A flow's query from data_manifest/sql/flows/<name>.sql."""
    path = SQL_DIR / "flows" / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no flow query {name!r} in {path.parent}")
    return path.read_text()
