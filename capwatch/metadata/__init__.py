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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives. Loaded on first use: importing one light module of this package (``formats``,
#: ``fsops``: the index and the CLI do) does not load the readers and writers (measured: ~150-180 ms of every
#: `capwatch search` process on this box).
_EXPORTS = {
    "is_temp_file": "capwatch.metadata.atomic",
    "FileChanged": "capwatch.metadata.identity",
    "FileIdentity": "capwatch.metadata.identity",
    "fingerprint_file": "capwatch.metadata.identity",
    "Journal": "capwatch.metadata.journal",
    "RecoveryReport": "capwatch.metadata.journal",
    "read_metadata": "capwatch.metadata.reader",
    "read_snapshot": "capwatch.metadata.reader",
    "Description": "capwatch.metadata.records",
    "FileMetadata": "capwatch.metadata.records",
    "FileSnapshot": "capwatch.metadata.records",
    "Provenance": "capwatch.metadata.records",
    "WriteHooks": "capwatch.metadata.records",
    "WriteResult": "capwatch.metadata.records",
    "description_key": "capwatch.metadata.records",
    "CaptionTextError": "capwatch.metadata.writer",
    "CaptionWrite": "capwatch.metadata.writer",
    "DescriptionChanged": "capwatch.metadata.writer",
    "write_caption": "capwatch.metadata.writer",
    "write_captions": "capwatch.metadata.writer",
    "describe_chars": "capwatch.metadata.xmltext",
    "unsafe_chars": "capwatch.metadata.xmltext",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
