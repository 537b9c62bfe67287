"""The search query language, compiled to FTS5 syntax that cannot fail to parse, and date filters.

Query language (what a person types after ``capwatch search``):

- words are ANDed: ``red bike``
- ``"quoted phrases"`` match words next to each other in that order
- ``-word`` / ``-"a phrase"`` / ``NOT word`` exclude
- ``OR`` between two terms means either (it binds tighter than the implicit AND: ``red bike OR bicycle``
  is ``red AND (bike OR bicycle)``)
- a trailing ``*`` is a prefix search: ``bik*``
- ``field:word`` / ``field:"a phrase"`` looks in one field only: ``kw:`` keywords, ``caption:`` the caption (a
  person's or the model's), ``text:`` text found in the image, ``path:`` the file's path; other words before a
  colon (``title:foo``) are just text. Plain words look in every field.

How terms match (the index is FTS5 with ``porter unicode61 remove_diacritics 2``):

- plain words match any word form: ``puppies`` finds "puppy", ``running`` finds "runs";
- a quoted word or phrase is exact: its words must appear unstemmed, in order (case and accents still ignored);
- a term with CJK characters (Han, kana, Hangul) matches as a substring of the CJK text: ``桜`` finds "日本の桜"
  (each CJK character is its own token in the ``cjk_*`` columns, a term is the phrase of its characters);
- a ``text:`` term of three characters or more matches as a substring of the text found in the image
  (``text:B12`` finds "EXIT B12", ``text:"exit 12"`` finds "EXIT 12A"), through a trigram index; shorter ones
  match whole words.

Every term is emitted as an FTS5 string (``"..."``), so characters FTS5 treats as syntax (``:``, ``^``,
``(``, ``+``, ``.``) are just text. Everything the parser cannot understand raises QueryError with one line.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from capwatch.errors import QueryError

Field = Literal["kw", "text", "caption", "path"]
FIELDS: tuple[Field, ...] = get_args(Field)

#: The FTS5 columns each field looks in: (word columns, CJK columns). None = every column (no filter).
_COLUMNS: dict[Field | None, tuple[tuple[str, ...], tuple[str, ...]]] = {
    None: ((), ("cjk_caption", "cjk_keywords", "cjk_ocr")),
    "caption": (("caption", "model_caption", "translations"), ("cjk_caption",)),
    "kw": (("keywords",), ("cjk_keywords",)),
    "text": (("ocr_text",), ("cjk_ocr",)),
    "path": (("path",), ("path",)),
}
#: The images columns a quoted term is checked against, unstemmed, per field.
EXACT_COLUMNS: dict[Field | None, tuple[str, ...]] = {
    None: ("caption", "model_caption", "keywords", "ocr_text", "path", "translations"),
    "caption": ("caption", "model_caption", "translations"),
    "kw": ("keywords",),
    "text": ("ocr_text",),
    "path": ("path",),
}
#: Shortest ``text:`` term the trigram index can look up (trigrams need three characters).
TRIGRAM_MIN = 3


def is_cjk(ch: str) -> bool:
    """True for a Han ideograph, kana or Hangul character (scripts written without spaces between words)."""
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x31F0 <= code <= 0x31FF  # katakana phonetic extensions
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0xAC00 <= code <= 0xD7AF  # Hangul syllables
        or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F  # Hangul jamo
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF66 <= code <= 0xFF9F  # half-width katakana
        or 0x20000 <= code <= 0x3134F  # CJK extensions B..G
    )


def cjk_spaced(text: str | None) -> str | None:
    """The CJK characters of ``text``, each one a word ("日本の桜 in Kyoto" -> "日 本 の 桜"), with a line break
    where other text came between; None when ``text`` has no CJK character (the ``cjk_*`` columns stay NULL).

    unicode61 keeps a run of CJK as one token, so only the whole run would match; one token per character makes
    any substring a phrase query.
    """
    if not text or not any(is_cjk(ch) for ch in text):
        return None
    out: list[str] = []
    gap = False
    for ch in text:
        if is_cjk(ch):
            if gap and out:
                out.append("\n")
            out.append(ch)
            gap = False
        else:
            gap = True
    return " ".join(out)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@dataclass(frozen=True)
class Term:
    text: str
    prefix: bool = False
    phrase: bool = False
    field: Field | None = None

    @property
    def cjk(self) -> bool:
        """True when the term contains CJK characters (it then matches as a substring of CJK text)."""
        return any(is_cjk(ch) for ch in self.text)

    @property
    def substring(self) -> bool:
        """True when the term is looked up in the OCR trigram index (``text:``, three characters or more)."""
        return self.field == "text" and not self.cjk and len(self.text.strip()) >= TRIGRAM_MIN

    @property
    def exact(self) -> bool:
        """True when the term's words must appear unstemmed (a quoted term that the word index answers)."""
        return self.phrase and not self.cjk and not self.substring

    def fts5(self) -> str:
        """The term for the word index (images_fts), with its field's column filter."""
        words, cjk_columns = _COLUMNS[self.field]
        if self.cjk and self.field != "path":
            runs, others = _cjk_parts(self.text)
            parts = [f"{{{' '.join(cjk_columns)}}} : {_quote(run)}" for run in runs]
            parts += [f"{{{' '.join(words)}}} : {_quote(w)}" if words else _quote(w) for w in others]
            return parts[0] if len(parts) == 1 else "(" + " AND ".join(_paren(p) for p in parts) + ")"
        quoted = _quote(self.text) + ("*" if self.prefix else "")
        return f"{{{' '.join(words)}}} : {quoted}" if words else quoted

    def trigram(self) -> str:
        """The term for the OCR trigram index (a substring, whitespace collapsed)."""
        return _quote(" ".join(self.text.split()))


def _cjk_parts(text: str) -> tuple[list[str], list[str]]:
    """A term with CJK split into its CJK runs (characters space-separated: a phrase of one-character tokens)
    and its other words."""
    runs: list[str] = []
    others: list[str] = []
    run: list[str] = []
    other: list[str] = []

    def flush_other() -> None:
        word = "".join(other).strip()
        if any(ch.isalnum() for ch in word):
            others.append(word)
        other.clear()

    for ch in text:
        if is_cjk(ch):
            flush_other()
            run.append(ch)
        else:
            if run:
                runs.append(" ".join(run))
                run.clear()
            other.append(ch)
    if run:
        runs.append(" ".join(run))
    flush_other()
    return runs, others


@dataclass(frozen=True)
class ParsedQuery:
    """A query ready for FTS5: ``groups`` are ANDed, the terms inside a group ORed, ``excluded`` NOTed."""

    groups: tuple[tuple[Term, ...], ...]
    excluded: tuple[Term, ...]

    @property
    def fts5(self) -> str:
        """The whole query for the word index alone (``text:`` substrings as words): see :meth:`compile`."""
        return _join(self.groups, self.excluded) or ""

    def compile(self) -> CompiledQuery:
        """Route each term to the index that answers it; see :class:`CompiledQuery`."""
        return self._compiled

    @functools.cached_property
    def _compiled(self) -> CompiledQuery:
        # Computed once: the window query, the ranked query and the snippets each need it.
        word_groups = tuple(g for g in self.groups if not any(t.substring for t in g))
        mixed = tuple(g for g in self.groups if any(t.substring for t in g))
        word_excluded = tuple(t for t in self.excluded if not t.substring)
        substring_groups = tuple(
            (
                " OR ".join(t.trigram() for t in g if t.substring),
                _join(((t,) for t in g if not t.substring), ()) if any(not t.substring for t in g) else None,
            )
            for g in mixed
        )
        match = _join(word_groups, word_excluded) if word_groups else None
        exact = tuple(
            (g[0].text, EXACT_COLUMNS[g[0].field], g[0].prefix) for g in self.groups if len(g) == 1 and g[0].exact
        )
        return CompiledQuery(
            match=match,
            substring_groups=substring_groups,
            exclude_match=None if word_groups or not word_excluded else _join_or(word_excluded),
            exclude_substring=tuple(t.trigram() for t in self.excluded if t.substring),
            exact=exact,
            terms=tuple(t for g in self.groups for t in g),
        )


def _join(groups: Iterable[tuple[Term, ...]], excluded: tuple[Term, ...]) -> str | None:
    parts = []
    for group in groups:
        inner = " OR ".join(_paren(t.fts5()) if len(group) > 1 else t.fts5() for t in group)
        parts.append(f"({inner})" if len(group) > 1 else _paren(inner))
    if not parts:
        return None
    text = " AND ".join(parts)
    for term in excluded:
        text += f" NOT {_paren(term.fts5())}"
    return text


def _join_or(terms: tuple[Term, ...]) -> str:
    return " OR ".join(_paren(t.fts5()) for t in terms)


def _paren(expr: str) -> str:
    """``expr`` safe as an operand: a bare string stays as it is, a filtered or compound one is bracketed."""
    return expr if expr.startswith('"') and not expr.endswith(")") else f"({expr})"


@dataclass(frozen=True)
class CompiledQuery:
    """A parsed query routed to the indexes that answer it (built by :meth:`ParsedQuery.compile`).

    - ``match``: images_fts MATCH for the groups the word index answers alone (None when every group has a
      ``text:`` substring term);
    - ``substring_groups``: one per group with a substring term, (trigram MATCH of its substring terms, images_fts
      MATCH of its other terms or None), ORed;
    - ``exclude_match``: images_fts MATCH of excluded word terms when there is no ``match`` to NOT them in;
    - ``exclude_substring``: trigram MATCHes to exclude;
    - ``exact``: (text, columns, prefix) of quoted terms whose words must appear unstemmed in one of the columns
      (only for terms alone in their group: in an OR group, a quoted term matches word forms too);
    - ``terms``: every positive term, for marking CJK and substring hits in the snippet.
    """

    match: str | None
    substring_groups: tuple[tuple[str, str | None], ...]
    exclude_match: str | None
    exclude_substring: tuple[str, ...]
    exact: tuple[tuple[str, tuple[str, ...], bool], ...]
    terms: tuple[Term, ...]


def fold_words(text: str | None) -> list[str]:
    """The words of ``text`` as unicode61 (remove_diacritics 2) sees them: lower case, accents removed, split at
    everything that is not a letter, digit or private-use character."""
    if not text:
        return []
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _WORD.findall(stripped)


_WORD = re.compile(r"[^\W_]+")


def contains_exact(phrase: str, prefix: bool, *texts: str | None) -> bool:
    """True when the words of ``phrase`` appear in this order, next to each other and unstemmed, in one of
    ``texts`` (the last one may be a prefix of a word when ``prefix``). Registered as an SQL function by
    the index for quoted terms (the porter index alone would also match other word forms)."""
    want = fold_words(phrase)
    if not want:
        return True
    for text in texts:
        words = fold_words(text)
        n = len(want)
        for i in range(len(words) - n + 1):
            if words[i:i + n - 1] == want[:-1] and (
                words[i + n - 1].startswith(want[-1]) if prefix else words[i + n - 1] == want[-1]
            ):
                return True
    return False


@dataclass(frozen=True)
class SearchFilters:
    """Row filters applied with the full-text match. Dates are ISO 'YYYY-MM-DDTHH:MM:SS' (until is exclusive)."""

    in_dir: str | None = None
    since: str | None = None
    until: str | None = None
    source: Literal["model", "human", "embedded"] | None = None


_TOKEN = re.compile(r'\s*(-?)(?:([A-Za-z]+):(?=[^\s]))?("([^"]*)"(\*?)|[^\s"]+)')


def _lex(text: str) -> list[tuple[bool, str, bool, Field | None]]:
    """Split into (negated, text, is_phrase, field) tokens; raises QueryError on an unbalanced quote or a field
    name with nothing after it."""
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
        negated, name, whole, phrase_body, phrase_star = match.groups()
        field: Field | None = None
        if name is not None and name.lower() in FIELDS:
            field = name.lower()  # type: ignore[assignment]
        elif name is not None:
            # Not a field ("title:foo", "12:30"): the colon and what precedes it are part of the word.
            if phrase_body is not None:
                # As before fields existed: a word (that takes the '-'), then the phrase.
                tokens.append((bool(negated), f"{name}:", False, None))
                negated = ""
            else:
                whole = f"{name}:{whole}"
        if phrase_body is not None:
            tokens.append((bool(negated), phrase_body + phrase_star, True, field))
        else:
            if field is None and whole.rstrip(":").lower() in FIELDS and whole.endswith(":"):
                raise QueryError(f"{whole} needs a word right after it, e.g. {whole}dog")
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
        term = _term(raw, phrase, field)
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


def normalise_path(path: str | Path) -> str:
    """The form in which paths are stored: absolute, ``..`` collapsed, symlinks kept as they are."""
    return os.path.abspath(os.fspath(path))


def prefix_range(directory: str) -> tuple[str, str]:
    """Bounds such that ``lo <= path < hi`` selects everything below ``directory``."""
    # Compare against "dir/" .. "dir0" ('0' follows '/'), so siblings such as "dir.jpg" or "dir-2/" are excluded.
    base = directory.rstrip(os.sep)
    return (base + os.sep, base + chr(ord(os.sep) + 1))


def is_meaning_term(term: Term) -> bool:
    """For search by meaning (capwatch.library.meaning): plain words are meant; ``kw:``/``text:``/``caption:``/
    ``path:`` terms and quoted phrases are word searches."""
    return term.field is None and not term.phrase


def meaning_text(query: ParsedQuery) -> str | None:
    """The text whose embedding stands for ``query``: its plain words as typed (an OR group as "a or b"); None
    when every term is a word search (fields, quoted phrases) or excluded. Here, not in capwatch.library.meaning,
    so that a search can ask a running daemon for the embedding before it imports the index modules."""
    parts = [" or ".join(t.text.rstrip("*") for t in group) for group in query.groups
             if all(is_meaning_term(t) for t in group)]
    text = " ".join(p for p in parts if p.strip())
    return text or None
