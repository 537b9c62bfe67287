"""Image embeddings made where images are captioned or scanned, and stored in the index.

One decode per file: :func:`decode_pair` decodes a file once and preprocesses the same pixels for the captioner
and the embedder. A video is embedded at each of its chosen frames (:func:`video_moments`; its own vector is its
representative frame's, the others are its moments, see capwatch.library.moments), decoded once through the
caller's :class:`capwatch.models.frames.FrameCache`. Files that are not captioned (a person's description kept,
a file already captioned, a library captioned before search by meaning was on) are embedded alone by
:func:`embed_paths` / :func:`fill_missing`, in batches of ``[embed] batch_size``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capwatch.config import Config
from capwatch.errors import CapwatchError, ImageError
from capwatch.library.index import Index, normalise_path
from capwatch.library.moments import VideoMoments
from capwatch.library.vectors import Vectors
from capwatch.library.videos import is_video

if TYPE_CHECKING:
    from PIL import Image

    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder
    from capwatch.models.frames import FrameCache

log = logging.getLogger(__name__)


def open_embedder_if_available(config: Config, env: Mapping[str, str] = os.environ, *,
                               download: bool = True) -> ImageTextEmbedder | None:
    """The configured embedder, or None when ``[embed] model = "off"`` or the model cannot be had (not cached
    and offline, a broken folder): captioning goes on without embeddings then, and the reason is logged once
    (visible with -v). Never raises for the model. Its graphs run rewritten where that is exact and faster
    (the derived cache, as the captioner's: int8 weights signed on VNNI CPUs, the text graph pre-optimised)."""
    from capwatch.models.derived import DerivedCache
    from capwatch.models.embedding import open_embedder

    try:
        return open_embedder(config, env, download=download, derived=DerivedCache.from_env(env))
    except CapwatchError as exc:
        log.debug("search by meaning is off for this run: %s", exc)
        return None


def _target(captioner: Captioner | None, embedder: ImageTextEmbedder | None) -> tuple[int, int] | None:
    """The decode size that serves both models: the larger of their input sizes (a draft decode never goes
    below what either needs)."""
    sizes = [s for s in (getattr(getattr(captioner, "preprocessor", None), "output_size", None),
                         getattr(getattr(embedder, "preprocessor", None), "output_size", None)) if s is not None]
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def decode_pair(captioner: Captioner, embedder: ImageTextEmbedder | None, path: Path,
                frames: FrameCache | None = None) -> tuple[Any, Any]:
    """The captioner's and the embedder's inputs for ``path`` from one decode (the embedder's None without an
    embedder); a video's frames through ``frames``. Raises ImageError (one line) when the file cannot be
    decoded."""
    from capwatch.models.preprocess import load_image

    if embedder is None:
        return captioner.preprocess_image(load_image(path, target_size=_target(captioner, None),
                                                     video_frames=frames)), None
    image = load_image(path, target_size=_target(captioner, embedder), video_frames=frames)
    try:
        return captioner.preprocess_image(image), embedder.preprocess_image(image)
    finally:
        image.close()


def embed_pixels(embedder: ImageTextEmbedder, pixels: Sequence[Any]) -> list[Any] | None:
    """Vectors for preprocessed images, or None when the model cannot run (logged; captions still land)."""
    if not pixels:
        return []
    try:
        return list(embedder.embed_pixels(np.stack(pixels)))
    except CapwatchError as exc:
        log.warning("no embeddings for this batch: %s", exc)
        return None


def store(index: Index, model: str, items: Sequence[tuple[str, str | None, Any]],
          moments: Mapping[str, VideoMoments] | None = None) -> int:
    """Store (path, fingerprint, vector) of ``model``, with the videos' ``moments`` by path; returns how many rows
    got one."""
    return Vectors(index).put_many(((path, model, fingerprint, vector) for path, fingerprint, vector in items),
                                   moments)


def moments_of_frames(embedder: ImageTextEmbedder, chosen: Sequence[tuple[float, Image.Image]]) -> VideoMoments:
    """A video's moments from its chosen frames as (seconds, image), the representative one first (its vector
    is made with the video's own): the other frames embedded in one batch. When the model cannot run on them
    (logged), the moments are the poster's alone."""
    others = chosen[1:]
    vectors = embed_pixels(embedder, [embedder.preprocess_image(image) for _, image in others])
    if vectors is None:
        return VideoMoments(chosen[0][0])
    return VideoMoments(chosen[0][0], tuple((at, v) for (at, _), v in zip(others, vectors, strict=True)))


def video_moments(embedder: ImageTextEmbedder, path: str | Path, frames: FrameCache,
                  fmt: str | None = None) -> VideoMoments | None:
    """The moments of the video at ``path`` (None for a photo: not a video by its ``fmt`` or name), its frames
    through ``frames`` (decoded once with the caption). Raises ImageError when the video cannot be decoded."""
    if not is_video(path, fmt):
        return None
    chosen = frames.get(Path(path)).chosen
    return moments_of_frames(embedder, [(f.at, f.image) for f in chosen])


def lacking(index: Index, model: str, paths: Sequence[str | Path]) -> list[tuple[str, str | None]]:
    """(path, fingerprint) of those of ``paths`` whose row has no current vector of ``model``."""
    wanted = {normalise_path(p) for p in paths}
    if not wanted:
        return []
    found: list[tuple[str, str | None]] = []
    conn = index.connection
    chunk_list = sorted(wanted)
    for start in range(0, len(chunk_list), 500):
        chunk = chunk_list[start:start + 500]
        sql = ("SELECT i.path, i.fingerprint FROM images AS i LEFT JOIN image_vectors AS v ON v.image_id = i.id "
               f"WHERE i.path IN ({', '.join('?' * len(chunk))}) AND i.status != 'error' AND "
               "(v.image_id IS NULL OR v.model != ? OR v.fingerprint IS NOT i.fingerprint)")
        rows: list[tuple[str, str | None]] = index.guard(
            lambda sql=sql, chunk=chunk: conn.execute(sql, [*chunk, model]).fetchall())  # type: ignore[misc]
        found += rows
    return found


def embed_paths(index: Index, embedder: ImageTextEmbedder, items: Sequence[tuple[str, str | None]], *,
                progress: Callable[[int], None] | None = None,
                frames: FrameCache | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Decode and embed (path, fingerprint) items without captioning them, in batches, a video at each of its
    chosen frames (through ``frames``, or a cache of this call's own); returns (embedded, [(path, error)]) — a
    file that cannot be decoded is skipped with its error (its caption row is left as it is). Raises
    IndexUnavailable when the index cannot be written."""
    from capwatch.models.frames import FrameCache
    from capwatch.models.preprocess import load_image

    frames = frames if frames is not None else FrameCache()

    done = 0
    failures: list[tuple[str, str]] = []
    size = max(1, embedder.batch_size)
    target = _target(None, embedder)
    for start in range(0, len(items), size):
        ready: list[tuple[str, str | None]] = []
        pixels = []
        moments: dict[str, VideoMoments] = {}
        for path, fingerprint in items[start:start + size]:
            try:
                image = load_image(Path(path), target_size=target, video_frames=frames)
                try:
                    pixel = embedder.preprocess_image(image)
                finally:
                    image.close()
                found = video_moments(embedder, path, frames)
                if found is not None:
                    moments[path] = found
                pixels.append(pixel)
                ready.append((path, fingerprint))
            except ImageError as exc:
                failures.append((path, str(exc)))
            except OSError as exc:
                failures.append((path, f"{path}: {exc.strerror or exc}"))
        vectors = embed_pixels(embedder, pixels)
        if vectors is None:
            failures += [(path, f"{path}: the embedding model could not run") for path, _ in ready]
            continue
        done += store(index, embedder.model_id, [(p, f, v) for (p, f), v in zip(ready, vectors, strict=True)],
                      moments)
        if progress is not None:
            progress(done)
    return done, failures


def fill_missing(index: Index, embedder: ImageTextEmbedder, roots: Sequence[str | Path], *,
                 progress: Callable[[int], None] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Embed every indexed image below ``roots`` that lacks a current vector of the embedder's model (never
    captioning it again); returns (embedded, [(path, error)])."""
    store_ = Vectors(index)
    items: list[tuple[str, str | None]] = []
    for root in roots:
        items += store_.missing(embedder.model_id, str(root))
    return embed_paths(index, embedder, list(dict.fromkeys(items)), progress=progress)


def query_embedder(config: Config, env: Mapping[str, str] = os.environ, *,
                   load_text: bool = False) -> tuple[ImageTextEmbedder | None, str]:
    """The embedder for search queries (never downloads: a search does not pull a model) and, when there is none,
    why not in a few words. ``load_text``: its text graph starts loading at once, on another thread, while the
    caller goes on (reading the tokenizer, the index, the codes): a one-shot search."""
    if config.embed.off:
        return None, 'search by meaning is off ([embed] model = "off")'
    from capwatch.models.derived import DerivedCache
    from capwatch.models.embedding import open_embedder

    # Where this user's stamp key exists (a scan made it; a search never does), the text graph loads pre-optimised
    # (derived.optimized_graph, made at a scan's end, else by the first search): ~100 ms less of graph optimisation.
    derived = DerivedCache.existing(env)
    try:
        embedder = open_embedder(config, env, download=False, load_text=load_text, derived=derived)
    except CapwatchError as exc:
        return None, str(exc).splitlines()[0] if str(exc) else "the embedding model cannot be loaded"
    if embedder is None:  # pragma: no cover - off is handled above
        return None, "search by meaning is off"
    return embedder, ""


def query_vector(index: Index, embedder: ImageTextEmbedder | None, text: str | None) -> tuple[Any, str]:
    """The text embedding of ``text`` as a :class:`capwatch.library.meaning.QueryVector`, or (None, why not):
    no embedder, a query without plain words, or an index without vectors of the embedder's model. Raises
    ModelError when the text model cannot run."""
    from capwatch.library.meaning import QueryVector

    if not text:
        from capwatch.library.meaning import NO_PLAIN_WORDS

        return None, NO_PLAIN_WORDS
    if embedder is None:
        return None, "no embedding model"
    model = embedder.model_id
    if Vectors(index).count(model) == 0:
        return None, (f"no image in the index has an embedding of {model} yet; `capwatch scan` fills them in")
    return QueryVector(model, embedder.embed_texts([text])[0]), ""
