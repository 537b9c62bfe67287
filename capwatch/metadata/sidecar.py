"""XMP sidecar files: which names belong to an image, reading them, and the packet written to them.

Naming (design.md): update every existing ``name.ext.xmp`` (darktable, digiKam style) and ``name.xmp``
(Lightroom, Capture One style); when none exists, create ``name.ext.xmp``, which cannot collide between
``IMG_1.CR2`` and ``IMG_1.JPG``. The ``.xmp`` extension is matched case-insensitively in the same directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

#: The spellings of the extension looked for, in order (the first one found per base name is the sidecar).
EXTENSIONS = (".xmp", ".XMP", ".Xmp")


def sidecar_candidates(path: Path) -> tuple[Path, Path]:
    """The two conventional sidecar names for ``path``: (name.ext.xmp, name.xmp)."""
    return path.with_name(path.name + ".xmp"), path.with_name(path.stem + ".xmp")


def existing_sidecars(path: Path) -> list[Path]:
    """Sidecars that exist for ``path`` (either naming; ``.xmp`` or ``.XMP``), name.ext.xmp first.

    Only stats a few names (no directory listing), so scanning a large folder stays linear.
    """
    names = sidecar_names(path.name, lambda name: path.with_name(name).is_file())
    return [path.with_name(name) for name in names]


def _stem(image_name: str) -> str:
    return image_name.rsplit(".", 1)[0] if "." in image_name.lstrip(".") else image_name


def possible_sidecar_names(image_name: str) -> frozenset[str]:
    """Every name under which a sidecar of ``image_name`` would be found."""
    return frozenset(base + ext for base in (image_name, _stem(image_name)) for ext in EXTENSIONS) - {image_name}


def sidecar_names(image_name: str, exists: Callable[[str], bool]) -> list[str]:
    """The sidecar names of ``image_name`` for which ``exists(name)`` is true, in the order of
    :func:`existing_sidecars` (a directory listing or a stat can answer ``exists``)."""
    found: list[str] = []
    for base in (image_name, _stem(image_name)):
        for ext in EXTENSIONS:
            name = base + ext
            if name != image_name and name not in found and exists(name):
                found.append(name)
                break
    return found


def signature(sidecars: Iterable[tuple[str, int, int, int]]) -> str:
    """A short digest of sidecars given as (name, size, mtime_ns, ctime_ns); "" when there are none."""
    digest = hashlib.blake2b(digest_size=8)
    count = 0
    for name, size, mtime_ns, ctime_ns in sidecars:
        digest.update(f"{name}\0{size}\0{mtime_ns}\0{ctime_ns}\n".encode("utf-8", "surrogateescape"))
        count += 1
    return digest.hexdigest() if count else ""


def sidecar_targets(path: Path) -> list[Path]:
    """Sidecars to write for ``path``: every existing one, else a new ``name.ext.xmp``."""
    return existing_sidecars(path) or [sidecar_candidates(path)[0]]
