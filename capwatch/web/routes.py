"""The pages of `capwatch serve`: search grid, photo page (edit, re-caption), status, thumbnails.

Photos are named by their index row id only; no part of a request is ever used as a file path. A row is shown
and its file read only when :func:`capwatch.web.security.servable` says the file lies below a configured root.
Every page opens the index for itself (an Index belongs to one thread; Starlette runs these in a thread pool).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
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
from capwatch.library.index import ImageRecord, Index, IndexStats
from capwatch.web.app import HERE, MAX_BODY, ServeSettings
from capwatch.web.catalog import MARK_CLOSE, MARK_OPEN, MAX_QUERY, FormFilters, ResultPage, results_page
from capwatch.web.editing import MAX_CAPTION, CaptionerSlot, EditRefused, save_person_caption
from capwatch.web.security import csrf_ok, servable
from capwatch.web.thumbnails import PREVIEW_PX, THUMB_PX, ThumbnailCache, cache_key

log = logging.getLogger(__name__)
#: SQLite row ids are signed 64-bit; a larger number in the address names no photo.
MAX_ROW_ID = 2**63 - 1
#: The status page's counts are taken again at most this often (see Pages._stats).
STATS_SECONDS = 30.0
#: At most this many fields in a POST (the forms have two).
MAX_FIELDS = 8


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
    return env


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
        self.roots = tuple(r.path for r in self.config.library.roots)
        self._readers = threading.local()
        self._stats_lock = threading.Lock()
        self._stats_cache: tuple[float, IndexStats, str] | None = None

    # -- plumbing -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the model (server shutdown)."""
        self.model.close()

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
        real = servable(record.path, self.roots)
        return None if real is None else Photo(row_id, record, real)

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
        context: dict[str, Any] = {"query": query, "form": form, "error": None, "page": None, "hidden": 0}
        bad = None
        if status not in (None, "pending", "error"):
            bad = f"status: expected pending or error, got {status!r}"
        elif form.folder and not Path(form.folder).is_absolute():
            bad = f"folder: give an absolute folder such as /home/you/Pictures/2023, not {form.folder!r}"
        if bad is None:
            try:
                with self._index() as index:
                    result: ResultPage = results_page(index, query, form, page=page,
                                                      page_size=self.config.serve.page_size)
                context["page"] = result
                context["results"] = [r for r in result.results if servable(r.path, self.roots) is not None]
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
        links = {"prev": "/?" + urlencode([*keep, ("page", page - 1)]) if page > 1 else None,
                 "next": "/?" + urlencode([*keep, ("page", page + 1)]) if context["page"].has_next else None}
        return self._html("search.html", **context, links=links)

    # -- photo ----------------------------------------------------------------------------------------------

    def photo(self, request: Request) -> Response:
        row_id = int(request.path_params["row_id"])
        with self._index() as index:
            photo = self._photo(index, row_id)
        if photo is None:
            return self._error("no such photo (or it is not below a configured folder)", 404)
        message = {"saved": "Saved: the caption is in the file, as your words.",
                   "recaptioned": "Captioned again by the model."}.get(request.query_params.get("done", ""))
        return self._photo_page(photo, message=message)

    def _photo_page(self, photo: Photo, *, message: str | None = None, error: str | None = None,
                    draft: str | None = None, status_code: int = 200) -> HTMLResponse:
        record = photo.record
        default = self.config.language.default
        others = [(lang, text) for lang, text in record.captions if lang.lower() != default.lower()]
        return self._html("photo.html", status_code, photo=photo, record=record, message=message, error=error,
                          draft=record.caption or "" if draft is None else draft, max_caption=MAX_CAPTION,
                          query="", default_language=default, other_languages=others)

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
        return await run_in_threadpool(self._save, row_id, fields.get("caption", ""), fields.get("language") or None)

    def _save(self, row_id: int, text: str, language: str | None = None) -> Response:
        with self._index(write=True) as index:
            photo = self._photo(index, row_id)
            if photo is None:
                return self._error("no such photo (or it is not below a configured folder)", 404)
            try:
                save_person_caption(self.config, index, photo.record, text, language=language)
            except EditRefused as exc:
                return self._photo_page(photo, error=str(exc), draft=text[:MAX_CAPTION * 2], status_code=422)
        log.info("caption of %s edited from the web page", photo.record.path)
        return RedirectResponse(f"/photo/{row_id}?done=saved", status_code=303)

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
                return self._photo_page(photo, error=str(exc).splitlines()[0], status_code=503)
            refreshed = self._photo(index, row_id) or photo
        if outcome.error:
            return self._photo_page(refreshed, error=outcome.error, status_code=422)
        if outcome.skipped:
            return self._photo_page(refreshed, message=f"Not captioned again: {outcome.skipped}")
        return RedirectResponse(f"/photo/{row_id}?done=recaptioned", status_code=303)

    # -- pictures -------------------------------------------------------------------------------------------

    def thumbnail(self, request: Request) -> Response:
        return self._picture(request, THUMB_PX)

    def preview(self, request: Request) -> Response:
        return self._picture(request, PREVIEW_PX)

    def _picture(self, request: Request, px: int) -> Response:
        with self._index() as index:
            photo = self._photo(index, int(request.path_params["row_id"]))
        if photo is None:
            return Response("no such photo", status_code=404, media_type="text/plain")
        try:
            st = photo.file.stat()
        except OSError:
            return Response("the photo is gone", status_code=404, media_type="text/plain")
        key = cache_key(photo.record.fingerprint, st.st_size, st.st_mtime_ns, px)
        headers = {"ETag": f'"{key}"', "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match", "").strip() in (f'"{key}"', f'W/"{key}"'):
            return Response(status_code=304, headers=headers)
        rendered = self.thumbs.lookup(key)
        if rendered is None:
            try:
                rendered = self.thumbs.render(photo.file, key, px)
            except ImageError as exc:
                log.warning("thumbnail: %s", exc)
                return Response("this photo cannot be decoded", status_code=415, media_type="text/plain")
        return FileResponse(rendered.path, media_type="image/webp", headers=headers)

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
                                  now=_now(), model=self._model_label(live))
        return self._html("status.html", facts=facts, live=live, error=None, query="", now=_now(),
                          model=self._model_label(live))

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
