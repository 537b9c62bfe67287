"""Thumbnails and previews: made on first request, WebP, cached on disk under the cache folder.

Decoding goes through the decoder the captioner uses (``capwatch.models.preprocess.load_image``): EXIF
orientation applied, RAW through its embedded preview, HEIC through pillow-heif, large JPEGs decoded at a reduced
DCT scale (Pillow's draft mode), decompression bombs refused. The cache key is the file's content fingerprint
from the index plus its current size and mtime and the size asked for, so an edited photo gets a new thumbnail
and an unchanged one is never decoded twice. The key is also the ETag.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from capwatch.models.preprocess import DRAFT_HEADROOM, load_image

#: Longest side of a grid thumbnail and of the photo page's preview, in pixels.
THUMB_PX = 320
PREVIEW_PX = 1600
#: Bump when the rendering changes, so caches and browsers do not keep the old pictures.
_VERSION = "1"


@dataclass(frozen=True)
class Rendered:
    """A cached WebP: where it is and its ETag (quoted, as the header wants it)."""

    path: Path
    etag: str


def cache_key(fingerprint: str | None, size: int, mtime_ns: int, px: int) -> str:
    """The cache file name (and ETag) for a file with this fingerprint and stat, rendered at ``px``."""
    text = f"{_VERSION}|{fingerprint or ''}|{size}|{mtime_ns}|{px}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class ThumbnailCache:
    """WebP renderings of photos at a few sizes, on disk below ``root`` (two-level fan-out by key)."""

    def __init__(self, root: Path, *, parallel: int | None = None) -> None:
        self.root = root
        # A grid asks for dozens at once and the server's thread pool would decode them all together: at most
        # one decode per core (a 1600 px preview of a 24 MP photo holds ~18 MB while it is made).
        self._slots = threading.BoundedSemaphore(parallel or max(1, os.cpu_count() or 1))

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.webp"

    def lookup(self, key: str) -> Rendered | None:
        """The cached rendering for ``key``, or None when there is none yet."""
        target = self._file(key)
        return Rendered(target, f'"{key}"') if target.is_file() else None

    def render(self, source: Path, key: str, px: int) -> Rendered:
        """Decode ``source``, fit it into ``px`` x ``px`` and store it as WebP under ``key``; returns it.

        Raises ImageError (one line) when the file cannot be decoded, OSError when the cache cannot be written.
        """
        # load_image drafts a JPEG down to DRAFT_HEADROOM x the size it is given: ask for px / headroom so the
        # decode lands at no less than px (a 24 MP JPEG decodes at 1/8 scale for a 320 px thumbnail).
        side = max(1, -(-px // DRAFT_HEADROOM))
        buffer = io.BytesIO()
        with self._slots:
            image = load_image(source, target_size=(side, side))
            image.thumbnail((px, px), Image.Resampling.LANCZOS if px <= THUMB_PX else Image.Resampling.BICUBIC)
            # method 2: most of WebP's size gain for a fraction of method 4's (the default) encoding time.
            image.save(buffer, "WEBP", quality=80, method=2)
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A cache file, not a photo: temp file + rename, so a reader never sees half a picture.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".webp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Rendered(target, f'"{key}"')
