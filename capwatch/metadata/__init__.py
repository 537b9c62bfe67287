"""Captions in image files: read descriptions (and whose words they are), write captions losslessly.

Public API (everything else in this package is an implementation detail):
``read_metadata``, ``write_caption``, ``remove_stale_temp_files``, ``is_temp_file`` and the records
``Provenance``, ``Description``, ``FileMetadata``, ``WriteResult``. Provenance lives in the XMP namespace
``https://capwatch.invalid/ns/1.0/`` (prefix ``capwatch``), see ``capwatch.metadata.xmp``.
"""

from capwatch.metadata.atomic import is_temp_file, remove_stale_temp_files
from capwatch.metadata.reader import read_metadata
from capwatch.metadata.records import Description, FileMetadata, Provenance, WriteResult
from capwatch.metadata.writer import write_caption

__all__ = [
    "Description",
    "FileMetadata",
    "Provenance",
    "WriteResult",
    "is_temp_file",
    "read_metadata",
    "remove_stale_temp_files",
    "write_caption",
]
