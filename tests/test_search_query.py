"""The query language: what people type becomes FTS5 that cannot fail, or one clear error."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capwatch.errors import QueryError
from capwatch.library.index import ImageRecord, Index
from capwatch.library.search import SearchFilters, make_filters, parse_date_bound, parse_query


@pytest.mark.parametrize(
    ("query", "fts5"),
    [
        ("red bike", '"red" AND "bike"'),
        ('"red bike" wall', '"red bike" AND "wall"'),
        ("bike OR bicycle", '("bike" OR "bicycle")'),
        ("red bike OR bicycle", '"red" AND ("bike" OR "bicycle")'),
        ("a OR b OR c", '("a" OR "b" OR "c")'),
        ("cat -dog", '"cat" NOT "dog"'),
        ("cat NOT dog", '"cat" NOT "dog"'),
        ('cat -"hot dog"', '"cat" NOT "hot dog"'),
        ("bik*", '"bik"*'),
        ("or and", '"or" AND "and"'),
        ("cat AND dog", '"cat" AND "dog"'),
        ("t-shirt", '"t-shirt"'),
        ("title:foo", '"title:foo"'),
        ("^near(x)", '"^near(x)"'),
        ("Zürich café", '"Zürich" AND "café"'),
        ("  spaced    out  ", '"spaced" AND "out"'),
    ],
)
def test_queries_compile_to_quoted_fts5(query: str, fts5: str) -> None:
    assert parse_query(query).fts5 == fts5


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "empty query"),
        ("   ", "empty query"),
        ('"red bike', "unbalanced quote"),
        ("-", "'-' on its own"),
        ("OR", "OR needs a word on each side"),
        ("OR OR", "OR needs a word on each side"),
        ("cat OR", "OR needs a word on each side"),
        ("cat OR OR dog", "OR needs a word on each side"),
        ("*", "'*' on its own"),
        ("-*", "'*' on its own"),
        ("b*ke", "only works at the end of a word"),
        ("-dog", "not only -excluded words"),
        ("cat OR -dog", "cannot OR an excluded word"),
        ("!!!", "needs a letter or digit"),
        ('""', "nothing to search for"),
        ("cat NOT", "NOT needs a word"),
        ("AND cat", "AND needs a word"),
        ("cat AND", "AND needs a word"),
        ("cat AND AND dog", "AND needs a word"),
    ],
)
def test_bad_queries_are_one_line_errors(query: str, message: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(query)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def real_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    with Index.open(tmp_path_factory.mktemp("q") / "i.db") as index:
        index.upsert(ImageRecord(path="/p/x.jpg", size=1, mtime_ns=1, caption="a red bike leaning on a wall",
                                 keywords=("bike", "日本"), ocr_text="EXIT 12"))
        yield index


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_any_accepted_query_runs_on_the_real_index(real_index: Index, text: str) -> None:
    try:
        query = parse_query(text)
    except QueryError:
        return
    # Every statement the search builds (word index, trigram index, exact check) must run: never an FTS5 error.
    real_index.search(query, SearchFilters())
    real_index.search(query, SearchFilters(), sort="date")


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("2019", False, "2019-01-01T00:00:00"),
        ("2019", True, "2020-01-01T00:00:00"),
        ("2019-12", True, "2020-01-01T00:00:00"),
        ("2019-02-28", True, "2019-03-01T00:00:00"),
        ("2019-02-28T10:30", False, "2019-02-28T10:30:00"),
        ("2019-02-28 10:30:15", True, "2019-02-28T10:30:16"),
        ("today", False, "2026-03-15T00:00:00"),
        ("yesterday", True, "2026-03-15T00:00:00"),
        ("30d", False, "2026-02-13T12:00:00"),
        ("2w", False, "2026-03-01T12:00:00"),
    ],
)
def test_date_bounds(text: str, end: bool, expected: str) -> None:
    now = dt.datetime(2026, 3, 15, 12, 0, 0)
    assert parse_date_bound(text, option="--since", end=end, now=now) == expected


@pytest.mark.parametrize("text", ["yesteryear", "2019-13", "2019-02-30", "31/12/2019", "d30", "", " "])
def test_bad_dates_name_the_option(text: str) -> None:
    with pytest.raises(QueryError, match="--until: cannot read date"):
        make_filters(until=text)


def test_since_after_until_is_an_error() -> None:
    with pytest.raises(QueryError, match="not before --until"):
        make_filters(since="2021", until="2020")
