"""Search by meaning beside search by words: which part of a query is meant, the meaning hits (with every filter
applied), one fused list, the images most like one image, and groups of near-identical images.

The query's text embedding comes from the caller (the CLI embeds it, or asks a running daemon): this module only
needs the vector and the model id it was made with (vectors of different models are never compared).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from capwatch.library.index import Index
from capwatch.library.query import ParsedQuery, SearchFilters, is_meaning_term, meaning_text
from capwatch.library.search import SearchHit, SortOrder, build_search_sql, fuse_rankings

__all__ = ["BY", "NO_PLAIN_WORDS", "By", "QueryVector", "filter_part", "meaning_text", "search"]

if TYPE_CHECKING:
    # numpy is imported where vectors are compared: a search by words (and `status`) never loads it.
    import numpy as np
    import numpy.typing as npt

    from capwatch.library.vectors import Vectors

By = Literal["words", "meaning", "both"]
BY: tuple[By, ...] = ("words", "meaning", "both")
#: Why a query has no meaning part.
NO_PLAIN_WORDS = "the query has no plain words to look for by meaning (fields and quoted phrases are words)"
#: How deep each ranking goes before fusion (at least the number of results asked for).
FUSION_DEPTH = 50


def filter_part(query: ParsedQuery) -> ParsedQuery:
    """What a meaning hit must still satisfy: the groups that are word searches (fields, phrases) and every
    exclusion. Empty (no groups, nothing excluded) for a query of plain words."""
    groups = tuple(g for g in query.groups if not all(is_meaning_term(t) for t in g))
    return ParsedQuery(groups, query.excluded)


@dataclass(frozen=True)
class QueryVector:
    """The query's text embedding and the id of the model that made it."""

    model: str
    #: float32 values (a numpy array, or an ``array("f")`` from a running daemon: numpy is then not loaded).
    vector: npt.NDArray[np.float32] | Sequence[float]
    #: The nearest images to it, unfiltered, as (row id, cosine) best first, when a running daemon that holds
    #: the vectors in memory already searched them (capwatch.daemon.textserver); None: search here.
    nearest: tuple[tuple[int, float], ...] | None = None
    #: True when ``nearest`` holds every image the daemon has a vector for (it gave fewer than were asked for):
    #: a search here could find no other.
    complete: bool = False
    #: (row id, seconds) of the videos in ``nearest`` at the moment that matched best (capwatch.library.moments).
    moments: tuple[tuple[int, float], ...] = ()


def _allowed(index: Index, query: ParsedQuery, filters: SearchFilters) -> Callable[[list[int]], set[int]]:
    """A function giving which of some row ids pass ``filters`` and ``filter_part(query)``."""
    rest = filter_part(query)

    def allowed(ids: list[int]) -> set[int]:
        passing: set[int] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            sql, params = build_search_sql(rest, filters, limit=len(chunk), ids_only=True, only_ids=chunk)
            rows: list[tuple[int]] = index.guard(functools.partial(_fetch, index, sql, params))
            passing.update(int(r[0]) for r in rows)
        return passing

    return allowed


def _fetch(index: Index, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = index.connection.execute(sql, params).fetchall()
    return rows


def _hits_for(index: Index, ids: Sequence[int]) -> dict[int, SearchHit]:
    """Plain hits (caption unmarked) for row ids, as a meaning-only hit shows them."""
    found: dict[int, SearchHit] = {}
    for start in range(0, len(ids), 500):
        chunk = [int(i) for i in ids[start:start + 500]]
        sql = (f"SELECT id, path, caption, source, model, taken_at, sort_date FROM images "
               f"WHERE id IN ({', '.join('?' * len(chunk))})")
        rows: list[tuple[int, str, str | None, str | None, str | None, str | None, str]] = index.guard(
            functools.partial(_fetch, index, sql, chunk))
        for row_id, path, caption, source, model, taken_at, date in rows:
            caption = caption or ""
            found[int(row_id)] = SearchHit(path=path, caption=caption, highlighted=caption, score=0.0,
                                           source=source,  # type: ignore[arg-type]  # CHECK constraint
                                           model=model, taken_at=taken_at, field=None,
                                           snippet=caption, match="meaning", date=date)
    return found


def search(index: Index, query: ParsedQuery, filters: SearchFilters, *, by: By, vector: QueryVector | None,
           limit: int = 20, highlight: tuple[str, str] = ("[", "]"), sort: SortOrder = "score",
           vectors: Vectors | None = None) -> list[SearchHit]:
    """Hits for ``query`` by words, by meaning or both fused into one list (reciprocal rank fusion of the bm25
    ranking and the cosine ranking), ``limit`` at most, each with ``similarity`` (None without a vector) and
    ``match``. Without ``vector`` (or for a query with no plain words), ``both`` is words only and ``meaning``
    finds nothing. ``sort="date"`` orders the same hits newest first. ``vectors``: the index's vectors as the caller
    holds them (codes in memory, or being read ahead); a new :class:`Vectors` of ``index`` when None. Raises
    IndexUnavailable for database problems."""
    text = meaning_text(query)
    use_meaning = by != "words" and vector is not None and text is not None
    if not use_meaning:
        return index.search(query, filters, limit=limit, highlight=highlight, sort=sort) if by != "meaning" else []
    assert vector is not None
    depth = max(limit, FUSION_DEPTH)
    words = index.search(query, filters, limit=depth, highlight=highlight) if by != "meaning" else []
    allowed = _allowed(index, query, filters)
    near: list[tuple[int, float]] = []
    at: dict[int, float] = {}  # a video's best-matching moment, in seconds (issue 23)
    if vector.nearest is not None:
        hinted = [i for i, _ in vector.nearest]
        passing = allowed(hinted) if hinted else set()
        near = [(i, s) for i, s in vector.nearest if i in passing][:depth]
        at = dict(vector.moments)
    # numpy and the vectors are loaded only when this process compares vectors itself (a daemon's answer that
    # covers the results needs neither).
    if len(near) < depth and not vector.complete:  # no daemon's answer, or too few of its images pass the filters
        from capwatch.library.moments import nearest_assets
        from capwatch.library.vectors import Vectors

        vectors = vectors or Vectors(index)
        assets = nearest_assets(vectors, index, vector.model, vector.vector, limit=depth, allowed=allowed)
        near = [(h.image_id, h.similarity) for h in assets]
        at = {h.image_id: h.at for h in assets if h.at is not None}
    similarity = dict(near)
    ids = index.ids_for(h.path for h in words)
    word_ids = [ids[h.path] for h in words if h.path in ids]
    if by == "meaning":
        ranking = [i for i, _ in near][:limit]
        fused = [(str(i), s) for i, s in near[:limit]]
    else:
        fused = fuse_rankings([[str(i) for i in word_ids], [str(i) for i, _ in near]])[:limit]
        ranking = [int(key) for key, _ in fused]
    missing = [i for i in ranking if i not in similarity]
    if missing:
        import numpy as np

        from capwatch.library.vectors import Vectors

        values = np.asarray(vector.vector, dtype=np.float32)
        q = values / max(float(np.linalg.norm(values)), 1e-12)
        for row_id, vec in (vectors or Vectors(index)).vectors_of(missing, vector.model).items():
            similarity[row_id] = float(vec @ q)
    by_id = {ids[h.path]: h for h in words if h.path in ids}
    plain = _hits_for(index, [i for i in ranking if i not in by_id])
    out: list[SearchHit] = []
    near_ids = {i for i, _ in near}
    for (_key, score), row_id in zip(fused, ranking, strict=True):
        if row_id in by_id:
            hit = replace(by_id[row_id], match="both" if row_id in near_ids else "words")
        elif row_id in plain:
            hit = plain[row_id]
        else:  # removed between the two statements
            continue
        out.append(replace(hit, score=float(score), similarity=similarity.get(row_id),
                           at=at.get(row_id) if row_id in near_ids else None))
    return _by_date(out) if sort == "date" else out


def _by_date(hits: list[SearchHit]) -> list[SearchHit]:
    return sorted(hits, key=lambda h: h.taken_at or "", reverse=True)
