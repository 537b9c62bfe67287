"""Searching the index by words: the SQL that finds and ranks matches (FTS5 bm25, the OCR trigram index, the
images table), the marking of where a query matched (highlights and snippets), and the fusion of word and meaning
rankings into one list.

The query language itself (parsing, dates, filters) is in :mod:`capwatch.library.query`; its public names are
re-exported here, so ``from capwatch.library.search import parse_query`` keeps working.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from capwatch.library.query import (
    CompiledQuery,
    ParsedQuery,
    SearchFilters,
    Term,
    cjk_spaced,
    contains_exact,
    fold_words,
    is_cjk,
    make_filters,
    normalise_path,
    parse_date_bound,
    parse_query,
    prefix_range,
)

__all__ = [
    "RANK_WINDOW",
    "RRF_K",
    "CompiledQuery",
    "Match",
    "ParsedQuery",
    "SearchFilters",
    "SearchHit",
    "SortOrder",
    "Term",
    "build_search_sql",
    "build_window_sql",
    "cjk_spaced",
    "contains_exact",
    "fold_words",
    "fuse_rankings",
    "is_cjk",
    "make_filters",
    "normalise_path",
    "parse_date_bound",
    "parse_query",
    "prefix_range",
    "register_functions",
    "word_search",
]

Source = Literal["model", "human", "embedded"]
Match = Literal["words", "meaning", "both"]


@dataclass(frozen=True)
class SearchHit:
    """One search result; ``score`` is bm25 turned around so that higher is better (0.0 when nothing ranks it:
    a query of ``text:`` substrings ORed with words, or a hit found by meaning only); in a fused list it is the
    fused score (reciprocal rank fusion, see :func:`fuse_rankings`).

    ``highlighted`` is the caption with the hits marked; ``field`` says where the query matched first
    ("caption", "keywords", "text" or "path"; None when no positive term can be pointed at) and ``snippet`` shows
    that field with the hit marked (keywords comma-separated, long text cut around the hit).
    """

    path: str
    caption: str
    highlighted: str
    score: float
    source: Source | None
    model: str | None
    taken_at: str | None
    field: str | None = None
    snippet: str = ""
    #: Cosine of the query's text embedding and the image's embedding; None when the image has no vector or the
    #: search did not look by meaning.
    similarity: float | None = None
    #: What found it: its words, its meaning (no word matched), or both.
    match: Match = "words"
    #: The date the date filters and --sort date use: ``taken_at``, else the file's time (see
    #: capwatch.library.index.record_date).
    date: str | None = None
    #: For a video found by meaning: the time in seconds of its frame that matched best (its poster's time when
    #: that was the best); None otherwise (a photo, or a video found by its words alone).
    at: float | None = None

    @property
    def date_from(self) -> Literal["taken", "file"]:
        """Where :attr:`date` comes from: the date taken (EXIF), or the file's modification time."""
        return "taken" if self.taken_at else "file"


def register_functions(conn: sqlite3.Connection) -> None:
    """Give ``conn`` the SQL functions the search statements call (``capwatch_exact``: quoted terms checked
    unstemmed). Only queries use them, never triggers, so any SQLite client can still write the index."""

    def exact(phrase: str, prefix: int, *texts: str | None) -> int:
        return int(contains_exact(phrase, bool(prefix), *texts))

    conn.create_function("capwatch_exact", -1, exact, deterministic=True)


#: At most this many matches are scored per search (the most recently indexed ones); see Index.search.
RANK_WINDOW = 10_000


SortOrder = Literal["score", "date"]


def word_search(conn: sqlite3.Connection, query: ParsedQuery, filters: SearchFilters, *, limit: int = 20,
                highlight: tuple[str, str] = ("[", "]"), window: int = RANK_WINDOW,
                sort: SortOrder = "score") -> list[SearchHit]:
    """Rows matching ``query`` and ``filters``: best bm25 first (``sort="score"``) or newest first by the date
    taken (``sort="date"``), each with the field that matched and a snippet marked with ``highlight``.

    When more than ``window`` rows match, only the ``window`` most recently indexed of them are ranked:
    scoring every one of 100 000 matches of a common word costs over 100 ms at 1 M images, and among that
    many the newest are the likelier target (a narrower query or a filter reaches the rest). ``window=0``
    ranks everything. Raises sqlite3.Error for database problems (Index.search translates them); the query
    itself cannot fail to parse.
    """
    compiled = query.compile()

    def run() -> list[Any]:
        min_rowid = None
        cut = build_window_sql(query, filters, window=window) if window > 0 else None
        if cut is not None:
            row = conn.execute(*cut).fetchone()
            min_rowid = None if row is None else int(row[0])
        if sort == "date":
            # Order the matches by date first (ids only), then mark the few shown: highlight() on every
            # match of the window would be paid before the sort could cut it.
            sql, params = build_search_sql(query, filters, limit=limit, min_rowid=min_rowid, sort="date",
                                           ids_only=True)
            ids = [int(r[0]) for r in conn.execute(sql, params).fetchall()]
            if not ids:
                return []
            sql, params = build_search_sql(query, filters, limit=limit, min_rowid=min_rowid, only_ids=ids)
            by_id = {r[0]: r for r in conn.execute(sql, params).fetchall()}
            return [by_id[i] for i in ids if i in by_id]
        sql, params = build_search_sql(query, filters, limit=limit, min_rowid=min_rowid)
        return conn.execute(sql, params).fetchall()

    rows = run()
    return [_hit(row, compiled.terms, highlight) for row in rows]


#: Marks put around hits inside SQL (never in text people write: control characters), swapped for the caller's.
_OPEN, _CLOSE = "\x02", "\x03"
#: Where to point first when several fields matched: the order of their weights.
_SNIPPET_ORDER = ((10, "caption"), (12, "keywords"), (11, "caption"), (13, "text"))


def _hit(row: Any, terms: tuple[Term, ...], marks: tuple[str, str]) -> SearchHit:
    (_, path, caption, source, model, taken_at, model_caption, keywords, ocr_text, score) = row[:10]
    caption = caption or ""

    def swap(text: str) -> str:
        return text.replace(_OPEN, marks[0]).replace(_CLOSE, marks[1])

    field: str | None = None
    snippet = ""
    for position, name in _SNIPPET_ORDER:
        text = row[position]
        if text and _OPEN in text:
            field, snippet = name, text
            break
    if field is None:
        # CJK and substring hits come from other columns (per-character copies, trigrams): mark them here. The
        # path comes last: with --in, the folder's name is part of the match and marks every path.
        originals = (("caption", caption), ("keywords", keywords), ("caption", model_caption),
                     ("text", ocr_text), ("path", row[14]), ("path", path))
        for name, text in originals:
            if text and _OPEN in text:
                field, snippet = name, text
                break
            marked = _mark_substrings(text, terms, name)
            if marked is not None:
                field, snippet = name, marked
                break
    if field == "keywords":
        snippet = snippet.replace("\n", ", ")
    elif field == "text":
        snippet = " ".join(snippet.split())
    highlighted = row[10] or caption
    if field == "caption" and snippet.replace(_OPEN, "").replace(_CLOSE, "") == caption:
        highlighted = snippet  # a CJK hit in the caption, marked above
    return SearchHit(
        path=path, caption=caption, highlighted=swap(highlighted), score=0.0 - float(score or 0.0), source=source,
        model=model, taken_at=taken_at, field=field, snippet=swap(snippet or caption),
        date=row[15] if len(row) > 15 else None,
    )


_FIELD_OF_TERM = {"caption": "caption", "keywords": "kw", "text": "text", "path": "path"}
#: Characters of text kept on each side of the first hit in a snippet made here.
_CONTEXT = 40


_SUFFIXES = ("ies", "ing", "es", "ed", "s")


def _rough_stem(word: str) -> str:
    """The start that most English forms of ``word`` share (puppies -> pup, running -> run), at least three
    letters: enough to mark a word-form hit in a snippet that FTS5 did not highlight."""
    for suffix in _SUFFIXES:
        if word.lower().endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2]:
        word = word[:-1]
    return word


def _mark_substrings(text: str | None, terms: tuple[Term, ...], field: str) -> str | None:
    """``text`` with the terms that look in ``field`` marked, cut around the first hit; None when none of them
    occurs in it. For hits no FTS5 highlight() shows: CJK (per-character copies), ``text:`` substrings
    (trigrams), and words when the images table drives the query. Words are marked from their start (their
    stemmed forms share it, mostly)."""
    if not text:
        return None
    patterns: list[str] = []
    for term in terms:
        if term.field not in (None, _FIELD_OF_TERM[field]):
            continue
        if term.substring:
            patterns.append(r"\s+".join(map(re.escape, term.text.split())))
        elif term.cjk:
            patterns += [re.escape(part) for part in term.text.split()]
        else:
            words = term.text.split() if term.phrase else [_rough_stem(term.text)]
            patterns.append(r"\b" + r"\W+".join(map(re.escape, words)) + r"\w*")
    if not patterns:
        return None
    pattern = re.compile("|".join(patterns), re.IGNORECASE)
    first = pattern.search(text)
    if first is None:
        return None
    lo, hi = max(0, first.start() - _CONTEXT), min(len(text), first.end() + _CONTEXT)
    cut = pattern.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", text[lo:hi])
    return ("…" if lo else "") + cut + ("…" if hi < len(text) else "")


def _filter_sql(query: ParsedQuery, filters: SearchFilters) -> tuple[list[str], list[Any]]:
    """The word-index MATCH (first parameter, with the --in narrowing) and the row filters of ``filters``;
    the caller adds ``images_fts MATCH ?`` itself."""
    match = query.compile().match or ""
    where: list[str] = []
    params: list[Any] = []
    if filters.in_dir is not None:
        directory = normalise_path(filters.in_dir)
        lo, hi = prefix_range(directory)
        where.append("i.path >= ? AND i.path < ?")
        params += [lo, hi]
        leaf = os.path.basename(directory.rstrip(os.sep))
        if match and any(ch.isalnum() for ch in leaf):
            # Every path below DIR contains the words of DIR's last name in the path column: letting FTS5
            # intersect on them first spares a table lookup per match; the range check stays the exact test.
            match = f'({match}) AND path : "{leaf.replace(chr(34), chr(34) * 2)}"'
    params.insert(0, match)
    if filters.since is not None:
        where.append("i.sort_date >= ?")
        params.append(filters.since)
    if filters.until is not None:
        where.append("i.sort_date < ?")
        params.append(filters.until)
    if filters.source is not None:
        where.append("i.source = ?")
        params.append(filters.source)
    return where, params


def build_window_sql(query: ParsedQuery, filters: SearchFilters, *, window: int) -> tuple[str, list[Any]] | None:
    """SQL giving the smallest row id among the ``window`` newest full-text matches, or None when the filters
    need the images table (dates, source) or the query has no word-index part: then every match is ranked,
    since the table lookups cost as much as the scoring. The SQL returns no row when fewer than ``window`` match.

    Walking a doclist backwards by rowid is cheap (no scoring, no table lookups).
    """
    if filters.since is not None or filters.until is not None or filters.source is not None:
        return None
    if query.compile().match is None:
        return None
    _, params = _filter_sql(query, filters)
    sql = "SELECT rowid FROM images_fts WHERE images_fts MATCH ? ORDER BY rowid DESC LIMIT 1 OFFSET ?"
    return sql, [params[0], window - 1]


def _conditions(compiled: CompiledQuery, skip_group: int | None) -> tuple[list[str], list[Any]]:
    """SQL conditions for the parts of ``compiled`` the driving MATCH does not cover."""
    where: list[str] = []
    params: list[Any] = []
    tri = "SELECT rowid FROM images_ocr_tri WHERE images_ocr_tri MATCH ?"
    words = "SELECT rowid FROM images_fts WHERE images_fts MATCH ?"
    for number, (tri_match, word_match) in enumerate(compiled.substring_groups):
        if number == skip_group:
            continue
        if word_match is None:
            where.append(f"i.id IN ({tri})")
            params.append(tri_match)
        else:
            where.append(f"(i.id IN ({tri}) OR i.id IN ({words}))")
            params += [tri_match, word_match]
    if compiled.exclude_match is not None:
        where.append(f"i.id NOT IN ({words})")
        params.append(compiled.exclude_match)
    for tri_match in compiled.exclude_substring:
        where.append(f"i.id NOT IN ({tri})")
        params.append(tri_match)
    for text, columns, prefix in compiled.exact:
        where.append(f"capwatch_exact(?, ?, {', '.join('i.' + c for c in columns)})")
        params += [text, int(prefix)]
    return where, params


_ROW = "i.id, i.path, i.caption, i.source, i.model, i.taken_at, i.model_caption, i.keywords, i.ocr_text"


def build_search_sql(query: ParsedQuery, filters: SearchFilters, *, limit: int, min_rowid: int | None = None,
                     sort: SortOrder = "score", ids_only: bool = False,
                     only_ids: list[int] | None = None) -> tuple[str, list[Any]]:
    """The query that :meth:`Index.search` runs (the benchmark's raw baseline runs the same SQL).

    It is driven by the word index when the query has a word part (ranked by its bm25), else by the OCR trigram
    index (its bm25), else by the images table (unranked, newest first). ``ids_only`` selects row ids only (to
    order by date before marking hits); ``only_ids`` restricts the rows to those ids. A row is ``_ROW``, the
    score, then highlight()s of caption, model caption, keywords and path and a snippet() of the OCR text
    (NULLs when the word index does not drive), then the date the date filters use (sort_date).
    """
    compiled = query.compile()
    where, params = _filter_sql(query, filters)
    match = params.pop(0)
    skip: int | None = None
    marks = [_OPEN, _CLOSE]
    if compiled.match is not None:
        source = "images_fts CROSS JOIN images AS i ON i.id = images_fts.rowid"
        where.insert(0, "images_fts MATCH ?")
        params.insert(0, match)
        score = "images_fts.rank"
        order = "images_fts.rank"
        hl = [f"highlight(images_fts, {c}, ?, ?)" for c in (0, 1, 2)]
        hl += ["snippet(images_fts, 3, ?, ?, '…', 16)", "highlight(images_fts, 4, ?, ?)"]
        hl_params = marks * 5
        if min_rowid is not None:
            # A rowid bound is applied inside FTS5 (it seeks in the doclists), so only the window gets scored.
            where.append("images_fts.rowid >= ?")
            params.append(min_rowid)
    elif any(word is None for _, word in compiled.substring_groups):
        skip = next(n for n, (_, word) in enumerate(compiled.substring_groups) if word is None)
        source = "images_ocr_tri CROSS JOIN images AS i ON i.id = images_ocr_tri.rowid"
        where.insert(0, "images_ocr_tri MATCH ?")
        params.insert(0, compiled.substring_groups[skip][0])
        score = order = "images_ocr_tri.rank"
        hl, hl_params = ["NULL"] * 5, []
    else:
        source = "images AS i"
        score, order = "0.0", "i.sort_date DESC, i.id DESC"
        hl, hl_params = ["NULL"] * 5, []
    more, more_params = _conditions(compiled, skip)
    where += more
    params += more_params
    if only_ids is not None:
        where.append(f"i.id IN ({', '.join('?' * len(only_ids))})")
        params += only_ids
    if sort == "date":
        order = "i.sort_date DESC, i.id DESC"
    columns = "i.id" if ids_only else f"{_ROW}, {score}, {', '.join(hl)}, i.sort_date"
    sql = f"SELECT {columns} FROM {source} WHERE {' AND '.join(where) or '1'} ORDER BY {order} LIMIT ?"
    return sql, [*([] if ids_only else hl_params), *params, limit]


#: Reciprocal rank fusion's constant (Cormack et al. 2009): a document's fused score is the sum over rankings of
#: 1 / (RRF_K + rank). 60 keeps one list's top ranks from drowning what both lists agree on.
RRF_K = 60


def fuse_rankings(rankings: Sequence[Sequence[str]], *, k: int = RRF_K) -> list[tuple[str, float]]:
    """One ranking from several (each best first, keys unique within it): reciprocal rank fusion, best first as
    (key, fused score). Ties keep the order of first appearance (earlier rankings, better ranks first).

    RRF needs no calibration between bm25 (unbounded, corpus-dependent) and cosine (model-dependent): only ranks
    count, so an image both rankings place high beats one that only one of them places first."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])
