"""Servers on 127.0.0.1 that misbehave on purpose, for tests/test_hub_hostile.py.

``Scripted(answer)`` runs a real HTTP server (``ThreadingHTTPServer``) whose every answer is written by the test's
``answer(exchange)`` function: a normal reply, raw bytes (garbage status lines, broken headers), a slow trickle, a
stall, or a CONNECT tunnel (to act as an ``https_proxy``). With ``tls`` it also speaks TLS on the same port (the
first byte of a connection tells which), so ``https://127.0.0.1:P`` and ``http://127.0.0.1:P`` are one port with
two schemes. Every request is logged with its port and scheme (``seen``) so tests can assert where a header went.
``tarpit()`` accepts connections and never answers (not even a TLS handshake).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

#: No server-side wait (trickle, stall, tunnel) lasts longer than this, whatever the client does.
SERVER_BOUND = 8.0


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    port: int
    scheme: str
    method: str
    #: The request target as sent: a path, an absolute URL (through a proxy) or host:port (CONNECT).
    target: str
    authorization: str | None
    range: str | None


Answer = Callable[["Exchange"], None]


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl command line): (certificate, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


class Exchange(BaseHTTPRequestHandler):
    """One request; the test's answer function writes the reply through the helpers below."""

    server: _Server
    # A client that stops reading must not keep a server thread for long.
    timeout = SERVER_BOUND
    scheme = "http"

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def setup(self) -> None:
        tls = self.server.tls
        if tls is not None:
            self.request.settimeout(SERVER_BOUND)
            if self.request.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS ClientHello, not an HTTP request line
                self.request = tls.wrap_socket(self.request, server_side=True)
                self.scheme = "https"
        super().setup()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_CONNECT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.close_connection = True
        with self.server.lock:
            self.server.seen.append(Seen(self.server.port, self.scheme, self.command, self.path,
                                         self.headers.get("Authorization"), self.headers.get("Range")))
        # The client giving up first is what many tests provoke.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.server.answer(self)

    # -- helpers for answer functions -------------------------------------------------------------------------
    def raw(self, data: bytes) -> None:
        """Write ``data`` as it is and flush."""
        self.wfile.write(data)
        self.wfile.flush()

    def reply(self, status: int, headers: Mapping[str, str] | Iterable[tuple[str, str]] = (), body: bytes = b"",
              *, length: bool = True) -> None:
        """A reply with ``headers`` (plus Content-Length unless ``length`` is False or it is given) and ``body``
        (not sent to a HEAD)."""
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        if length and not any(name.lower() == "content-length" for name, _ in items):
            items.append(("Content-Length", str(len(body))))
        lines = "".join(f"{k}: {v}\r\n" for k, v in items)
        head = f"HTTP/1.1 {status} Whatever\r\n{lines}Connection: close\r\n\r\n"
        self.raw(head.encode("latin-1") + (b"" if self.command == "HEAD" else body))

    def trickle(self, data: bytes, *, every: float, step: int = 1) -> None:
        """Send ``data`` ``step`` bytes at a time, one step every ``every`` seconds, until done or the client hangs
        up (bounded by SERVER_BOUND)."""
        until = time.monotonic() + SERVER_BOUND
        for start in range(0, len(data), step):
            if self.server.closing.is_set() or time.monotonic() > until:
                return
            self.raw(data[start:start + step])
            time.sleep(every)

    def stall(self) -> None:
        """Send nothing more; return when the client hangs up or the server closes (bounded by SERVER_BOUND)."""
        until = time.monotonic() + SERVER_BOUND
        self.connection.settimeout(0.05)
        while not self.server.closing.is_set() and time.monotonic() < until:
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return
            except TimeoutError:
                continue
            except OSError:
                return
            time.sleep(0.05)  # the client sent more (it should not): just keep waiting

    def tunnel(self) -> None:
        """Answer a CONNECT to 127.0.0.1 by piping bytes both ways, as an https proxy does."""
        host, _, port = self.path.rpartition(":")
        if host != "127.0.0.1":
            self.reply(403)
            return
        with socket.create_connection((host, int(port)), timeout=SERVER_BOUND) as upstream:
            self.raw(b"HTTP/1.1 200 Connection established\r\n\r\n")
            _pipe(self.connection, upstream, self.server.closing)


def _pipe(a: socket.socket, b: socket.socket, closing: threading.Event) -> None:
    until = time.monotonic() + SERVER_BOUND
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        while not closing.is_set() and time.monotonic() < until:
            for key, _ in selector.select(timeout=0.05):
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                data = source.recv(65536)
                if not data:
                    return
                key.data.sendall(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a trickle to a client that left must not hold up the test
    answer: Answer
    tls: ssl.SSLContext | None
    seen: list[Seen]
    lock: threading.Lock
    closing: threading.Event
    port: int

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that rejects our certificate or hangs up is expected here


class Scripted:
    """``with Scripted(answer) as server: server.url``; ``tls`` adds TLS on the same port (``server.https_url``)."""

    def __init__(self, answer: Answer, *, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self._tls = tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[Seen]:
        assert self._server is not None
        with self._server.lock:
            return list(self._server.seen)

    def __enter__(self) -> Scripted:
        server = _Server(("127.0.0.1", 0), Exchange)
        server.answer = lambda exchange: self.answer(exchange)  # tests may swap ``answer`` while it runs
        server.tls, server.seen, server.lock = self._tls, [], threading.Lock()
        server.closing = threading.Event()
        server.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._server is not None and self._thread is not None
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def tarpit() -> Iterator[str]:
    """A port on 127.0.0.1 that accepts connections and never sends a byte; yields ``127.0.0.1:PORT``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()
