"""Captions in image files: read descriptions (and whose words they are), write captions losslessly.

Public API (everything else in this package is an implementation detail):
``read_metadata``, ``write_caption``, ``remove_stale_temp_files``, ``is_temp_file`` and the records
``Provenance``, ``Description``, ``FileMetadata``, ``WriteResult``.
"""

from capwatch.metadata.reader import read_metadata
from capwatch.metadata.records import Description, FileMetadata, Provenance, WriteResult

__all__ = ["Description", "FileMetadata", "Provenance", "WriteResult", "read_metadata"]
