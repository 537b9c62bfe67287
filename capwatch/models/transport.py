"""An urllib opener for untrusted servers: http and https only, and every connection under a watchdog.

A socket timeout bounds each read, but a server that sends one byte before every timeout keeps a request alive
forever. Here each connection has a watchdog thread that shuts its socket down when the status line and headers are
not all in within ``Limits.headers`` of the start of the request (connect, proxy tunnel and TLS handshake included),
or when the body brings fewer than ``Limits.min_bytes`` in a ``Limits.window``; whatever read is blocked then
returns at once and the request fails with the reason. The opener has no file, ftp, data or redirect handler:
the caller (``capwatch.models.hub``) decides every redirect itself.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

#: Seconds to wait for any answer (connect, or the next bytes of headers or body) before counting it a failure.
TIMEOUT = 15.0
#: Seconds from the start of a request until its status line and headers are all in, however slowly they trickle.
HEADERS_DEADLINE = 60.0
#: A body must bring at least MIN_BYTES in every RATE_WINDOW seconds (64 KiB per 30 s, about 2 KiB/s): a mirror
#: that trickles a byte now and then must not hold a pull, and the model lock, forever.
MIN_BYTES = 64 * 1024
RATE_WINDOW = 30.0
#: Attempts per request; a failed download attempt leaves its bytes for the next one to continue.
ATTEMPTS = 3
#: Redirects followed per request.
MAX_REDIRECTS = 10


@dataclass(frozen=True)
class Limits:
    """How long, how slowly and how often the hub may answer before a request counts as failed.

    The defaults are the module constants; tests pass small values instead of waiting minutes. Raises ValueError
    for a time that is not positive, fewer than one attempt, or a negative count.
    """

    #: Seconds for one network wait: connecting, or the next bytes of headers or body.
    timeout: float = TIMEOUT
    #: Seconds from the start of a request (connect, proxy tunnel, TLS handshake included) to complete headers.
    headers: float = HEADERS_DEADLINE
    #: A body must bring at least ``min_bytes`` in every ``window`` seconds.
    min_bytes: int = MIN_BYTES
    window: float = RATE_WINDOW
    #: Attempts per request (a failed download attempt leaves its bytes for the next).
    attempts: int = ATTEMPTS
    #: Redirects followed per request.
    redirects: int = MAX_REDIRECTS

    def __post_init__(self) -> None:
        if min(self.timeout, self.headers, self.window) <= 0 or self.attempts < 1 or self.min_bytes < 0 \
                or self.redirects < 0:
            raise ValueError(f"invalid hub limits: {self}")


#: What head_file and download_file use unless told otherwise.
LIMITS = Limits()


#: What the hub uses unless told otherwise.
LIMITS = Limits()


def opener(limits: Limits) -> urllib.request.OpenerDirector:
    """An opener for http/https only whose connections are watched (see the module docstring)."""
    # Built by hand: build_opener would add FileHandler, FTPHandler and DataHandler (a redirect could then read a
    # local file) and a redirect handler (_open follows redirects itself, to keep the X-Linked-* headers of an LFS
    # redirect and to decide where the token goes). An error status, redirects included, raises HTTPError.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),  # https_proxy / http_proxy / no_proxy from the environment
        urllib.request.UnknownHandler(),
        _HTTPHandler(limits),
        _HTTPSHandler(limits),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


# --------------------------------------------------------------------------------------------------------------
# Deadlines: a watchdog per connection


class _Watchdog:
    """Ends one connection that is too slow: headers not all in by the deadline, or a body below the minimum rate.

    A socket timeout cannot do this: it bounds each read, and a server that sends a byte before every timeout keeps
    a request alive forever. The watchdog shuts the socket down from its own thread, which makes whatever read is
    blocked (status line, headers, TLS handshake, proxy tunnel, body, chunk trailers) return at once; ``reason``
    then says why.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._cond = threading.Condition()
        self._phase = "idle"  # -> "headers" -> "body" -> "done"
        # A duplicate of the connection's socket, ours to close: wrapping it in TLS detaches the original object
        # from its descriptor, and the shutdown must still reach the connection during the handshake.
        self._sock: socket.socket | None = None
        self._count = 0
        self.reason: str | None = None

    def start(self) -> None:
        """Start the headers deadline (once; later calls do nothing)."""
        with self._cond:
            if self._phase != "idle":
                return
            self._phase = "headers"
        threading.Thread(target=self._run, name="capwatch-hub-watchdog", daemon=True).start()

    def watch(self, sock: socket.socket) -> None:
        """Hold on to the connection's socket (the first one given). Raises TimeoutError when the deadline has
        already passed."""
        with self._cond:
            if self.reason is None and self._phase in ("headers", "body") and self._sock is None:
                # fromfd duplicates the descriptor (an SSLSocket has no dup()).
                self._sock = socket.fromfd(sock.fileno(), sock.family, sock.type)
            if self.reason is not None:
                raise TimeoutError(self.reason)

    def headers_in(self) -> str | None:
        """Switch from the headers deadline to the body rate; returns the reason if the deadline already passed."""
        with self._cond:
            if self.reason is None and self._phase == "headers":
                self._phase = "body"
                self._cond.notify_all()
            return self.reason

    def advance(self, count: int) -> None:
        """Count body bytes that arrived."""
        with self._cond:
            self._count += count

    def stop(self) -> str | None:
        """Stop watching (any number of times); returns why the connection was ended, or None if it was not."""
        with self._cond:
            self._phase = "done"
            self._cond.notify_all()
            return self.reason

    def _run(self) -> None:
        limits = self._limits
        try:
            with self._cond:
                deadline = time.monotonic() + limits.headers
                while self._phase == "headers":
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._trip(f"no complete status line and headers within {limits.headers:g} s")
                        return
                    self._cond.wait(left)
                while self._phase == "body":
                    counted, until = self._count, time.monotonic() + limits.window
                    while self._phase == "body" and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
                    got = self._count - counted
                    if self._phase == "body" and got < limits.min_bytes:
                        self._trip(f"too slow: {got} bytes in the last {limits.window:g} s, below the minimum of "
                                   f"{limits.min_bytes} bytes per {limits.window:g} s")
                        return
        finally:
            with self._cond:
                sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()

    def _trip(self, reason: str) -> None:
        # Called with the lock held.
        self.reason = reason
        self._phase = "done"
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


class GuardedResponse(http.client.HTTPResponse):
    """A response whose connection stays watched (body rate) until the response is closed."""

    watchdog: _Watchdog | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()


class _HTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection under a _Watchdog: complete headers by ``limits.headers``, then the body rate."""

    response_class = GuardedResponse

    def __init__(self, host: str, *, limits: Limits, **kwargs: Any) -> None:
        self._watchdog = _Watchdog(limits)
        super().__init__(host, **kwargs)
        # http.client opens its socket through this attribute (the TCP connection, before any proxy tunnel or TLS
        # handshake), so the watchdog holds the socket from the moment it exists.
        self._create_connection = self._connect_watched

    def _connect_watched(
        self, address: tuple[str, int], timeout: float | None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        sock = socket.create_connection(address, timeout, source_address)
        try:
            self._watchdog.watch(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        """Connect and send the request; raises TimeoutError naming the deadline when the watchdog ended it."""
        self._watchdog.start()
        try:
            super().request(*args, **kwargs)
            if self.sock is not None:
                # Normally watched since it was created (_connect_watched); this covers an http.client that no
                # longer opens its sockets through _create_connection (then only from here on).
                self._watchdog.watch(self.sock)
        except BaseException as exc:
            reason = self._watchdog.stop()
            if reason is not None and isinstance(exc, OSError | http.client.HTTPException):
                raise TimeoutError(reason) from None
            raise

    def getresponse(self) -> http.client.HTTPResponse:
        """The response once its status line and headers are in; raises TimeoutError when they were not in time."""
        try:
            response = super().getresponse()
        except BaseException as exc:
            reason = self._watchdog.stop()
            if reason is not None and isinstance(exc, OSError | http.client.HTTPException):
                raise TimeoutError(reason) from None
            raise
        # A shutdown in the middle of the headers looks like their end to http.client: trust no response that
        # came after the deadline.
        reason = self._watchdog.headers_in()
        if reason is not None or not isinstance(response, GuardedResponse):
            self._watchdog.stop()
            if reason is not None:
                response.close()
                raise TimeoutError(reason)
            return response
        response.watchdog = self._watchdog
        return response


class _HTTPSConnection(_HTTPConnection, http.client.HTTPSConnection):
    """The same for https (the TLS handshake is within the headers deadline)."""


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self._limits = limits

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, limits=self._limits), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    # No context here: http.client makes the default one per connection, which honours $SSL_CERT_FILE.
    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self._limits = limits

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPSConnection, limits=self._limits), req)


