"""The Starlette application of `capwatch serve`: settings, the guard every request passes, and assembly.

The guard (:class:`Guard`, plain ASGI) runs before any page: it refuses a Host header a loopback server does not
answer to (DNS rebinding), asks for the access token when one is set (cookie, ``Authorization: Bearer`` or
``?token=`` once, which sets the cookie), refuses request bodies over :data:`MAX_BODY`, and adds the security
headers (a strict Content-Security-Policy: no inline script, nothing from elsewhere).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capwatch.config import Config
from capwatch.errors import CapwatchError
from capwatch.web.editing import CaptionerSlot
from capwatch.web.security import LOOPBACK_NAMES, AccessToken
from capwatch.web.thumbnails import ThumbnailCache

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner

#: Largest request body accepted (a caption form is a few KB).
MAX_BODY = 64 * 1024
TOKEN_COOKIE = "capwatch_token"
HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; "
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


def _offered_token(scope: Scope) -> tuple[str | None, bool]:
    """(the token the request offers, True when it came in the query string)."""
    headers: dict[bytes, str] = {bytes(k): bytes(v).decode("latin-1") for k, v in scope.get("headers", [])}
    auth = headers.get(b"authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    if query.get("token"):
        return query["token"], True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", ""))
    except Exception:  # a malformed Cookie header offers no token
        return None, False
    morsel = cookie.get(TOKEN_COOKIE)
    return (morsel.value if morsel else None), False


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
            await PlainTextResponse("unexpected Host header: open this page as http://127.0.0.1:PORT/",
                                    status_code=421)(scope, receive, send)
            return
        token = self.settings.token
        if token is not None:
            offered, in_query = _offered_token(scope)
            if not token.matches(offered):
                await PlainTextResponse("this capwatch server needs its access token: open it once as "
                                        "http://HOST:PORT/?token=TOKEN (the token is in " + str(token.path) + ")",
                                        status_code=401)(scope, receive, send)
                return
            if in_query:
                # Move the token out of the address (history, screenshots) into an HttpOnly cookie.
                rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                     keep_blank_values=True) if k != "token"]
                target = scope.get("path", "/") + (("?" + urlencode(rest)) if rest else "")
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(TOKEN_COOKIE, token.value, httponly=True, samesite="strict", path="/")
                await response(scope, receive, send)
                return
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


def _lifespan(on_close: Callable[[], None]) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            on_close()

    return lifespan


def create_app(settings: ServeSettings) -> Starlette:
    """The application for ``settings``: pages, thumbnails, static files, all behind :class:`Guard`."""
    from capwatch.web import routes

    pages = routes.Pages(settings, ThumbnailCache(settings.cache_dir / "thumbnails"),
                         CaptionerSlot(settings.open_captioner))
    app = Starlette(
        routes=[
            Route("/", pages.search, methods=["GET"]),
            Route("/photo/{row_id:int}", pages.photo, methods=["GET"]),
            Route("/photo/{row_id:int}/caption", pages.edit_caption, methods=["POST"]),
            Route("/photo/{row_id:int}/recaption", pages.recaption, methods=["POST"]),
            Route("/thumb/{row_id:int}", pages.thumbnail, methods=["GET"]),
            Route("/preview/{row_id:int}", pages.preview, methods=["GET"]),
            Route("/status", pages.status, methods=["GET"]),
            Route("/duplicates", pages.duplicates, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={404: pages.not_found, 405: pages.not_allowed, CapwatchError: pages.unavailable},
        lifespan=_lifespan(pages.close),
    )
    app.add_middleware(Guard, settings=settings)
    return app

