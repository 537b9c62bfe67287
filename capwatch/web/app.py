"""The Starlette application of `capwatch serve`: settings, the guard every request passes, and assembly.

The guard (:class:`Guard`, plain ASGI) runs before any page: it refuses a Host header a loopback server does not
answer to (DNS rebinding), asks for the access token when one is set (the port's cookie, ``Authorization:
Bearer`` or ``?token=`` once, which sets the cookie and redirects to the same address on this server without it),
refuses request bodies over :data:`MAX_BODY`, and adds the security headers (a strict Content-Security-Policy: no
inline script, nothing from elsewhere). A request that passes tells the connection so (the ASGI extension
``capwatch.authorised``, set by :mod:`capwatch.web.gate`), which then no longer counts as a stranger's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capwatch.config import Config
from capwatch.errors import CapwatchError
from capwatch.web.editing import CaptionerSlot
from capwatch.web.security import LOOPBACK_NAMES, AccessToken, cookie_name, cookie_values
from capwatch.web.thumbnails import ThumbnailCache

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner

#: Largest request body accepted (a caption form is a few KB).
MAX_BODY = 64 * 1024
#: The ASGI scope extension a connection offers to hear that one of its requests carried the token.
AUTHORISED_EXTENSION = "capwatch.authorised"
HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = [
    (b"content-security-policy",
     # media-src: the photo page's players (a video, a Live Photo's motion); without it a browser refuses them.
     b"default-src 'none'; img-src 'self'; media-src 'self'; style-src 'self'; script-src 'self'; "
     b"form-action 'self'; "
     b"base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True)
class ServeSettings:
    """Everything the pages need, passed in (no globals).

    ``allowed_hosts``: Host names accepted (None = any, for a server reached by whatever name the network gives
    it, which then has a token). ``token``: required on every request when set. ``csrf``: the per-process token
    every form carries. ``live_state``: the running daemon's state for `status` (None when none runs).
    """

    config: Config
    csrf: str
    cache_dir: Path
    open_captioner: Callable[[], Captioner]
    live_state: Callable[[], dict[str, Any] | None]
    token: AccessToken | None = None
    allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES


def _host_name(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == b"host":
            host = str(value.decode("latin-1")).strip().lower()
            if host.startswith("["):
                return host.split("]", 1)[0] + "]"
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


def _offered_tokens(scope: Scope) -> tuple[list[str], bool]:
    """(the tokens the request offers, True when one came in the query string): the bearer header, the query's
    ``token``, and every cookie of this server's port's name."""
    offered: list[str] = []
    cookies: list[str] = []
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            auth = bytes(value).decode("latin-1")
            if auth[:7].lower() == "bearer ":
                offered.append(auth[7:].strip())
        elif key == b"cookie":
            cookies.append(bytes(value).decode("latin-1"))
    query = [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k == "token"]
    offered += query
    name = cookie_name(_port(scope))
    for header in cookies:
        offered += cookie_values(header, name)
    return offered, bool(query)


def _port(scope: Scope) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


def same_origin_target(scope: Scope, query: str) -> str:
    """The request's own path as a same-origin relative address, with ``query``: the path as it was sent
    (percent-encoding kept), its leading slashes and backslashes folded into one ``/``, so that neither
    ``//evil.example/`` nor ``/\\evil.example`` can turn into another host's address."""
    raw = scope.get("raw_path")
    path = bytes(raw).decode("latin-1") if raw else quote(scope.get("path", "/"))
    path = path.split("?", 1)[0]
    return "/" + path.lstrip("/\\") + (("?" + query) if query else "")


async def _refuse(scope: Scope, receive: Receive, send: Send, text: str, status: int) -> None:
    # A refused stranger's connection is closed after the answer, not kept alive for its next try.
    await PlainTextResponse(text, status_code=status, headers={"connection": "close"})(scope, receive, send)


def _mark_authorised(scope: Scope) -> None:
    mark = scope.get("extensions", {}).get(AUTHORISED_EXTENSION)
    if callable(mark):
        mark()


class Guard:
    """ASGI middleware: Host check, access token, body size limit, security headers (see the module doc)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.settings.allowed_hosts
        if allowed is not None and _host_name(scope) not in allowed:
            await _refuse(scope, receive, send, "unexpected Host header: open this page as http://127.0.0.1:PORT/",
                          421)
            return
        token = self.settings.token
        if token is not None:
            offered, in_query = _offered_tokens(scope)
            if not any(token.matches(value) for value in offered):
                # No path, no hint that anyone could follow but the person who started the server.
                await _refuse(scope, receive, send, "this capwatch page needs its access token: open the address "
                              "`capwatch serve` printed when it started (`capwatch serve --print-url` prints it "
                              "again for the account that runs the server)", 401)
                return
            _mark_authorised(scope)
            if in_query:
                # Move the token out of the address (history, screenshots) into an HttpOnly cookie, and send the
                # browser on to the same path on this server (never elsewhere).
                rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                     keep_blank_values=True) if k != "token"]
                response = RedirectResponse(same_origin_target(scope, urlencode(rest)), status_code=303)
                response.set_cookie(cookie_name(_port(scope)), token.value, httponly=True, samesite="strict",
                                    path="/")
                await response(scope, receive, send)
                return
        else:
            _mark_authorised(scope)
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await PlainTextResponse(f"request body too large (at most {MAX_BODY} bytes)",
                                    status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise BodyTooLarge()
            return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except BodyTooLarge:
            await PlainTextResponse(f"request body too large (at most {MAX_BODY} bytes)",
                                    status_code=413)(scope, receive, send)


class BodyTooLarge(Exception):
    """A chunked request body went past MAX_BODY."""


def _lifespan(on_start: Callable[[], None],
              on_close: Callable[[], None]) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        on_start()
        try:
            yield
        finally:
            on_close()

    return lifespan


def create_app(settings: ServeSettings) -> Starlette:
    """The application for ``settings``: pages, thumbnails, static files, all behind :class:`Guard`."""
    from capwatch.web import routes

    pages = routes.Pages(settings, ThumbnailCache(settings.cache_dir / "thumbnails",
                                                  max_bytes=settings.config.serve.thumbnail_cache_mb << 20,
                                                  embedded_previews=settings.config.serve.embedded_previews),
                         CaptionerSlot(settings.open_captioner, settings.config.model.idle_unload_seconds))
    app = Starlette(
        routes=[
            Route("/", pages.search, methods=["GET"]),
            Route("/photo/{row_id:int}", pages.photo, methods=["GET"]),
            Route("/photo/{row_id:int}/caption", pages.edit_caption, methods=["POST"]),
            Route("/photo/{row_id:int}/recaption", pages.recaption, methods=["POST"]),
            Route("/thumb/{row_id:int}", pages.thumbnail, methods=["GET"]),
            Route("/preview/{row_id:int}", pages.preview, methods=["GET"]),
            Route("/video/{row_id:int}", pages.video, methods=["GET", "HEAD"]),
            Route("/live/{row_id:int}", pages.live, methods=["GET", "HEAD"]),
            Route("/status", pages.status, methods=["GET"]),
            Route("/favicon.ico", pages.favicon, methods=["GET"]),
            Route("/duplicates", pages.duplicates, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={404: pages.not_found, 405: pages.not_allowed, CapwatchError: pages.unavailable},
        lifespan=_lifespan(pages.start, pages.close),
    )
    app.add_middleware(Guard, settings=settings)
    return app

