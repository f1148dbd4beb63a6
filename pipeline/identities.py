"""Stable identity numbers of a folder dataset: its readers number identities by the dataset's identity map
(data_manifest.identities) instead of their sorted position, so a new folder never renumbers the others."""

from __future__ import annotations

from data_manifest import identities
from data_manifest.workspace import Workspace
from pipeline.readers import DatasetReader
from pipeline.readers.folder import FolderReader


def numbered(ws: Workspace, dataset: str, reader: DatasetReader) -> DatasetReader:
    """The reader, its folder identities numbered by the dataset's map (new names appended); other readers,
    whose records carry their own labels, as they are."""
    if isinstance(reader, FolderReader):
        reader.use_labels(identities.assign(ws, dataset, reader.identities()))
    return reader
