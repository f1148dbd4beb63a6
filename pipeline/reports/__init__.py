"""Reports over the manifest: query results in text/CSV/JSON/Parquet, and the bundled stats queries."""
