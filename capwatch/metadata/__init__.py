"""Captions in image files: read descriptions (and whose words they are), write captions losslessly.

Public API (everything else in this package is an implementation detail):
``read_metadata``, ``read_snapshot``, ``write_caption`` (and ``write_captions`` with ``CaptionWrite``: a batch,
group-committed), ``is_temp_file``, the write ``Journal`` (crash recovery),
``FileChanged`` (a write refused because the file changed since it was read), ``DescriptionChanged`` (a
person's words not written because the file holds descriptions their writer did not see; ``description_key``
names what was seen), ``CaptionTextError`` and ``unsafe_chars`` (characters XML cannot hold), and the records
``Provenance``, ``Description``, ``FileMetadata``, ``FileIdentity``, ``FileSnapshot``, ``WriteResult``, ``WriteHooks``.
Provenance lives in the XMP namespace ``https://capwatch.invalid/ns/1.0/`` (prefix ``capwatch``), see
``capwatch.metadata.xmp``; so does the list of keywords capwatch added, which is how a re-caption replaces only
those (merge rules: ``capwatch.metadata.keywords``).
"""

from capwatch.metadata.atomic import is_temp_file
from capwatch.metadata.identity import FileChanged, FileIdentity, fingerprint_file
from capwatch.metadata.journal import Journal, RecoveryReport
from capwatch.metadata.reader import read_metadata, read_snapshot
from capwatch.metadata.records import (
    Description,
    FileMetadata,
    FileSnapshot,
    Provenance,
    WriteHooks,
    WriteResult,
    description_key,
)
from capwatch.metadata.writer import (
    CaptionTextError,
    CaptionWrite,
    DescriptionChanged,
    write_caption,
    write_captions,
)
from capwatch.metadata.xmltext import describe_chars, unsafe_chars

__all__ = [
    "CaptionTextError",
    "CaptionWrite",
    "Description",
    "DescriptionChanged",
    "FileChanged",
    "FileIdentity",
    "FileMetadata",
    "FileSnapshot",
    "Journal",
    "Provenance",
    "RecoveryReport",
    "WriteHooks",
    "WriteResult",
    "describe_chars",
    "description_key",
    "fingerprint_file",
    "is_temp_file",
    "read_metadata",
    "read_snapshot",
    "unsafe_chars",
    "write_caption",
    "write_captions",
]
