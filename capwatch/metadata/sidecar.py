"""XMP sidecar files: which names belong to an image, reading them, and the packet written to them.

Naming (design.md): update every existing ``name.ext.xmp`` (darktable, digiKam style) and ``name.xmp``
(Lightroom, Capture One style); when none exists, create ``name.ext.xmp``, which cannot collide between
``IMG_1.CR2`` and ``IMG_1.JPG``. The ``.xmp`` extension is matched case-insensitively in the same directory.
"""

from __future__ import annotations

from pathlib import Path


def sidecar_candidates(path: Path) -> tuple[Path, Path]:
    """The two conventional sidecar names for ``path``: (name.ext.xmp, name.xmp)."""
    return path.with_name(path.name + ".xmp"), path.with_name(path.stem + ".xmp")


def existing_sidecars(path: Path) -> list[Path]:
    """Sidecars that exist for ``path`` (either naming; ``.xmp`` or ``.XMP``), name.ext.xmp first.

    Only stats a few names (no directory listing), so scanning a large folder stays linear.
    """
    found: list[Path] = []
    for base in (path.name, path.stem):
        for ext in (".xmp", ".XMP", ".Xmp"):
            candidate = path.with_name(base + ext)
            if candidate.name != path.name and candidate.is_file() and candidate not in found:
                found.append(candidate)
                break
    return found


def sidecar_targets(path: Path) -> list[Path]:
    """Sidecars to write for ``path``: every existing one, else a new ``name.ext.xmp``."""
    return existing_sidecars(path) or [sidecar_candidates(path)[0]]
