"""A video's moments in search by meaning (schema 9): the embeddings of its chosen frames, each with its time.

A video has one vector in ``image_vectors`` like a photo: its representative frame (the poster), with that frame's
time in ``image_vectors.at``. Its other chosen frames (:attr:`capwatch.models.frames.VideoFrames.chosen`) are kept
in ``frame_vectors``, and their sign bits sit in ``vector_blocks`` beside the images' under the key ``-id`` (an
image's key is its row id, always positive), so the one scan over the blocks finds moments and images alike.

What the rest of the search sees stays per asset: :func:`nearest_assets` turns the keys the vector search ranks
into images, a video once, at its best-matching moment (``at``), and applies the caller's filters and exclusions
to the image a moment belongs to. ``similar`` and ``duplicates`` compare the images' own vectors (a video's poster),
so a video's moments are never found as near-copies of each other.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capwatch.library.index import Index

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from capwatch.library.vectors import Vectors


@dataclass(frozen=True)
class VideoMoments:
    """The embedded moments of one video: the representative frame's time (its vector is the video's own, in
    ``image_vectors``) and (time, vector) of each other chosen frame."""

    poster_at: float
    frames: tuple[tuple[float, Any], ...] = ()


@dataclass(frozen=True)
class AssetHit:
    """An image (or video) found by meaning: its row id, the exact cosine of its best entry and, for a video,
    the time in seconds of the moment that matched best (None for a photo)."""

    image_id: int
    similarity: float
    at: float | None


def clock(seconds: float) -> str:
    """A moment as people read it: m:ss, or h:mm:ss from an hour on (seconds cut, not rounded: the frame shown
    is at or after it)."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


#: How a moment's key in vector_blocks reads: ``-frame_vectors.id`` (negative; images keep their row id).
FRAME_ROWS_SQL = "SELECT -id, vector FROM frame_vectors WHERE model = ? AND id IN ({marks})"


def replace_frames(conn: sqlite3.Connection, image_id: int, model: str, dim: int,
                   moments: VideoMoments | None) -> list[tuple[int, npt.NDArray[np.float32]]]:
    """Inside the caller's transaction: drop ``image_id``'s moments and store ``moments`` (unit vectors), setting
    the poster's time; returns (key, vector) of the new moments for the sign-bit blocks. Raises VectorError when a
    moment's width is not ``dim``."""
    import numpy as np

    from capwatch.library.vectors import VectorError

    conn.execute("DELETE FROM frame_vectors WHERE image_id = ?", (image_id,))
    conn.execute("UPDATE image_vectors SET at = ? WHERE image_id = ?",
                 (None if moments is None else float(moments.poster_at), image_id))
    if moments is None:
        return []
    out: list[tuple[int, npt.NDArray[np.float32]]] = []
    for at, raw in moments.frames:
        vector = np.asarray(raw, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        vector = vector / norm if norm > 0 else vector
        if vector.shape[0] != dim:
            raise VectorError(f"embedding model {model} gave a {vector.shape[0]}-d vector for a video moment, "
                              f"but its images have {dim}-d ones")
        cursor = conn.execute("INSERT INTO frame_vectors (image_id, model, at, vector) VALUES (?, ?, ?, ?)",
                              (image_id, model, float(at), vector.astype("<f4").tobytes()))
        assert cursor.lastrowid is not None
        out.append((-int(cursor.lastrowid), vector))
    return out


def _rows(index: Index, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = index.guard(functools.partial(_fetch, index.connection, sql, params))
    return rows


def _fetch(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
    return rows


def owners(index: Index, keys: Iterable[int]) -> dict[int, tuple[int, float | None]]:
    """``key -> (image id, at)`` for entry keys of the sign-bit blocks: an image's own (its poster's time, None
    for a photo) and a moment's (its video and time). Keys whose rows are gone are left out."""
    wanted = list(dict.fromkeys(int(k) for k in keys))
    found: dict[int, tuple[int, float | None]] = {}
    for positive in (True, False):
        chosen = [k if positive else -k for k in wanted if (k > 0) == positive]
        for start in range(0, len(chosen), 900):
            chunk = chosen[start:start + 900]
            marks = ", ".join("?" * len(chunk))
            sql = (f"SELECT image_id, image_id, at FROM image_vectors WHERE image_id IN ({marks})" if positive
                   else f"SELECT -id, image_id, at FROM frame_vectors WHERE id IN ({marks})")
            for key, image_id, at in _rows(index, sql, chunk):
                found[int(key)] = (int(image_id), None if at is None else float(at))
    return found


def frames_of(index: Index, image_ids: Iterable[int]) -> list[int]:
    """The keys of the moments of ``image_ids`` (to leave a video's own moments out beside the video)."""
    ids = [int(i) for i in image_ids]
    if not ids:
        return []
    sql = f"SELECT -id FROM frame_vectors WHERE image_id IN ({', '.join('?' * len(ids))})"
    return [int(r[0]) for r in _rows(index, sql, ids)]


def moment_count(index: Index, model: str) -> int:
    """How many moments of ``model`` the index holds (0 before any video was embedded)."""
    rows = _rows(index, "SELECT frames FROM vector_models WHERE model = ?", (model,))
    return int(rows[0][0]) if rows else 0


def collapse(index: Index, ranked: Sequence[tuple[int, float]]) -> list[AssetHit]:
    """Entry keys ranked best first -> one hit per image, at its best entry (a video at its best moment)."""
    owner = owners(index, [k for k, _ in ranked])
    out: list[AssetHit] = []
    seen: set[int] = set()
    for key, similarity in ranked:
        found = owner.get(int(key))
        if found is None or found[0] in seen:
            continue
        seen.add(found[0])
        out.append(AssetHit(found[0], float(similarity), found[1]))
    return out


def nearest_assets(vectors: Vectors, index: Index, model: str, query: Any, *, limit: int = 20,
                   allowed: Callable[[list[int]], set[int]] | None = None,
                   exclude: Iterable[int] = ()) -> list[AssetHit]:
    """The ``limit`` images nearest to ``query`` by :meth:`Vectors.nearest`, a video once at its best moment.
    ``allowed`` and ``exclude`` speak of image ids (a moment passes when its video does; excluding a video
    excludes its moments). Without moments in the index this is :meth:`Vectors.nearest` itself. Raises
    IndexUnavailable."""
    skip = {int(i) for i in exclude}
    if moment_count(index, model) == 0:
        # Every key is an image's own; the lookup of the results' rows gives a one-frame video its poster's time.
        return collapse(index, vectors.nearest(model, query, limit=limit, allowed=allowed, exclude=skip))
    skip_keys = skip | set(frames_of(index, skip))
    keyed: Callable[[list[int]], set[int]] | None = None
    if allowed is not None:
        images_allowed = allowed

        def keyed(keys: list[int]) -> set[int]:
            owner = owners(index, keys)
            passing = images_allowed(sorted({image for image, _ in owner.values()}))
            return {k for k, (image, _) in owner.items() if image in passing}

    # A video holds up to 1 + EXTRA entries: ask for a few more keys than images wanted, and more again until
    # `limit` images are among them (or every entry was looked at: fewer came back than were asked for). The
    # search's exact stage reads 6 vectors per key asked for, so asking for twice as many cost 1.6x (bench/moments.py).
    want = limit + max(2, limit // 4)
    while True:
        ranked = vectors.nearest(model, query, limit=want, allowed=keyed, exclude=skip_keys)
        hits = collapse(index, ranked)
        if len(hits) >= limit or len(ranked) < want:
            return hits[:limit]
        want = want + 2 * (limit - len(hits)) + max(2, limit // 4)
