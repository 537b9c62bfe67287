"""The page's parts that compare pictures by meaning: the query's text embedding for the search grid (the
embedding model loaded once, on the first search that needs it), "Similar photos" on the photo page, and the
duplicates view.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capwatch.config import Config
from capwatch.errors import CapwatchError
from capwatch.library import codesfile
from capwatch.library.duplicates import DEFAULT_THRESHOLD, group
from capwatch.library.index import Index
from capwatch.library.meaning import meaning_text
from capwatch.library.moments import nearest_assets
from capwatch.library.search import parse_query
from capwatch.library.vectors import Vectors

if TYPE_CHECKING:
    from capwatch.models.embedding import ImageTextEmbedder

log = logging.getLogger(__name__)
#: Photos shown under "Similar photos".
SIMILAR = 12
#: The duplicates view compares at most this many images (the CLI has no limit).
DUPLICATES_MAX = 200_000


def request_vectors(index: Index) -> Vectors:
    """The vectors of a request's own ``index``, their codes mapped from the file kept in the cache (one per model
    and index, capwatch.library.codesfile) rather than read out of the index at every request: 64 MB at a million
    images, ~70 ms of each "Similar photos" on a 2-core Zen 3."""
    return Vectors(index, codes_dir=codesfile.kept_directory())


class MeaningSlot:
    """The embedding model for queries, shared by the server's threads (one text embedded at a time). Loaded on
    the first search with plain words; when it cannot be had, searches are by words (logged once)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._embedder: ImageTextEmbedder | None = None
        self._tried = False

    def _get(self) -> ImageTextEmbedder | None:
        if not self._tried:
            from capwatch.library.embed import query_embedder

            self._embedder, why = query_embedder(self._config)
            self._tried = True
            if self._embedder is None:
                log.info("the search grid finds by words only: %s", why)
        return self._embedder

    def model_id(self) -> str | None:
        """The id of the configured embedding model, or None when it cannot be had."""
        with self._lock:
            embedder = self._get()
            return None if embedder is None else embedder.model_id

    def query_vector(self, index: Index, query: str) -> Any:
        """The query's :class:`capwatch.library.meaning.QueryVector`, or None (no plain words, no model, no
        vectors of it in the index, or the model failed: logged)."""
        from capwatch.library.embed import query_vector

        try:
            text = meaning_text(parse_query(query))
        except CapwatchError:
            return None  # the word search reports the query's error
        if not text:
            return None
        with self._lock:
            embedder = self._get()
            if embedder is None:
                return None
            try:
                vector, _ = query_vector(index, embedder, text)
            except CapwatchError as exc:
                log.warning("searching by words only: %s", exc)
                return None
            return vector

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
            self._embedder = None


@dataclass(frozen=True)
class SimilarPhoto:
    """One tile under "Similar photos"."""

    row_id: int
    caption: str
    similarity: float


def similar_photos(index: Index, row_id: int, model: str | None, limit: int = SIMILAR) -> list[SimilarPhoto]:
    """The photos most like row ``row_id`` (itself left out), by the vectors of ``model`` (or the index's only
    model when ``model`` has none there); empty when the photo has no vector."""
    store = request_vectors(index)
    models = [m.model for m in store.models()]
    chosen = model if model in models else (models[0] if len(models) == 1 else None)
    record = index.get_by_id(row_id)
    if chosen is None or record is None:
        return []
    vector = store.vector_of(record.path, chosen)
    if vector is None:
        return []
    out = []
    # A video once, and never its own moments (capwatch.library.moments).
    for hit in nearest_assets(store, index, chosen, vector, limit=limit, exclude=[row_id]):
        found = index.get_by_id(hit.image_id)
        if found is not None:
            out.append(SimilarPhoto(hit.image_id, found.caption or "", hit.similarity))
    return out


@dataclass(frozen=True)
class DuplicateTile:
    row_id: int
    path: str


@dataclass(frozen=True)
class DuplicateSet:
    similarity: float
    tiles: tuple[DuplicateTile, ...]


def duplicate_sets(index: Index, model: str | None, *, folder: str | None = None,
                   threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateSet]:
    """Groups of near-identical photos (below ``folder``), as `capwatch duplicates` finds them."""
    store = Vectors(index)
    models = [m.model for m in store.models()]
    chosen = model if model in models else (models[0] if len(models) == 1 else None)
    if chosen is None:
        return []
    paths, matrix = store.all_vectors(chosen, folder)
    if not paths:
        return []
    paths, matrix = paths[:DUPLICATES_MAX], matrix[:DUPLICATES_MAX]
    groups = group(paths, matrix, threshold)
    ids = index.ids_for(p for g in groups for p in g.paths)
    return [DuplicateSet(g.similarity, tuple(DuplicateTile(ids[p], p) for p in g.paths if p in ids))
            for g in groups]
