"""Which files ``capwatch recaption`` takes: captions capwatch wrote, chosen by model, revision, age, or failure.

Only the index is consulted here (fast, no file opened); the processor then reads every chosen file afresh and
keeps a person's description whatever the index says, so an edit made after the last scan is never overwritten.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from capwatch.errors import QueryError
from capwatch.library.index import ImageRecord, Index, Status
from capwatch.library.search import parse_date_bound


@dataclass(frozen=True)
class Criteria:
    """What to re-caption. ``model_changed``: captions not made by ``current`` (model id, and revision when
    known); ``from_model``: captions made by one of these model ids; ``before``: captions made before this local
    time ('YYYY-MM-DDTHH:MM:SS'); ``errors``: files whose last attempt failed. Caption criteria combine with AND;
    ``errors`` adds the failed files. With ``model_changed``, ``languages`` (the configured ones, English included)
    also chooses captions that lack one of them: a language added to ``[language] captions`` is translated."""

    model_changed: bool = False
    current: tuple[str, str | None] | None = None
    from_model: frozenset[str] = frozenset()
    before: str | None = None
    errors: bool = False
    languages: frozenset[str] = frozenset()

    @property
    def selects_captions(self) -> bool:
        """True when some criterion chooses captioned files (not only failed ones)."""
        return self.model_changed or bool(self.from_model) or self.before is not None


def make_criteria(*, model_changed: bool, current: tuple[str, str | None] | None, from_model: Iterable[str],
                  before: str | None, errors: bool, languages: Iterable[str] = ()) -> Criteria:
    """Validate the command's options into :class:`Criteria`. Raises QueryError (one line) when none is given
    (re-captioning everything is what ``scan --force`` is for) or a date cannot be read."""
    bound = parse_date_bound(before, option="--before", end=False) if before is not None else None
    criteria = Criteria(model_changed, current, frozenset(from_model), bound, errors,
                        frozenset(lang.lower() for lang in languages))
    if not criteria.selects_captions and not errors:
        raise QueryError("say which captions to redo: --model-changed, --from-model NAME, --before DATE or --errors")
    return criteria


def _local(captioned_at: str | None) -> str | None:
    """An ISO UTC time ('...Z') as local 'YYYY-MM-DDTHH:MM:SS', the form --before is given in."""
    if not captioned_at:
        return None
    try:
        moment = dt.datetime.fromisoformat(captioned_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone().replace(tzinfo=None)
    return moment.isoformat(timespec="seconds")


def chosen(record: ImageRecord, criteria: Criteria) -> bool:
    """True when ``record`` is to be re-captioned under ``criteria``."""
    if criteria.errors and record.status == "error":
        return True
    if not criteria.selects_captions or record.status != "captioned" or record.source != "model":
        return False  # a person's description, boilerplate or nothing yet: not recaption's business
    if criteria.model_changed and criteria.current is not None:
        model, revision = criteria.current
        have = {lang.lower() for lang, _ in record.captions} or {"en"}
        missing = not criteria.languages <= have
        if not missing and record.model == model and (revision is None or record.model_revision == revision):
            return False
    if criteria.from_model and record.model not in criteria.from_model:
        return False
    if criteria.before is not None:
        made = _local(record.captioned_at)
        if made is None or made >= criteria.before:
            return False
    return True


def select(index: Index, roots: Sequence[Path] | None, criteria: Criteria) -> Iterator[ImageRecord]:
    """The records below ``roots`` (None: the whole index) that ``criteria`` choose, ordered by path per root."""
    statuses: tuple[Status, ...] = ("captioned", "error")
    for root in roots if roots is not None else [None]:
        for status in statuses:
            for record in index.iter_records(root, status=status):
                if chosen(record, criteria):
                    yield record
