"""Date filters at the edges of what a date can be: every date that cannot be represented is one clear QueryError
naming the option (and, through the real CLI, one line on stderr with exit code 2), never a traceback."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import metadata_corpus as mc
import pytest

from capwatch.errors import QueryError
from capwatch.library.search import make_filters, parse_date_bound
from tests.conftest import CliRunner, assert_one_line_error, isolated_env

NOW = dt.datetime(2026, 3, 15, 12, 0, 0)
#: Days from 0001-01-01T00:00 to NOW: the largest ``Nd`` that still lands on a representable date.
MAX_DAYS = (NOW - dt.datetime.min).days
HUGE = "99999999999999999999"  # 20 digits: overflows a C int/long inside datetime
ENORMOUS = "9" * 5000  # more digits than int() converts by default (sys.get_int_max_str_digits)


def _short_id(value: object) -> str | None:
    """Readable test ids: a 5000-digit number is shown by its length, not spelled out."""
    text = str(value)
    return f"{len(text)}chars" if len(text) > 40 else None


@pytest.mark.parametrize("end", [False, True])
@pytest.mark.parametrize(
    "text",
    [
        "3000y", "2026y", f"{HUGE}y", f"{ENORMOUS}y",
        "9999999d", f"{MAX_DAYS + 1}d", f"{HUGE}d", f"{ENORMOUS}d",
        "1000000w", f"{MAX_DAYS // 7 + 1}w", f"{HUGE}w",
        "24303m", "99999m", f"{HUGE}m", f"{ENORMOUS}m",
    ],
    ids=_short_id,
)
def test_relative_dates_before_year_1_are_query_errors(text: str, end: bool) -> None:
    with pytest.raises(QueryError) as info:
        parse_date_bound(text, option="--since", end=end, now=NOW)
    message = str(info.value)
    assert message.startswith(f"--since: {text[:20]}")
    assert "reaches before year 1" in message
    assert "\n" not in message and len(message) < 200  # a 5000-digit number is shortened, not echoed


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("2025y", False, "0001-03-15T12:00:00"),  # the last whole year that still exists
        ("2025y", True, "0001-03-15T12:00:01"),
        ("24300m", False, "0001-03-15T12:00:00"),
        ("24302m", False, "0001-01-15T12:00:00"),
        (f"{MAX_DAYS}d", False, "0001-01-01T12:00:00"),
        (f"{MAX_DAYS // 7}w", False, (NOW - dt.timedelta(weeks=MAX_DAYS // 7)).isoformat()),
        ("0d", True, "2026-03-15T12:00:01"),
        ("0001", False, "0001-01-01T00:00:00"),
        ("9999", False, "9999-01-01T00:00:00"),
        ("9999-12-31T23:59:59", False, "9999-12-31T23:59:59"),
        ("9998", True, "9999-01-01T00:00:00"),
        ("9999-12-30", True, "9999-12-31T00:00:00"),
        ("9999-12-31T23:59:58", True, "9999-12-31T23:59:59"),
    ],
)
def test_dates_at_the_edges_that_still_exist_are_accepted(text: str, end: bool, expected: str) -> None:
    assert parse_date_bound(text, option="--since", end=end, now=NOW) == expected


@pytest.mark.parametrize("text", ["9999", "9999-12", "9999-12-31", "9999-12-31T23:59", "9999-12-31 23:59:59"])
def test_an_end_bound_past_year_9999_is_a_query_error(text: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_date_bound(text, option="--until", end=True, now=NOW)
    assert str(info.value).startswith(f"--until: {text} ends after 9999-12-31")
    assert "\n" not in str(info.value)


def test_relative_end_bound_past_year_9999_is_a_query_error() -> None:
    last = dt.datetime(9999, 12, 31, 23, 59, 59)
    assert parse_date_bound("0d", option="--since", end=False, now=last) == "9999-12-31T23:59:59"
    with pytest.raises(QueryError, match=r"^--until: 0d ends after 9999-12-31"):
        parse_date_bound("0d", option="--until", end=True, now=last)


@pytest.mark.parametrize("text", ["99999-01", "99999", "10000-01-01", "123456-07-08T09:10"])
def test_years_after_9999_are_query_errors(text: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_date_bound(text, option="--since", end=False, now=NOW)
    assert str(info.value).startswith(f"--since: {text} is after year 9999")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"since": "3000y"}, "--since: 3000y reaches before year 1"),
        ({"until": "3000y"}, "--until: 3000y reaches before year 1"),
        ({"since": f"{HUGE}d"}, f"--since: {HUGE}d reaches before year 1"),
        ({"until": "9999999d"}, "--until: 9999999d reaches before year 1"),
        ({"since": "1000000w"}, "--since: 1000000w reaches before year 1"),
        ({"until": f"{HUGE}m"}, f"--until: {HUGE}m reaches before year 1"),
        ({"until": "9999"}, "--until: 9999 ends after 9999-12-31"),
        ({"since": "2020", "until": "9999-12"}, "--until: 9999-12 ends after 9999-12-31"),
        ({"since": "99999-01"}, "--since: 99999-01 is after year 9999"),
        ({"until": "99999-01"}, "--until: 99999-01 is after year 9999"),
        # Whitespace (even a newline typed into a quoted argument) never splits the message over two lines.
        ({"since": "3000\ny"}, "--since: 3000 y reaches before year 1"),
    ],
)
def test_make_filters_reports_unrepresentable_dates_naming_the_option(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError) as info:
        make_filters(now=NOW, **kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_make_filters_still_accepts_the_extremes() -> None:
    filters = make_filters(since="2025y", until="9998", now=NOW)
    assert (filters.since, filters.until) == ("0001-03-15T12:00:00", "9999-01-01T00:00:00")


# -- the real CLI ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index made once by the real ``capwatch scan --no-caption`` of a folder with one small PNG."""
    root = tmp_path_factory.mktemp("cli")
    (root / "lib").mkdir()
    mc.make_png(root / "lib" / "one.png")
    index = root / "index.db"
    scan = subprocess.run([sys.executable, "-m", "capwatch", "--db", str(index), "scan", "--no-caption",
                           str(root / "lib")], env=isolated_env(root), cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert scan.returncode == 0, scan.stderr
    return index


def test_cli_index_is_searchable_with_dates_at_the_edges(run_cli: CliRunner, db: Path) -> None:
    # The error tests below mean something only if a search with representable dates works on this index.
    found = run_cli("--db", db, "search", "one", "--paths", "--since", "2025y", "--until", "9998")
    assert found.code == 0, found.err
    assert found.out.splitlines() == [str(db.parent / "lib" / "one.png")]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (option, value, message)
        for option in ("--since", "--until")
        for value, message in [
            ("3000y", "reaches before year 1"),
            ("9999999d", "reaches before year 1"),
            (f"{HUGE}d", "reaches before year 1"),
            ("1000000w", "reaches before year 1"),
            (f"{HUGE}w", "reaches before year 1"),
            ("99999m", "reaches before year 1"),
            (f"{HUGE}m", "reaches before year 1"),
            (f"{ENORMOUS}d", "reaches before year 1"),
            ("99999-01", "is after year 9999"),
        ]
    ]
    + [("--until", "9999", "ends after 9999-12-31"), ("--until", "9999-12-31", "ends after 9999-12-31")],
    ids=_short_id,
)
def test_cli_unrepresentable_dates_are_one_line_exit_2(run_cli: CliRunner, db: Path, option: str, value: str,
                                                        message: str) -> None:
    line = assert_one_line_error(run_cli("--db", db, "search", "one", option, value))
    assert line.startswith(f"capwatch: error: {option}: {value[:20]}"), line
    assert message in line, line
