"""The pages of `capwatch serve`: search grid, photo page (edit, re-caption), status, thumbnails.

Photos are named by their index row id only; no part of a request is ever used as a file path. A row is shown
and its file read only when :func:`capwatch.web.security.servable` says the file lies below a configured root.
Every page opens the index for itself (an Index belongs to one thread; Starlette runs these in a thread pool).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from markupsafe import Markup, escape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from capwatch.errors import CapwatchError, ImageError, QueryError
from capwatch.library.index import ImageRecord, Index, IndexStats, record_date
from capwatch.library.livephoto import paired_motion
from capwatch.library.moments import clock
from capwatch.library.outcomes import HUMAN_KEPT
from capwatch.metadata import Description
from capwatch.metadata.formats import is_video_name
from capwatch.metadata.safeopen import NotRegularFile
from capwatch.web.app import HERE, MAX_BODY, ServeSettings
from capwatch.web.catalog import MARK_CLOSE, MARK_OPEN, MAX_QUERY, FormFilters, ResultPage, results_page
from capwatch.web.editing import (
    MAX_CAPTION,
    CaptionerSlot,
    EditConflict,
    EditRefused,
    parse_shown,
    refresh_record,
    save_person_caption,
    shown_keys,
)
from capwatch.web.meaning import MeaningSlot, duplicate_sets, similar_photos
from capwatch.web.media import ranged_response
from capwatch.web.security import csrf_ok, open_servable, servable
from capwatch.web.thumbnails import PREVIEW_PX, THUMB_PX, Busy, Entry, Pruner, ThumbnailCache, cache_key

log = logging.getLogger(__name__)
#: SQLite row ids are signed 64-bit; a larger number in the address names no photo.
MAX_ROW_ID = 2**63 - 1
#: The status page's counts are taken again at most this often (see Pages._stats).
STATS_SECONDS = 30.0
#: At most this many fields in a POST (the forms have at most five).
MAX_FIELDS = 8
#: Notes kept for the pages POSTs redirect to (the oldest go first).
MAX_NOTES = 256


def page_words(reason: str) -> str:
    """A reason from the library (written for the command line) in the page's words: no command-line flags."""
    if reason == HUMAN_KEPT:
        return "a person wrote this caption, and the model never replaces a person's words (edit it above instead)"
    return re.sub(r"\s*\((use )?--[a-z-]+[^)]*\)", "", reason)


#: What the places a description can be found in are called on the page.
ORIGINS = {"exif": "EXIF ImageDescription", "xmp": "XMP dc:description", "iptc": "IPTC Caption-Abstract",
           "sidecar": "XMP sidecar", "png": "PNG Description"}


def marked(text: str) -> Markup:
    """``text`` HTML-escaped, with the search's match marks turned into <mark> (and stray marks dropped)."""
    # Every MARK_OPEN starts a <mark> that the next MARK_CLOSE ends; unpaired marks are dropped.
    result: list[str] = []
    depth = 0
    for ch in str(escape(text)):
        if ch == MARK_OPEN:
            if depth == 0:
                result.append("<mark>")
            depth += 1
        elif ch == MARK_CLOSE:
            if depth > 0:
                depth -= 1
                if depth == 0:
                    result.append("</mark>")
        else:
            result.append(ch)
    if depth:
        result.append("</mark>")
    return Markup("".join(result))


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["marked"] = marked
    env.filters["basename"] = lambda path: os.path.basename(str(path))
    env.filters["date_of"] = date_of
    env.globals["is_video"] = is_video_name
    env.globals["clock"] = clock
    return env


def start_time(raw: str | None) -> float | None:
    """The ``t`` a search hit links a video with (the moment that matched, seconds), or None when absent or not
    a plain non-negative number."""
    if not raw or len(raw) > 20:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0.0 <= value < 1e7 else None


def date_of(record: ImageRecord) -> str:
    """The date the date filters use for ``record``, saying where it comes from (as `search --json` does)."""
    date, source = record_date(record)
    return f"{date} (taken)" if source == "taken" else f"{date} (the file's time: the file records no date taken)"


@dataclass(frozen=True)
class Photo:
    """A row that may be shown: its id, record and the real file behind it."""

    row_id: int
    record: ImageRecord
    file: Path


class Pages:
    """The endpoints, bound to one :class:`ServeSettings`."""

    def __init__(self, settings: ServeSettings, thumbs: ThumbnailCache, model: CaptionerSlot) -> None:
        self.settings = settings
        self.config = settings.config
        self.thumbs = thumbs
        self.model = model
        self.env = _templates()
        self.env.globals["motion_of"] = self._motion_of
        self.roots = tuple(r.path for r in self.config.library.roots)
        self._readers = threading.local()
        self._stats_lock = threading.Lock()
        self._stats_cache: tuple[float, IndexStats, str] | None = None
        #: What a POST had to say, shown by the page it redirects to: key -> (row id, "message" | "error", text).
        self._notes: OrderedDict[str, tuple[int, str, str]] = OrderedDict()
        self._notes_lock = threading.Lock()
        self._pruner = Pruner(self._sweep_thumbnails)
        #: The embedding model for search by meaning (loaded on the first search with plain words).
        self.meaning = MeaningSlot(self.config)

    # -- plumbing -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Server start: the thumbnail cache's sweep begins (in the background)."""
        self._pruner.start()

    def close(self) -> None:
        """Release the models and stop the thumbnail sweep (server shutdown)."""
        self._pruner.stop()
        self.model.close()
        self.meaning.close()

    @contextmanager
    def _index(self, *, write: bool = False) -> Iterator[Index]:
        """The index for this request: a writable one opened for an edit, else this thread's reader."""
        path = self.config.index_path()
        if not write:
            yield self._reader(path)
            return
        index = Index.open(path, busy_timeout=self.config.index.busy_timeout_seconds)
        try:
            yield index
        finally:
            index.close()

    def _reader(self, path: Path) -> Index:
        """This thread's read-only Index (an Index belongs to one thread; the pool's threads live on), reopened
        when the file at ``path`` is another one than it was (an index moved aside and rebuilt). Opening one per
        request cost more than many searches (mmap set up again each time)."""
        try:
            inode = os.stat(path).st_ino
        except OSError:
            inode = -1
        held: tuple[int, Index] | None = getattr(self._readers, "held", None)
        if held is not None and held[0] == inode:
            return held[1]
        index = Index.open(path, busy_timeout=self.config.index.busy_timeout_seconds, readonly=True)
        if held is not None:
            held[1].close()
        self._readers.held = (inode, index)
        return index

    def _motion_of(self, still: str) -> Path | None:
        """A Live Photo's motion for the templates: beside the still by name, or paired by content identifier as
        recorded in the index (by name only when the index cannot be read)."""
        try:
            with self._index() as index:
                return paired_motion(index, still)
        except CapwatchError:
            return paired_motion(None, still)

    def _html(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("csrf", self.settings.csrf)
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status_code)

    def _error(self, message: str, status_code: int) -> HTMLResponse:
        return self._html("error.html", status_code, message=message, query="")

    def _photo(self, index: Index, row_id: int) -> Photo | None:
        if not 0 < row_id <= MAX_ROW_ID:
            return None
        record = index.get_by_id(row_id)
        if record is None:
            return None
        real = servable(record.path, self._roots(index))
        return None if real is None else Photo(row_id, record, real)

    def _roots(self, index: Index) -> tuple[Path, ...]:
        """The folders whose photos may be shown: the configured roots and the folders the index's owner gave
        `scan`/`watch` (the index remembers them)."""
        return self.roots + index.owner_roots()

    def _config_file(self) -> str:
        """Where the configuration that names the roots is, or would be (for the "not shown" note)."""
        from capwatch import paths

        source = self.config.source
        if source is not None:
            return str(source)
        return f"{paths.default_config_path(os.environ)} (not made yet)"

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self._error("nothing here: no such page or photo", 404)

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        """The index cannot be read (not made yet, locked, damaged): its one line, status 503."""
        return self._error(str(exc).splitlines()[0] if str(exc) else "the index cannot be read", 503)

    async def not_allowed(self, request: Request, exc: Exception) -> Response:
        return self._error("this address does not take that kind of request", 405)

    # -- search ---------------------------------------------------------------------------------------------

    def search(self, request: Request) -> Response:
        params = request.query_params
        query = params.get("q", "")[:MAX_QUERY + 1]
        status = params.get("status") or None
        form = FormFilters(folder=params.get("folder") or None, since=params.get("since") or None,
                           until=params.get("until") or None, source=params.get("source") or None,
                           status="pending" if status == "pending" else "error" if status == "error" else None,
                           sort="date" if params.get("sort") == "date" else "score")
        page_text = params.get("page", "1")
        page = int(page_text) if page_text.isdigit() and 0 < len(page_text) < 7 else 1
        page = max(1, page)
        filtered = bool(form.folder or form.since or form.until or form.source or form.status)
        context: dict[str, Any] = {"query": query, "form": form, "error": None, "page": None, "hidden": 0,
                                   "filtered": filtered, "counted": "", "config_file": self._config_file()}
        bad = None
        if status not in (None, "pending", "error"):
            bad = f"status: expected pending or error, got {status!r}"
        elif form.folder and not Path(form.folder).is_absolute():
            bad = f"folder: give an absolute folder such as /home/you/Pictures/2023, not {form.folder!r}"
        if bad is None:
            try:
                with self._index() as index:
                    vector = self.meaning.query_vector(index, query) if query.strip() and form.status is None \
                        else None
                    result: ResultPage = results_page(index, query, form, page=page,
                                                      page_size=self.config.serve.page_size, vector=vector)
                context["page"] = result
                roots = self._roots(index)
                context["results"] = [r for r in result.results if servable(r.path, roots) is not None]
                # Rows whose file is gone, or lies below no configured root: said, not shown.
                context["hidden"] = len(result.results) - len(context["results"])
            except (QueryError, EditRefused) as exc:
                bad = str(exc)
            except CapwatchError as exc:  # the index: missing, locked, damaged
                return self._html("search.html", 503, **{**context, "error": str(exc)}, results=[], links={})
        if bad is not None:
            return self._html("search.html", 400, **{**context, "error": bad}, results=[], links={})
        keep = [(k, v) for k, v in parse_qsl(str(request.url.query), keep_blank_values=False)
                if k in ("q", "folder", "since", "until", "source", "status", "sort")]
        shown: ResultPage = context["page"]
        first = (page - 1) * self.config.serve.page_size + 1
        last = first + len(shown.results) - 1
        if shown.has_next:
            counted = f"photos {first}–{last} of more than {last}"
        elif page == 1:
            counted = "1 photo" if last == 1 else f"{last} photos"
        else:
            counted = f"photos {first}–{last} of {last}"
        links = {"prev": "/?" + urlencode([*keep, ("page", page - 1)]) if page > 1 else None,
                 "next": "/?" + urlencode([*keep, ("page", page + 1)]) if context["page"].has_next else None}
        context["counted"] = counted
        return self._html("search.html", **context, links=links)

    # -- photo ----------------------------------------------------------------------------------------------

    def photo(self, request: Request) -> Response:
        row_id = int(request.path_params["row_id"])
        with self._index() as index:
            photo = self._photo(index, row_id)
        if photo is None:
            return self._error("no such photo (or it is not below a configured folder)", 404)
        message = {"saved": "Saved: the caption is in the file, as your words.",
                   "kept": "Kept: the words in the file stay as they are.",
                   "recaptioned": "Captioned again by the model."}.get(request.query_params.get("done", ""))
        error = None
        note = self._note(row_id, request.query_params.get("note", ""))
        if note is not None:
            message, error = (note[1], None) if note[0] == "message" else (None, note[1])
        return self._photo_page(photo, message=message, error=error,
                                start=start_time(request.query_params.get("t")))

    def _photo_page(self, photo: Photo, *, message: str | None = None, error: str | None = None,
                    draft: str | None = None, status_code: int = 200,
                    in_file: tuple[Description, ...] = (), start: float | None = None) -> HTMLResponse:
        """The photo page; its edit form carries which descriptions the page shows (the caption, and ``in_file``:
        the file's descriptions, listed when it is shown again after a conflict) and the file identity they came
        from, so the save can tell whether the file still holds only those."""
        record = photo.record
        with self._index() as index:
            similar = [s for s in similar_photos(index, photo.row_id, self.meaning.model_id())
                       if self._photo(index, s.row_id) is not None]
        default = self.config.language.default
        # Each language item's form carries the key of the text it shows (the same optimistic check as the caption).
        others = [(lang, text, shown_keys([text])) for lang, text in record.captions
                  if lang.lower() != default.lower()]
        return self._html("photo.html", status_code, photo=photo, record=record, message=message, error=error,
                          draft=record.caption or "" if draft is None else draft, max_caption=MAX_CAPTION,
                          query="", in_file=in_file, origins=ORIGINS,
                          shown=shown_keys([record.caption, *(d.text for d in in_file)]), similar=similar,
                          default_language=default, other_languages=others, start=start)

    # -- duplicates -----------------------------------------------------------------------------------------

    def duplicates(self, request: Request) -> Response:
        """Groups of near-identical photos (``folder``, ``threshold`` as for `capwatch duplicates`)."""
        params = request.query_params
        folder = params.get("folder") or None
        try:
            threshold = float(params.get("threshold") or 0.95)
        except ValueError:
            threshold = -2.0
        if not -1.0 <= threshold <= 1.0:
            return self._error("threshold: give a number between -1 and 1, such as 0.95", 400)
        if folder and not Path(folder).is_absolute():
            return self._error(f"folder: give an absolute folder, not {folder!r}", 400)
        with self._index() as index:
            sets = duplicate_sets(index, self.meaning.model_id(), folder=folder, threshold=threshold)
            shown = [s for s in sets if sum(self._photo(index, t.row_id) is not None for t in s.tiles) > 1]
        return self._html("duplicates.html", sets=shown, threshold=threshold, folder=folder or "", query="")

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The POST's fields, or an error response: wrong type, too big, undecodable, too many fields, a
        foreign Origin or a missing/wrong CSRF token."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return self._error("refused: the form was sent from another site", 403)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return self._error("refused: send the page's form (application/x-www-form-urlencoded)", 415)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return self._error(f"request body too large (at most {MAX_BODY} bytes)", 413)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                              max_num_fields=MAX_FIELDS, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return self._error("refused: the form could not be read (not UTF-8, or too many fields)", 400)
        fields = dict(pairs)
        if not csrf_ok(self.settings.csrf, fields.get("csrf")):
            return self._error("refused: the form's security token is missing or out of date; reload the page "
                               "and try again", 403)
        return fields

    async def edit_caption(self, request: Request) -> Response:
        fields = await self._form(request)
        if isinstance(fields, Response):
            return fields
        row_id = int(request.path_params["row_id"])
        return await run_in_threadpool(self._save, row_id, fields)

    def _save(self, row_id: int, fields: dict[str, str]) -> Response:
        """Save a person's caption (``choice`` save, or ``mine`` from the conflict page), or answer the conflict
        page's other choices: ``keep`` (the file's words stay; the index learns them) and ``edit`` (the photo page
        again, with the file's words listed and the person's draft in the box)."""
        text = fields.get("caption", "")
        choice = fields.get("choice", "save")
        language = fields.get("language") or None
        with self._index(write=True) as index:
            photo = self._photo(index, row_id)
            if photo is None:
                return self._error("no such photo (or it is not below a configured folder)", 404)
            if choice not in ("save", "mine", "keep", "edit"):
                return self._photo_page(photo, error=f"unknown choice {choice[:20]!r}: nothing was written",
                                        draft=text[:MAX_CAPTION * 2], status_code=400)
            if choice in ("keep", "edit"):
                return self._keep_or_edit(index, photo, choice, text)
            # What the page showed: its form says so; a form without it (an old page, a script) showed the index's
            # caption, which is what the photo page shows.
            shown_before = (photo.record.caption if language is None else
                            next((t for lang, t in photo.record.captions if lang == language), None))
            shown = parse_shown(fields.get("shown", shown_keys([shown_before])))
            try:
                save_person_caption(self.config, index, photo.record, text, shown, language=language)
            except EditConflict as conflict:
                log.info("caption of %s not saved from the web page: the file holds other words", photo.record.path)
                return self._conflict(photo, conflict, changed=fields.get("seen", photo.record.fingerprint)
                                      != conflict.record.fingerprint, language=language)
            except EditRefused as exc:
                return self._photo_page(photo, error=str(exc), draft=text[:MAX_CAPTION * 2], status_code=422)
        log.info("caption of %s edited from the web page", photo.record.path)
        return RedirectResponse(f"/photo/{row_id}?done=saved", status_code=303)

    def _keep_or_edit(self, index: Index, photo: Photo, choice: str, text: str) -> Response:
        try:
            record, in_file = refresh_record(self.config, index, photo.record)
        except EditRefused as exc:
            return self._photo_page(photo, error=str(exc), draft=text[:MAX_CAPTION * 2], status_code=422)
        if choice == "keep":
            return RedirectResponse(f"/photo/{photo.row_id}?done=kept", status_code=303)
        return self._photo_page(Photo(photo.row_id, record, photo.file), draft=text[:MAX_CAPTION * 2],
                                in_file=in_file, message="The file holds the words listed below: edit your "
                                "caption and save it (or leave the page to keep theirs).")

    def _conflict(self, photo: Photo, conflict: EditConflict, *, changed: bool,
                  language: str | None = None) -> HTMLResponse:
        """The conflict page (409): the file's words and the person's, and a form for each choice; the forms
        carry which descriptions this page shows (for a ``language`` item's edit, also that item's text in the
        file, listed with the rest), so "replace with mine" is checked again."""
        record = conflict.record
        item = next((t for lang, t in record.captions if lang == language), None) if language else None
        fields = conflict.fields
        if item is not None:
            fields = (*fields, Description(item, "human", None, f"XMP dc:description ({language})"))
        reason = ("another program wrote into the file since capwatch last read it (after this page was made, or "
                  "while capwatch was not watching)" if changed else "the file holds words the page did not show you")
        return self._html("conflict.html", 409, photo=photo, record=record, fields=fields,
                          mine=conflict.mine, reason=reason, origins=ORIGINS, language=language or "",
                          shown=shown_keys([record.caption, *(d.text for d in fields)]), query="")

    async def recaption(self, request: Request) -> Response:
        fields = await self._form(request)
        if isinstance(fields, Response):
            return fields
        return await run_in_threadpool(self._recaption, int(request.path_params["row_id"]))

    def _recaption(self, row_id: int) -> Response:
        with self._index(write=True) as index:
            photo = self._photo(index, row_id)
            if photo is None:
                return self._error("no such photo (or it is not below a configured folder)", 404)
            try:
                outcome = self.model.recaption(self.config, index, photo.record)
            except CapwatchError as exc:
                return self._after_post(row_id, "error", str(exc).splitlines()[0])
        if outcome.error:
            return self._after_post(row_id, "error", outcome.error)
        if outcome.skipped:
            return self._after_post(row_id, "message", "Not captioned again: " + page_words(outcome.skipped))
        return RedirectResponse(f"/photo/{row_id}?done=recaptioned", status_code=303)

    def _after_post(self, row_id: int, kind: str, text: str) -> Response:
        """Redirect to the photo's page with a note to show there (so reloading it does not post again)."""
        key = secrets.token_urlsafe(9)
        with self._notes_lock:
            self._notes[key] = (row_id, kind, text)
            while len(self._notes) > MAX_NOTES:
                self._notes.popitem(last=False)
        return RedirectResponse(f"/photo/{row_id}?note={key}", status_code=303)

    def _note(self, row_id: int, key: str) -> tuple[str, str] | None:
        with self._notes_lock:
            note = self._notes.get(key)
        return (note[1], note[2]) if note is not None and note[0] == row_id else None

    # -- pictures -------------------------------------------------------------------------------------------

    def thumbnail(self, request: Request) -> Response:
        return self._picture(request, THUMB_PX)

    def preview(self, request: Request) -> Response:
        return self._picture(request, PREVIEW_PX)

    def _picture(self, request: Request, px: int) -> Response:
        with self._index() as index:
            photo = self._photo(index, int(request.path_params["row_id"]))
            roots = self._roots(index)
        if photo is None:
            return Response("no such photo", status_code=404, media_type="text/plain")
        # Opened once, below its root and through no link (whatever was swapped in since _photo looked is
        # refused), without blocking; decoded from this descriptor and cached under what fstat says of it.
        try:
            fd = open_servable(photo.file, roots)
        except NotRegularFile as exc:
            log.warning("thumbnail: %s: %s", photo.file, exc.strerror)
            return Response("this photo cannot be decoded", status_code=415, media_type="text/plain")
        except OSError:
            return Response("the photo is gone", status_code=404, media_type="text/plain")
        try:
            entry = Entry(photo.row_id, px, cache_key(photo.record.fingerprint, os.fstat(fd), px,
                                                       self.thumbs.variant))
            headers = {"ETag": f'"{entry.key}"', "Cache-Control": "private, max-age=3600"}
            if request.headers.get("if-none-match", "").strip() in (f'"{entry.key}"', f'W/"{entry.key}"'):
                return Response(status_code=304, headers=headers)
            data = self.thumbs.lookup(entry)
            if data is None and self.thumbs.failure(entry) is not None:
                # Said once when it failed; this very file (same key) is not decoded again.
                return Response("this photo cannot be decoded", status_code=415, media_type="text/plain")
            if data is None:
                try:
                    data = self.thumbs.render(fd, str(photo.file), entry)
                except ImageError as exc:
                    log.warning("thumbnail: %s", exc)
                    return Response("this photo cannot be decoded", status_code=415, media_type="text/plain")
                except Busy as exc:
                    return Response(str(exc), status_code=503, media_type="text/plain",
                                    headers={"Retry-After": "5"})
        finally:
            os.close(fd)
        return Response(data, media_type="image/webp", headers=headers)

    def _sweep_thumbnails(self, stop: threading.Event) -> int:
        """One sweep of the thumbnail cache against the index (on the pruner's thread: its own index)."""
        path = self.config.index_path()
        if not path.exists():
            return 0
        with Index.open(path, busy_timeout=self.config.index.busy_timeout_seconds, readonly=True) as index:

            def current(row_id: int, px: int) -> str | None:
                photo = self._photo(index, row_id)
                if photo is None:
                    return None
                try:
                    st = os.stat(photo.file)
                except OSError:
                    return None
                return cache_key(photo.record.fingerprint, st, px, self.thumbs.variant)

            return self.thumbs.prune(current, stop)

    def favicon(self, request: Request) -> Response:
        return FileResponse(HERE / "static" / "favicon.ico", media_type="image/x-icon",
                            headers={"Cache-Control": "private, max-age=86400"})

    def live(self, request: Request) -> Response:
        """The motion of a Live Photo whose still is this row: the MOV beside it, inside the same roots, opened and
        streamed as :meth:`video` does."""
        with self._index() as index:
            photo = self._photo(index, int(request.path_params["row_id"]))
            roots = self._roots(index)
            motion = paired_motion(index, photo.record.path) if photo is not None else None
        real = servable(str(motion), roots) if motion is not None else None
        if photo is None or motion is None or real is None:
            return Response("no such Live Photo", status_code=404, media_type="text/plain")
        try:
            fd = open_servable(real, roots)
        except OSError:
            return Response("the Live Photo's motion is gone", status_code=404, media_type="text/plain")
        etag = f'"{cache_key(None, os.fstat(fd), 0)}"'
        return ranged_response(fd, str(motion), request.headers.get("range"), request.headers.get("if-range"), etag)

    def video(self, request: Request) -> Response:
        """The video itself, for the photo page's player: whole, or the byte range asked for (see
        capwatch.web.media); only rows that are videos, opened under the same rules as thumbnails."""
        with self._index() as index:
            photo = self._photo(index, int(request.path_params["row_id"]))
            roots = self._roots(index)
        if photo is None or not is_video_name(photo.record.path):
            return Response("no such video", status_code=404, media_type="text/plain")
        try:
            fd = open_servable(photo.file, roots)
        except OSError:
            return Response("the video is gone", status_code=404, media_type="text/plain")
        etag = f'"{cache_key(photo.record.fingerprint, os.fstat(fd), 0)}"'
        return ranged_response(fd, photo.record.path, request.headers.get("range"), request.headers.get("if-range"),
                               etag)

    # -- status ---------------------------------------------------------------------------------------------

    def status(self, request: Request) -> Response:
        live = self.settings.live_state()
        index_path = self.config.index_path()
        facts: dict[str, Any] = {"index": str(index_path), "exists": index_path.exists(), "stats": None}
        if index_path.exists():
            try:
                facts["stats"], facts["counted_at"] = self._stats()
            except CapwatchError as exc:
                return self._html("status.html", 503, facts=facts, live=live, error=str(exc), query="",
                                  now=_now(), model=self._model_label(live), page_model=self.model.loaded,
                                  idle_unload=self.config.model.idle_unload_seconds)
        return self._html("status.html", facts=facts, live=live, error=None, query="", now=_now(),
                          model=self._model_label(live), page_model=self.model.loaded,
                          idle_unload=self.config.model.idle_unload_seconds)

    def _stats(self) -> tuple[IndexStats, str]:
        """The index's counts and when they were taken. Counting is a full pass over the index (about a second
        at 1 M images), so while the page refreshes itself every few seconds the counts are taken again at most
        every STATS_SECONDS; the daemon's live state is read fresh every time."""
        with self._stats_lock:
            now = time.monotonic()
            if self._stats_cache is None or now - self._stats_cache[0] >= STATS_SECONDS:
                with self._index() as index:
                    self._stats_cache = (now, index.stats(), _now())
            return self._stats_cache[1], self._stats_cache[2]

    def _model_label(self, live: dict[str, Any] | None) -> str:
        model = self.config.model
        configured = str(model.dir) if model.dir is not None else model.name
        return str(live.get("model") or configured) if live else configured


def _now() -> str:
    return dt.datetime.now().replace(microsecond=0).isoformat(sep=" ")
