"""Thumbnails and previews: made on first request, WebP, cached on disk under the cache folder, pruned.

Decoding goes through the decoder the captioner uses (``capwatch.models.preprocess.load_image``): EXIF
orientation applied, RAW through its embedded preview, HEIC through pillow-heif, large JPEGs decoded at a reduced
DCT scale (Pillow's draft mode), decompression bombs refused. It reads from the descriptor the page opened (below
the photo's root, never through a link: :func:`capwatch.web.security.open_servable`), so what is decoded is what
was checked, and the cache key is taken from that descriptor's ``fstat`` (device, inode, size, mtime, ctime) plus
the index's content fingerprint and the size asked for: an edited photo gets a new thumbnail and an unchanged one
is never decoded twice. The key is also the ETag.

A JPEG that carries a large enough preview of itself (MPF's large thumbnail, a big EXIF thumbnail) of the same
aspect ratio and orientation is rendered from that preview, read from the same descriptor
(:mod:`capwatch.models.jpegpreview`): a 24 MP photo's 1.6 MP preview decodes in a fraction of the photo's time.

Bounds (one request must not cost the server much, whatever file is asked for):

- at most :data:`MAX_DECODED_PIXELS` pixels are decoded for one picture (a JPEG counts at the reduced scale it is
  decoded at, so a 100 MP JPEG is fine; a 169 MP PNG is refused before any pixel is read);
- at most one decode per core at a time, and a request waits at most :data:`SLOT_WAIT_SECONDS` for one (then 503);
- a file that failed to decode is remembered by its identity (the key) and not decoded again until it changes;
- the cache folder holds at most ``[serve] thumbnail_cache_mb``: least recently served pictures go first. A
  sweep at start and every :data:`PRUNE_SECONDS` deletes pictures whose row is gone or whose file changed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from capwatch.errors import CapwatchError, ImageError
from capwatch.models.frames import FrameCache
from capwatch.models.jpegpreview import preview_image
from capwatch.models.preprocess import DRAFT_HEADROOM, load_image

log = logging.getLogger(__name__)

#: Longest side of a grid thumbnail and of the photo page's preview, in pixels.
THUMB_PX = 320
PREVIEW_PX = 1600
#: Bump when the rendering or the cache layout changes, so caches and browsers do not keep the old pictures.
_VERSION = "2"
#: The most pixels one thumbnail or preview decodes: ~150 MB as RGB while it is made (with the slot limit, the
#: most the server spends on pictures at once is this times the cores). A JPEG counts at its draft-reduced size.
MAX_DECODED_PIXELS = 50_000_000
#: How long a request waits for a decode slot before it is answered 503 (retry later).
SLOT_WAIT_SECONDS = 20.0
#: Decode failures remembered (by key), most recent kept.
FAILURES_REMEMBERED = 4096
#: The cache is swept for pictures of rows gone or files changed at start and then this often.
PRUNE_SECONDS = 3600.0
#: When the cache is over its bound, least recently served pictures are deleted down to this share of it.
_EVICT_TO = 0.8
#: A temp file older than this is left over from a crash.
_STALE_TMP_SECONDS = 3600.0
_NAME = re.compile(r"^(\d{1,19})-(\d{1,5})-([0-9a-f]{32})\.webp$")


class Busy(CapwatchError):
    """Every decode slot stayed taken for SLOT_WAIT_SECONDS (one line; the page answers 503)."""


def cache_key(fingerprint: str | None, st: os.stat_result, px: int, variant: str = "") -> str:
    """The cache key (and ETag) for the opened file whose fstat is ``st`` and whose indexed content fingerprint
    is ``fingerprint``, rendered at ``px`` the way ``variant`` names (:attr:`ThumbnailCache.variant`)."""
    text = (f"{_VERSION}|{fingerprint or ''}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|"
            f"{st.st_ctime_ns}|{px}" + (f"|{variant}" if variant else ""))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One cached picture: the row it shows, its size in pixels, its key."""

    row_id: int
    px: int
    key: str

    @property
    def name(self) -> str:
        return f"{self.row_id}-{self.px}-{self.key}.webp"


#: Given a row id and a size, the key its picture would have now (None: the row is gone or may not be shown).
CurrentKey = Callable[[int, int], str | None]


class ThumbnailCache:
    """WebP renderings of photos at a few sizes, on disk below ``root`` (fan-out by row id), at most
    ``max_bytes`` in all."""

    def __init__(self, root: Path, *, max_bytes: int, parallel: int | None = None,
                 slot_wait: float = SLOT_WAIT_SECONDS, embedded_previews: bool = True) -> None:
        self.root = root
        self.max_bytes = max_bytes
        #: Render JPEGs from their embedded preview where one serves (``[serve] embedded_previews``).
        self.embedded_previews = embedded_previews
        #: Part of every key: pictures rendered with the other setting are not served (and are swept out).
        self.variant = "" if embedded_previews else "decoded"
        self.slot_wait = slot_wait
        # A grid asks for dozens at once and the server's thread pool would decode them all together: at most
        # one decode per core (a 1600 px preview of a 24 MP photo holds ~18 MB while it is made).
        self._slots = threading.BoundedSemaphore(parallel or max(1, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._failures: collections.OrderedDict[str, str] = collections.OrderedDict()
        # A video's thumbnail and its preview come from the same decoded frames (FrameCache is thread-safe; its
        # key is the open file's identity, so a changed file is decoded again).
        self._video_frames = FrameCache()
        self._bytes: int | None = None  # the cache's size as last counted plus what was written since

    def _file(self, entry: Entry) -> Path:
        return self.root / f"{entry.row_id % 256:02x}" / entry.name

    def lookup(self, entry: Entry) -> bytes | None:
        """The cached WebP for ``entry``, or None when there is none yet. A hit counts as a use for the
        least-recently-used bound (its access time is set to now)."""
        target = self._file(entry)
        try:
            data = target.read_bytes()
            os.utime(target, ns=(time.time_ns(), os.stat(target).st_mtime_ns))
        except OSError:
            return None
        return data

    def failure(self, entry: Entry) -> str | None:
        """The one-line reason this very file (by key) could not be rendered before, or None."""
        with self._lock:
            return self._failures.get(entry.key)

    def render(self, fd: int, name: str, entry: Entry) -> bytes:
        """Decode the open regular file ``fd`` (``name`` names it in messages), fit it into px x px, store it
        as WebP for ``entry`` (replacing the row's older picture at this size) and return the WebP's bytes.

        Raises ImageError (one line) when the file cannot be decoded (remembered: the same file is refused at
        once next time), Busy when no decode slot came free in time, OSError when the cache cannot be written.
        """
        remembered = self.failure(entry)
        if remembered is not None:
            raise ImageError(remembered)
        # load_image drafts a JPEG down to DRAFT_HEADROOM x the size it is given: ask for px / headroom so the
        # decode lands at no less than px (a 24 MP JPEG decodes at 1/8 scale for a 320 px thumbnail).
        side = max(1, -(-entry.px // DRAFT_HEADROOM))
        if not self._slots.acquire(timeout=self.slot_wait):
            raise Busy(f"every picture decoder is busy (waited {self.slot_wait:.0f} s); try again")
        try:
            image = None
            if self.embedded_previews:
                with contextlib.suppress(OSError):  # load_image reads the same descriptor and says what is wrong
                    image = preview_image(fd, entry.px, max_pixels=MAX_DECODED_PIXELS)
            if image is None:
                image = load_image(Path(name), target_size=(side, side), max_decoded_pixels=MAX_DECODED_PIXELS,
                                   fd=fd, video_frames=self._video_frames)
            image.thumbnail((entry.px, entry.px),
                            Image.Resampling.LANCZOS if entry.px <= THUMB_PX else Image.Resampling.BICUBIC)
            out = io.BytesIO()
            # method 2: most of WebP's size gain for a fraction of method 4's (the default) encoding time.
            image.save(out, "WEBP", quality=80, method=2)
            data = out.getvalue()
        except ImageError as exc:
            self._remember(entry, str(exc))
            raise
        finally:
            self._slots.release()
        self._store(entry, data)
        return data

    def _remember(self, entry: Entry, message: str) -> None:
        with self._lock:
            self._failures[entry.key] = message
            self._failures.move_to_end(entry.key)
            while len(self._failures) > FAILURES_REMEMBERED:
                self._failures.popitem(last=False)

    def _store(self, entry: Entry, data: bytes) -> None:
        target = self._file(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A cache file, not a photo: temp file + rename, so a reader never sees half a picture.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".webp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The row's earlier picture at this size belongs to a file that has changed since: it goes now.
        freed = 0
        for old in target.parent.glob(f"{entry.row_id}-{entry.px}-*.webp"):
            if old.name != target.name:
                freed += _unlink(old)
        with self._lock:
            if self._bytes is not None:
                self._bytes += len(data) - freed
            over = self._bytes is None or self._bytes > self.max_bytes
        if over:
            self.enforce_bound()

    # -- keeping the folder small ---------------------------------------------------------------------------

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        found: list[tuple[Path, os.stat_result]] = []
        try:
            folders = list(os.scandir(self.root))
        except OSError:
            return found
        for folder in folders:
            if not folder.is_dir(follow_symlinks=False):
                continue
            try:
                with os.scandir(folder.path) as entries:
                    for item in entries:
                        try:
                            found.append((Path(item.path), item.stat(follow_symlinks=False)))
                        except OSError:
                            continue
            except OSError:
                continue
        return found

    def enforce_bound(self) -> int:
        """Count the cache and, when it holds more than ``max_bytes``, delete the least recently served
        pictures until it holds at most 80% of it. Returns how many were deleted. Raises nothing."""
        files = sorted(((p, s) for p, s in self._files() if _NAME.match(p.name)), key=lambda f: f[1].st_atime_ns)
        total = sum(s.st_size for _, s in files)
        deleted = 0
        if total > self.max_bytes:
            goal = int(self.max_bytes * _EVICT_TO)
            for path, st in files:
                if total <= goal:
                    break
                if _unlink(path):
                    total -= st.st_size
                    deleted += 1
            log.info("thumbnail cache over %d MB: %d least recently used pictures deleted",
                     self.max_bytes >> 20, deleted)
        with self._lock:
            self._bytes = total
        return deleted

    def prune(self, current_key: CurrentKey, stop: threading.Event | None = None) -> int:
        """Delete the pictures whose row is gone, may no longer be shown, or whose file changed
        (``current_key`` says what each row's key is now), leftovers of older cache layouts and stale temp
        files; then apply the size bound. Returns how many files were deleted. Raises nothing but what
        ``current_key`` raises."""
        deleted = 0
        now = time.time()
        keys: dict[tuple[int, int], str | None] = {}
        for path, st in self._files():
            if stop is not None and stop.is_set():
                return deleted
            match = _NAME.match(path.name)
            if match is None:
                if not path.name.startswith(".tmp-") or now - st.st_mtime > _STALE_TMP_SECONDS:
                    deleted += bool(_unlink(path))
                continue
            row_px = (int(match.group(1)), int(match.group(2)))
            if row_px not in keys:
                keys[row_px] = current_key(*row_px)
            if keys[row_px] != match.group(3):
                deleted += bool(_unlink(path))
        self.enforce_bound()
        return deleted


def _unlink(path: Path) -> int:
    """Delete ``path``; its size when it was deleted, else 0."""
    try:
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return 0
    return max(size, 1)


class Pruner:
    """The sweep of a ThumbnailCache at start and every PRUNE_SECONDS, on its own thread (stopped and joined
    by :meth:`stop`)."""

    def __init__(self, sweep: Callable[[threading.Event], int], every: float = PRUNE_SECONDS) -> None:
        self._sweep = sweep
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thumbnail-prune", daemon=True)

    def start(self) -> None:
        """Run the first sweep now (in the background) and then every ``every`` seconds."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sweeping (a sweep under way stops at its next file) and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deleted = self._sweep(self._stop)
                if deleted:
                    log.info("thumbnail cache: %d pictures of photos gone or changed deleted", deleted)
            except Exception as exc:  # a sweep that fails (index locked, folder unreadable) waits for the next
                log.warning("thumbnail cache sweep failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
            if self._stop.wait(self._every):
                return
