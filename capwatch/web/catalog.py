"""What the pages ask of the index: one page of search results, a listing by date or status, one photo.

:func:`run_search` is the only place that calls into the search language (``parse_query``, ``make_filters``,
``Index.search``): when the query language grows (fields, snippets), that one function is what changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from capwatch.library.index import ImageRecord, Index, SearchHit
from capwatch.library.search import SearchFilters, make_filters, parse_query

#: Marks around matched words in a highlighted caption: private-use characters that no caption carries, so the
#: caption can be HTML-escaped first and the marks turned into <mark> afterwards.
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
#: Longest query accepted (a browser can send much more; nobody types it).
MAX_QUERY = 1000

StatusFilter = Literal["pending", "error"]


@dataclass(frozen=True)
class FormFilters:
    """The search form's filters as typed (strings, validated by :func:`run_search`)."""

    folder: str | None = None
    since: str | None = None
    until: str | None = None
    source: str | None = None
    status: StatusFilter | None = None
    #: Search results by rank ("score") or newest date taken first ("date").
    sort: Literal["score", "date"] = "score"


#: How a search hit's field is named on the page.
FIELD_LABELS = {"keywords": "keywords", "text": "text in image", "model_caption": "model's caption"}


@dataclass(frozen=True)
class Result:
    """One tile of the grid: the row id (the only handle the pages use), caption with marks, record fields."""

    row_id: int
    path: str
    caption: str
    highlighted: str
    source: str | None
    taken_at: str | None
    status: str
    #: Why a search hit matched when its caption does not show it: ("keywords" | "text in image" | ..., snippet
    #: with marks); None otherwise.
    why: tuple[str, str] | None = None
    #: The similarity of a hit found by meaning only (no word matched); None otherwise.
    meaning: float | None = None
    #: A video found by meaning: the moment (seconds) that matched best; its tile plays from there.
    at: float | None = None


@dataclass(frozen=True)
class ResultPage:
    results: tuple[Result, ...]
    page: int
    has_next: bool


def _filters(form: FormFilters) -> SearchFilters:
    """Raises QueryError (one line) for dates or a source the CLI would refuse too."""
    return make_filters(in_dir=form.folder or None, since=form.since or None, until=form.until or None,
                        source=form.source or None)


def run_search(index: Index, query: str, form: FormFilters, *, offset: int, limit: int,
               vector: Any = None) -> list[SearchHit]:
    """Ranked hits ``offset .. offset+limit`` for ``query`` as `capwatch search` finds them (same parser, same
    errors: raises QueryError with the CLI's one line); with the query's text embedding (``vector``, a
    QueryVector) words and meaning in one list, as `capwatch search --by both`."""
    if len(query) > MAX_QUERY:
        from capwatch.errors import QueryError

        raise QueryError(f"query too long ({len(query)} characters; at most {MAX_QUERY})")
    parsed = parse_query(query)
    if vector is not None:
        from capwatch.library.meaning import search
        from capwatch.web.meaning import request_vectors

        return search(index, parsed, _filters(form), by="both", vector=vector, limit=offset + limit,
                      highlight=(MARK_OPEN, MARK_CLOSE), sort=form.sort, vectors=request_vectors(index))[offset:]
    hits = index.search(parsed, _filters(form), limit=offset + limit, highlight=(MARK_OPEN, MARK_CLOSE),
                        sort=form.sort)
    return hits[offset:]


def results_page(index: Index, query: str, form: FormFilters, *, page: int, page_size: int,
                 vector: Any = None) -> ResultPage:
    """Page ``page`` (1-based) of results: ranked search hits when there are words and no status filter; otherwise
    a listing, newest first (with a status filter the words must appear in the path: such files have no caption).
    Raises QueryError for a query or filter the CLI would refuse."""
    offset = (page - 1) * page_size
    words = query.strip()
    if words and form.status is None:
        hits = run_search(index, words, form, offset=offset, limit=page_size + 1, vector=vector)
        ids = index.ids_for(h.path for h in hits[:page_size])
        # A hit's status is not looked up (one query per tile): a hit without a caption matched by its path.
        results = tuple(
            Result(ids[h.path], h.path, h.caption, h.highlighted or h.caption, h.source, h.taken_at, "",
                   (FIELD_LABELS[h.field], h.snippet) if h.field in FIELD_LABELS and h.snippet else None,
                   h.similarity if h.match == "meaning" else None, h.at)
            for h in hits[:page_size] if h.path in ids
        )
        return ResultPage(results, page, len(hits) > page_size)
    filters = _filters(form)
    if len(words) > MAX_QUERY:
        from capwatch.errors import QueryError

        raise QueryError(f"query too long ({len(words)} characters; at most {MAX_QUERY})")
    rows = index.browse(filters, status=form.status, path_words=tuple(words.split()), offset=offset,
                        limit=page_size + 1)
    results = tuple(_from_record(rid, rec) for rid, rec in rows[:page_size])
    return ResultPage(results, page, len(rows) > page_size)


def _from_record(row_id: int, record: ImageRecord) -> Result:
    caption = record.caption or ""
    return Result(row_id, record.path, caption, caption, record.source, record.taken_at, record.status)
