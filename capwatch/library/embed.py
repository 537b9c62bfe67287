"""Image embeddings made where images are captioned or scanned, and stored in the index.

One decode per file: :func:`decode_pair` decodes a file once and preprocesses the same pixels for the captioner
and the embedder. Files that are not captioned (a person's description kept, a file already captioned, a library
captioned before search by meaning was on) are embedded alone by :func:`embed_paths` / :func:`fill_missing`, in
batches of ``[embed] batch_size``.
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
from capwatch.library.vectors import Vectors

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder

log = logging.getLogger(__name__)


def open_embedder_if_available(config: Config, env: Mapping[str, str] = os.environ, *,
                               download: bool = True) -> ImageTextEmbedder | None:
    """The configured embedder, or None when ``[embed] model = "off"`` or the model cannot be had (not cached
    and offline, a broken folder): captioning goes on without embeddings then, and the reason is logged once
    (visible with -v). Never raises for the model."""
    from capwatch.models.embedding import open_embedder

    try:
        return open_embedder(config, env, download=download)
    except CapwatchError as exc:
        log.debug("search by meaning is off for this run: %s", exc)
        return None


def _target(captioner: Captioner | None, embedder: ImageTextEmbedder) -> tuple[int, int] | None:
    """The decode size that serves both models: the larger of their input sizes (a draft decode never goes
    below what either needs)."""
    sizes = [s for s in (getattr(getattr(captioner, "preprocessor", None), "output_size", None),
                         embedder.preprocessor.output_size) if s is not None]
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def decode_pair(captioner: Captioner, embedder: ImageTextEmbedder | None, path: Path) -> tuple[Any, Any]:
    """The captioner's and the embedder's inputs for ``path`` from one decode (the embedder's None without an
    embedder). Raises ImageError (one line) when the file cannot be decoded."""
    if embedder is None:
        return captioner.preprocess_file(path), None
    from capwatch.models.preprocess import load_image

    image = load_image(path, target_size=_target(captioner, embedder))
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


def store(index: Index, model: str, items: Sequence[tuple[str, str | None, Any]]) -> int:
    """Store (path, fingerprint, vector) of ``model``; returns how many rows got one."""
    return Vectors(index).put_many((path, model, fingerprint, vector) for path, fingerprint, vector in items)


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
                progress: Callable[[int], None] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Decode and embed (path, fingerprint) items without captioning them, in batches; returns (embedded,
    [(path, error)]) — a file that cannot be decoded is skipped with its error (its caption row is left as it
    is). Raises IndexUnavailable when the index cannot be written."""
    from capwatch.models.preprocess import load_image

    done = 0
    failures: list[tuple[str, str]] = []
    size = max(1, embedder.batch_size)
    target = _target(None, embedder)
    for start in range(0, len(items), size):
        ready: list[tuple[str, str | None]] = []
        pixels = []
        for path, fingerprint in items[start:start + size]:
            try:
                image = load_image(Path(path), target_size=target)
                try:
                    pixels.append(embedder.preprocess_image(image))
                finally:
                    image.close()
                ready.append((path, fingerprint))
            except ImageError as exc:
                failures.append((path, str(exc)))
            except OSError as exc:
                failures.append((path, f"{path}: {exc.strerror or exc}"))
        vectors = embed_pixels(embedder, pixels)
        if vectors is None:
            failures += [(path, f"{path}: the embedding model could not run") for path, _ in ready]
            continue
        done += store(index, embedder.model_id, [(p, f, v) for (p, f), v in zip(ready, vectors, strict=True)])
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


def query_embedder(config: Config, env: Mapping[str, str] = os.environ) -> tuple[ImageTextEmbedder | None, str]:
    """The embedder for search queries (never downloads: a search does not pull a model) and, when there is none,
    why not in a few words."""
    if config.embed.off:
        return None, 'search by meaning is off ([embed] model = "off")'
    from capwatch.models.embedding import open_embedder

    try:
        embedder = open_embedder(config, env, download=False)
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
