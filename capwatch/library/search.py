"""The search query language, compiled to FTS5 syntax that cannot fail to parse, and date filters.

Query language (what a person types after ``capwatch search``):

- words are ANDed: ``red bike``
- ``"quoted phrases"`` match words next to each other in that order
- ``-word`` / ``-"a phrase"`` / ``NOT word`` exclude
- ``OR`` between two terms means either (it binds tighter than the implicit AND: ``red bike OR bicycle``
  is ``red AND (bike OR bicycle)``)
- a trailing ``*`` is a prefix search: ``bik*``
- a field before a word or phrase searches only there: ``kw:dog`` (keywords), ``text:"exit 12"`` (text found in
  the image), ``caption:beach`` (the caption, a person's or the model's), ``path:2019``; plain words search all
- word forms are forgiven (the index stems English): ``puppies`` finds "puppy", ``running`` finds "runs"
- Chinese, Japanese and Korean match inside a run of characters: ``桜`` finds "日本の桜"

Every term is emitted as an FTS5 string (``"..."``), so characters FTS5 treats as syntax (``:``, ``^``,
``(``, ``+``, ``.``) are just text. Everything the parser cannot understand raises QueryError with one line.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, cast

from capwatch.errors import QueryError
from capwatch.library.text_forms import cjk_phrase, cjk_runs

Field = Literal["kw", "text", "caption", "path"]
#: Each query field and the index columns it searches (FTS5 column filter syntax).
FIELD_COLUMNS: dict[str, str] = {"kw": "keywords", "text": "ocr_text", "caption": "{caption model_caption}",
                                 "path": "path"}


@dataclass(frozen=True)
class Term:
    text: str
    prefix: bool = False
    phrase: bool = False
    #: Search only this field (None: every field).
    field: Field | None = None

    def fts5(self) -> str:
        runs = cjk_runs(self.text)
        if runs:
            # CJK characters are matched one by one in the index's cjk column (see capwatch.library.text_forms);
            # the rest of the term, if any, as usual.
            parts = [f"cjk : {cjk_phrase(run)}" for run in runs]
            rest = self.text
            for run in runs:
                rest = rest.replace(run, " ")
            if _has_word(rest):
                parts.append(Term(" ".join(rest.split()), self.prefix, self.phrase, self.field).fts5())
            return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"
        quoted = '"' + self.text.replace('"', '""') + '"' + ("*" if self.prefix else "")
        return f"{FIELD_COLUMNS[self.field]} : {quoted}" if self.field else quoted


@dataclass(frozen=True)
class ParsedQuery:
    """A query ready for FTS5: ``groups`` are ANDed, the terms inside a group ORed, ``excluded`` NOTed."""

    groups: tuple[tuple[Term, ...], ...]
    excluded: tuple[Term, ...]

    @property
    def text_substrings(self) -> tuple[str, ...] | None:
        """For a query made only of ``text:`` terms of 3 characters or more (no OR, no exclusion, no prefix): the
        terms, to be found as substrings of the text in images (a trigram index: "123" inside "AB123C"); else
        None."""
        terms = [g[0] for g in self.groups if len(g) == 1]
        if self.excluded or len(terms) != len(self.groups):
            return None
        if all(t.field == "text" and not t.prefix and len(t.text) >= 3 for t in terms):
            return tuple(t.text for t in terms)
        return None

    @property
    def fts5(self) -> str:
        parts = []
        for group in self.groups:
            inner = " OR ".join(t.fts5() for t in group)
            parts.append(f"({inner})" if len(group) > 1 else inner)
        text = " AND ".join(parts)
        for term in self.excluded:
            text += f" NOT {term.fts5()}"
        return text


@dataclass(frozen=True)
class SearchFilters:
    """Row filters applied with the full-text match. Dates are ISO 'YYYY-MM-DDTHH:MM:SS' (until is exclusive)."""

    in_dir: str | None = None
    since: str | None = None
    until: str | None = None
    source: Literal["model", "human", "embedded"] | None = None


_TOKEN = re.compile(r'\s*(-?)(?:(kw|text|caption|path):(?=\S))?("([^"]*)"(\*?)|[^\s"]+)')


def _lex(text: str) -> list[tuple[bool, str, bool, Field | None]]:
    """Split into (negated, text, is_phrase, field) tokens; raises QueryError on an unbalanced quote."""
    if text.count('"') % 2:
        raise QueryError('unbalanced quote in query: close the "phrase" with a second "')
    tokens: list[tuple[bool, str, bool, Field | None]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:  # pragma: no cover - the regex accepts every non-space run
            raise QueryError(f"cannot read query near {text[pos:pos + 20]!r}")
        negated, field_name, whole, phrase_body, phrase_star = match.groups()
        field = cast("Field | None", field_name)
        if phrase_body is not None:
            tokens.append((bool(negated), phrase_body + phrase_star, True, field))
        else:
            tokens.append((bool(negated), whole, False, field))
        pos = match.end()
    return tokens


def _has_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _term(raw: str, phrase: bool, field: Field | None = None) -> Term:
    prefix = raw.endswith("*")
    body = raw[:-1] if prefix else raw
    if phrase:
        body = " ".join(body.split())
        if not _has_word(body):
            raise QueryError(f'nothing to search for in the phrase "{raw}"')
        return Term(body, prefix=prefix, phrase=True, field=field)
    if "*" in body:
        raise QueryError(f"'*' only works at the end of a word (prefix search), not in {raw!r}")
    if not body:
        raise QueryError("'*' on its own matches nothing: put it after the start of a word, e.g. bik*")
    if not _has_word(body):
        raise QueryError(f"nothing to search for in {raw!r}: a term needs a letter or digit")
    return Term(body, prefix=prefix, field=field)


def parse_query(words: str | list[str] | tuple[str, ...]) -> ParsedQuery:
    """Parse what the user typed (one string, or the shell's word list) into a :class:`ParsedQuery`.

    Raises QueryError (one line) for an empty query, unbalanced quotes, a lone ``-``, a dangling or doubled
    ``OR``, a misplaced ``*``, or a query that only excludes.
    """
    text = words if isinstance(words, str) else " ".join(words)
    # Control characters (NUL ends an FTS5 string early) can only be typing accidents: treat them as spaces.
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    if not text.strip():
        raise QueryError("empty query: give at least one word to search for")
    groups: list[list[Term]] = []
    excluded: list[Term] = []
    pending_or = False
    pending_not = False
    pending_and = False
    for negated, raw, phrase, field in _lex(text):
        if field is None and not phrase and raw.endswith(":") and raw[:-1] in FIELD_COLUMNS:
            raise QueryError(f"{raw} needs a word right after it, e.g. {raw}dog")
        if field is not None:
            # A field applies to the word itself; the operators below never carry one.
            term = _term(raw, phrase, field)
            if negated or pending_not:
                if pending_or:
                    raise QueryError("cannot OR an excluded word: write the exclusion on its own, e.g. cat -dog")
                excluded.append(term)
                pending_not = False
            elif pending_or:
                groups[-1].append(term)
                pending_or = False
            else:
                groups.append([term])
            pending_and = False
            continue
        if not phrase and raw == "OR":
            if negated:
                raise QueryError("'-OR' is not a word; to find the word 'or' write it in lower case")
            if not groups or pending_or or pending_not:
                raise QueryError("OR needs a word on each side, e.g. bike OR bicycle")
            pending_or = True
            continue
        if not phrase and raw == "AND" and not negated:
            if not groups or pending_or or pending_not or pending_and:
                raise QueryError("AND needs a word on each side (words are ANDed anyway)")
            pending_and = True
            continue
        if not phrase and raw == "NOT" and not negated:
            if pending_not:
                raise QueryError("NOT NOT is not allowed: NOT needs a word after it")
            pending_not = True
            continue
        if not phrase and raw == "" and negated:  # pragma: no cover - lexer yields '-' as the text
            raise QueryError("'-' must be followed by a word to exclude")
        if not phrase and raw == "-":
            raise QueryError("'-' on its own excludes nothing: write -word to exclude a word")
        term = _term(raw, phrase)
        pending_and = False
        if negated or pending_not:
            if pending_or:
                raise QueryError("cannot OR an excluded word: write the exclusion on its own, e.g. cat -dog")
            excluded.append(term)
            pending_not = False
            continue
        if pending_or:
            groups[-1].append(term)
            pending_or = False
        else:
            groups.append([term])
    if pending_or:
        raise QueryError("OR needs a word on each side, e.g. bike OR bicycle")
    if pending_not:
        raise QueryError("NOT needs a word after it")
    if pending_and:
        raise QueryError("AND needs a word on each side (words are ANDed anyway)")
    if not groups:
        raise QueryError("a query needs at least one word to find, not only -excluded words")
    return ParsedQuery(tuple(tuple(g) for g in groups), tuple(excluded))


_RELATIVE = re.compile(r"^(\d+)\s*([dwmy])$")
#: A year after 9999 (five or more digits), alone or starting a date: strptime cannot read it, no datetime holds it.
_BIG_YEAR = re.compile(r"^0*[1-9]\d{4,}(?:$|-\d)")
_FORMATS = (
    ("%Y", "year"), ("%Y-%m", "month"), ("%Y-%m-%d", "day"),
    ("%Y-%m-%dT%H:%M", "minute"), ("%Y-%m-%d %H:%M", "minute"),
    ("%Y-%m-%dT%H:%M:%S", "second"), ("%Y-%m-%d %H:%M:%S", "second"),
)


def _add_months(value: dt.datetime, months: int) -> dt.datetime:
    """The first of the month ``months`` after ``value`` (negative: before). Raises ValueError outside the
    years 1..9999."""
    year, month = divmod(value.month - 1 + months, 12)
    if not dt.MINYEAR <= value.year + year <= dt.MAXYEAR:
        raise ValueError("year out of range")
    return value.replace(year=value.year + year, month=month + 1, day=1)


def _shown(text: str) -> str:
    """The user's date as an error message may echo it: on one line, and a runaway number shortened."""
    text = " ".join(text.split())
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}"


def _ago(now: dt.datetime, digits: str, kind: str) -> dt.datetime | None:
    """``now`` minus ``digits`` days/weeks/months/years (``kind`` d/w/m/y), or None when that is before year 1."""
    try:
        count = int(digits)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits): far before year 1
        return None
    if kind in ("d", "w"):
        days = count * (7 if kind == "w" else 1)
        # Compared as whole days before subtracting: timedelta itself overflows long before Python ints do.
        if days > (now - dt.datetime.min).days:
            return None
        start = now - dt.timedelta(days=days)
    elif kind == "m":
        try:
            start = _add_months(now, -count).replace(day=min(now.day, 28))
        except ValueError:
            return None
    else:
        if now.year - count < dt.MINYEAR:
            return None
        start = now.replace(year=now.year - count, day=min(now.day, 28))
    return start.replace(microsecond=0)


def parse_date_bound(text: str, *, option: str, end: bool, now: dt.datetime | None = None) -> str:
    """Turn a user date into an ISO bound. ``end=True`` gives the exclusive end of the period named
    (``2019`` -> ``2020-01-01T00:00:00``), ``end=False`` its start.

    Accepts YYYY, YYYY-MM, YYYY-MM-DD, YYYY-MM-DD[T ]HH:MM[:SS], ``today``, ``yesterday`` and ``N[dwmy]``
    (N days/weeks/months/years ago). Returns the bound as ``YYYY-MM-DDTHH:MM:SS``. Raises QueryError naming
    ``option`` for anything else, and for dates a datetime cannot hold: ``N[dwmy]`` before year 1, years after
    9999, and an end bound past 9999-12-31 (``--until 9999`` would end in year 10000).
    """
    now = now or dt.datetime.now()
    value = text.strip().lower()
    start: dt.datetime | None = None
    unit = "second"
    if value in ("today", "yesterday"):
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if value == "yesterday":
            start -= dt.timedelta(days=1)
        unit = "day"
    elif match := _RELATIVE.match(value):
        start = _ago(now, match.group(1), match.group(2))
        if start is None:
            raise QueryError(f"{option}: {_shown(text)} reaches before year 1, the earliest date a search can use")
    elif _BIG_YEAR.match(value):
        raise QueryError(f"{option}: {_shown(text)} is after year 9999, the last year a search can use")
    else:
        for fmt, fmt_unit in _FORMATS:
            try:
                start = dt.datetime.strptime(text.strip(), fmt)
            except ValueError:
                continue
            unit = fmt_unit
            break
    if start is None:
        raise QueryError(
            f"{option}: cannot read date {text!r}; use YYYY, YYYY-MM, YYYY-MM-DD, YYYY-MM-DDTHH:MM, "
            "today, yesterday or N[dwmy] (e.g. 30d)"
        )
    if end:
        try:
            if unit == "year":
                start = start.replace(year=start.year + 1)
            elif unit == "month":
                start = _add_months(start, 1)
            elif unit == "day":
                start += dt.timedelta(days=1)
            elif unit == "minute":
                start += dt.timedelta(minutes=1)
            else:
                start += dt.timedelta(seconds=1)
        except (ValueError, OverflowError):
            # The exclusive end of the last period in 9999 would be in year 10000, which no datetime holds.
            message = f"{option}: {_shown(text)} ends after 9999-12-31, the last date a search can use"
            raise QueryError(message) from None
    return start.isoformat(timespec="seconds")


def make_filters(*, in_dir: str | None = None, since: str | None = None, until: str | None = None,
                 source: str | None = None, now: dt.datetime | None = None) -> SearchFilters:
    """Validate the CLI's filter options into :class:`SearchFilters` and return them.

    Raises QueryError (one line, naming the option) for a date that cannot be read or represented (see
    :func:`parse_date_bound`), ``since`` not before ``until``, or an unknown ``source``.
    """
    since_iso = parse_date_bound(since, option="--since", end=False, now=now) if since is not None else None
    until_iso = parse_date_bound(until, option="--until", end=True, now=now) if until is not None else None
    if since_iso and until_iso and since_iso >= until_iso:
        raise QueryError(f"--since {since} is not before --until {until}: nothing can match")
    if source not in (None, "model", "human", "embedded"):
        raise QueryError(f"--source: expected human, model or embedded, got {source!r}")
    return SearchFilters(in_dir=in_dir, since=since_iso, until=until_iso, source=source)  # type: ignore[arg-type]
