"""A running daemon (or `capwatch serve`) embeds search queries for `capwatch search`, over a Unix socket beside
the index (``INDEX.embed.sock``, mode 0600: only the daemon's user), so that a search does not load the text model
itself.

Protocol: the client sends one JSON line ``{"text": "...", "nearest": N}``; the daemon answers one JSON line
``{"model": MODEL_ID, "vector": BASE64 of float32 little-endian, "nearest": [[row id, cosine], ...]}`` (the N
images nearest to it, unfiltered, searched with the sign-bit codes the daemon keeps in memory; omitted when N is
0) or ``{"error": "one line"}``. The model is loaded when the daemon starts (in the server's thread, never
downloaded) and stays loaded; so do the codes after the first search.
"""

from __future__ import annotations

import array
import base64
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capwatch.config import Config

if TYPE_CHECKING:
    from capwatch.models.embedding import ImageTextEmbedder

log = logging.getLogger(__name__)
#: Longest request line read (a query is far shorter).
MAX_REQUEST = 16_384


def socket_path(index_path: Path) -> Path:
    """Where the daemon that uses ``index_path`` answers text-embedding requests."""
    return index_path.with_name(index_path.name + ".embed.sock")


class TextEmbedServer:
    """The socket server; :meth:`start` returns at once, :meth:`stop` closes and removes the socket."""

    def __init__(self, config: Config, index_path: Path) -> None:
        self._config = config
        self._index_path = index_path
        self._index: Any = None
        self._vectors: Any = None
        self.path = socket_path(index_path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._embedder: ImageTextEmbedder | None = None
        self._lock = threading.Lock()
        #: (device, inode) of the socket file this server bound: stop() removes only that file, not the socket
        #: of a daemon that took the path over meanwhile.
        self._bound: tuple[int, int] | None = None

    def start(self) -> None:
        """Bind the socket (a stale one from a killed daemon is replaced: the instance lock says none runs) and
        serve in a thread. A socket that cannot be made is logged; searches then load the model themselves."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(8)
            sock.settimeout(0.5)
        except OSError as exc:
            sock.close()
            log.warning("queries will load the embedding model themselves: cannot make %s: %s", self.path,
                        exc.strerror or exc)
            return
        self._sock = sock
        with contextlib.suppress(OSError):
            st = self.path.stat()
            self._bound = (st.st_dev, st.st_ino)
        self._thread = threading.Thread(target=self._serve, name="capwatch-text-embed", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from capwatch.library.embed import query_embedder

        self._embedder, why = query_embedder(self._config)
        if self._embedder is None:
            log.debug("no text embeddings for searches: %s", why)
        else:
            try:
                self._embedder.embed_texts(["warm up"])  # load now, not on the first search
            except Exception as exc:  # a model that cannot run: searches load their own
                log.warning("embedding model for searches: %s", str(exc).splitlines()[0] if str(exc) else exc)
                self._embedder = None
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with conn:
                conn.settimeout(5.0)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(self._answer(conn)).encode() + b"\n")

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        data = b""
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0])
            text, wanted = request["text"], int(request.get("nearest") or 0)
            if not isinstance(text, str) or not text.strip() or not 0 <= wanted <= 10_000:
                raise ValueError("no text")
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"error": 'send one JSON line {"text": "...", "nearest": N}'}
        if self._embedder is None:
            return {"error": "this daemon has no embedding model"}
        with self._lock:
            try:
                vector = self._embedder.embed_texts([text])[0]
            except Exception as exc:  # the client falls back to its own model
                return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        import numpy as np

        answer: dict[str, Any] = {"model": self._embedder.model_id,
                                  "vector": base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()}
        if wanted:
            try:
                answer["nearest"] = self._nearest(self._embedder.model_id, vector, wanted)
            except Exception as exc:  # the client searches itself
                log.debug("no nearest images for a search: %s", exc)
        return answer

    def _nearest(self, model: str, vector: Any, wanted: int) -> list[list[float | None]]:
        """The ``wanted`` nearest images (unfiltered) from this thread's own read-only index, whose codes stay in
        memory between searches (reloaded when the vectors change), as [row id, cosine, seconds of a video's
        best moment or None]."""
        from capwatch.library.index import Index
        from capwatch.library.moments import nearest_assets
        from capwatch.library.vectors import Vectors

        if self._index is None:
            self._index = Index.open(self._index_path, busy_timeout=self._config.index.busy_timeout_seconds,
                                     readonly=True)
            self._vectors = Vectors(self._index)
        return [[hit.image_id, hit.similarity, hit.at]
                for hit in nearest_assets(self._vectors, self._index, model, vector, limit=wanted)]

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._bound:
                self.path.unlink()
        if self._embedder is not None:
            with contextlib.suppress(Exception):
                self._embedder.close()
        if self._index is not None:
            with contextlib.suppress(Exception):
                self._index.close()


def is_served(index_path: Path) -> bool:
    """True when a process listens on the query-embedding socket of ``index_path`` (a daemon, or `capwatch
    serve`), whether or not its model has loaded yet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(socket_path(index_path)))
        except OSError:
            return False
    return True


#: What a daemon answers: (model id, float32 vector as an ``array("f")``, the nearest images as (row id, cosine) or
#: None, (row id, seconds) of the videos among them at their best moment).
Answer = tuple[str, Any, "tuple[tuple[int, float], ...] | None", tuple[tuple[int, float], ...]]


class PendingAnswer:
    """A question sent to the running daemon whose answer has not been read yet (:func:`send`): the caller does
    its own work meanwhile (a search imports the library and opens its index while the daemon embeds and
    searches), then reads it with :meth:`receive`. Close it (or use it as a context manager) when the answer is
    not wanted after all."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock: socket.socket | None = sock
        self._deadline = deadline

    def receive(self) -> Answer | None:
        """The answer (see :data:`Answer`), or None when the daemon gave none (it has no model, failed, or took
        longer than the timeout given to :func:`send`, counted from the sending). Reads it once; closes."""
        sock = self._sock
        if sock is None:
            return None
        try:
            data = b""
            while not data.endswith(b"\n"):
                sock.settimeout(max(0.001, self._deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return _parse(data)
        except OSError as exc:
            log.debug("no text embedding from a running daemon: %s", exc)
            return None
        finally:
            self.close()

    def close(self) -> None:
        """Hang up without reading the answer (the daemon's write then fails quietly)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> PendingAnswer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send(index_path: Path, text: str, *, nearest: int = 0, timeout: float = 3.0) -> PendingAnswer | None:
    """Ask the daemon that serves ``index_path`` for the embedding of ``text`` (and its ``nearest`` images) without
    waiting for the answer; None when no daemon listens there (none runs, it is another user's). ``timeout``
    bounds the whole exchange, sending to answer."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        # No socket, or one in a folder this user may not enter (a service's state folder): connect() says so,
        # and the search goes on to open the index itself, which then reports what is wrong in one line.
        sock.connect(str(socket_path(index_path)))
        sock.sendall(json.dumps({"text": text, "nearest": nearest}).encode() + b"\n")
    except OSError as exc:
        sock.close()
        log.debug("no text embedding from a running daemon: %s", exc)
        return None
    return PendingAnswer(sock, deadline)


def ask(index_path: Path, text: str, *, nearest: int = 0, timeout: float = 3.0) -> Answer | None:
    """The running daemon's (model id, float32 vector as an ``array("f")``, its ``nearest`` images as (row id,
    cosine) or None, (row id, seconds) of the videos among them at their best moment) for ``text``, or None when
    no daemon answers (none runs, it has no model, it is another user's, it took longer than ``timeout``):
    :func:`send` and :meth:`PendingAnswer.receive` at once."""
    pending = send(index_path, text, nearest=nearest, timeout=timeout)
    return None if pending is None else pending.receive()


def _parse(data: bytes) -> Answer | None:
    """The answer in the daemon's JSON line ``data``; None for an error answer or a line that is not one."""
    try:
        answer = json.loads(data)
        if "error" in answer:
            log.debug("the running daemon did not embed the query: %s", answer["error"])
            return None
        near = answer.get("nearest")
        hits = None if near is None else tuple((int(h[0]), float(h[1])) for h in near)
        # [id, cosine, seconds] for a video found at a moment (issue 23); [id, cosine] from an older daemon.
        moments = () if near is None else tuple((int(h[0]), float(h[2])) for h in near
                                                if len(h) > 2 and h[2] is not None)
        # array, not numpy: a search the daemon answered never loads numpy.
        vector = array.array("f", base64.b64decode(answer["vector"]))
        if sys.byteorder == "big":
            vector.byteswap()
        return str(answer["model"]), vector, hits, moments
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        log.debug("no text embedding from a running daemon: %s", exc)
        return None
