"""A small, real HTTP server on 127.0.0.1 that answers like the Hugging Face hub's file endpoint.

``/{org}/{repo}/resolve/{revision}/{path}`` (HEAD and GET):

* files stored in "LFS" (``.onnx``): ``302`` to ``/cdn/<sha256>`` with ``X-Repo-Commit``, ``X-Linked-Etag`` (the
  sha256) and ``X-Linked-Size``, as the hub redirects LFS files to its CDN;
* other files: ``200`` with ``ETag`` = git blob sha1 and ``X-Repo-Commit``;
* unknown repository / revision / file: ``404`` with the hub's ``X-Error-Code``.

``/cdn/<sha256>`` serves the bytes with ``Range`` support (``206`` + ``Content-Range``). Faults for tests: cut the
connection in the middle of a body a given number of times, serve bytes that do not match the advertised
sha256, or point an LFS redirect somewhere else (``redirect``: another scheme, a file on the client's machine).
Every request is logged (method, path, Range header) so tests can assert what the client did.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    #: The Authorization header that came with the request, if any.
    authorization: str | None = None


@dataclass
class _Blob:
    data: bytes
    #: What the server claims the content is (a wrong claim simulates corruption in transit or at rest).
    advertised_sha256: str
    cuts_left: int = 0


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    #: path -> bytes served instead of the published ones (the ETag still names the published ones)
    served: dict[str, bytes] = field(default_factory=dict)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """Serve repositories from memory; use as a context manager (``with FakeHub() as hub: hub.url``)."""

    def __init__(self, *, cdn: FakeHub | None = None, honour_range: bool = True) -> None:
        """``cdn``: another FakeHub that serves the LFS bytes (a different host, as the hub's CDN is).
        ``honour_range=False`` answers every GET with the whole file (status 200), as some proxies do."""
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, _Blob] = {}
        self._lock = threading.Lock()
        self._cdn = cdn
        self.honour_range = honour_range
        self._failures: list[int] = []
        #: sha256 -> the Location an LFS redirect for that content points at instead of this hub's (or its CDN's)
        self._locations: dict[str, str] = {}
        #: path -> the X-Linked-Size announced for an LFS file instead of its real size
        self._sizes: dict[str, int] = {}
        self.requests: list[Request] = []
        #: When set, every GET of LFS content waits (up to 60 s) until this event is set: a download held in
        #: progress for as long as a test needs to look at the client meanwhile.
        self.hold: threading.Event | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------------------------
    def add_commit(self, repo: str, commit: str, files: Mapping[str, bytes], *, branch: str | None = "main") -> None:
        """Publish ``files`` as ``commit`` of ``repo`` (and point ``branch`` at it)."""
        entry = self._repos.setdefault(repo, _Repo())
        entry.commits[commit] = dict(files)
        if branch:
            entry.branches[branch] = commit
        store = (self._cdn or self)._blobs
        for path, data in files.items():
            if self.is_lfs(path):
                store.setdefault(sha256(data), _Blob(data, sha256(data)))

    def cut_next(self, data: bytes, times: int = 1) -> None:
        """Drop the connection half-way through the next ``times`` GETs of this LFS content."""
        (self._cdn or self)._blobs[sha256(data)].cuts_left = times

    def corrupt(self, data: bytes, served: bytes) -> None:
        """Serve ``served`` wherever ``data`` is asked for, while still advertising ``data``'s sha256."""
        (self._cdn or self)._blobs[sha256(data)].data = served

    def redirect(self, data: bytes, location: str) -> None:
        """Point the LFS redirect for ``data`` at ``location`` (still advertising ``data``'s sha256 and size)."""
        self._locations[sha256(data)] = location

    def announce_size(self, path: str, size: int) -> None:
        """Announce ``size`` bytes (X-Linked-Size) for the LFS file at ``path``, whatever its real size."""
        self._sizes[path] = size

    def fail_next(self, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests, whatever they are, with ``status`` (e.g. 503)."""
        self._failures.extend([status] * times)

    def corrupt_file(self, repo: str, path: str, served: bytes) -> None:
        """Serve ``served`` for a non-LFS file while its ETag still names the published content."""
        self._repos[repo].served[path] = served

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(".onnx")

    def count(self, method: str | None = None, prefix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and r.path.startswith(prefix))

    def ranges(self) -> list[str]:
        with self._lock:
            return [r.range for r in self.requests if r.range]

    # -- server --------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- lookups used by the handler -------------------------------------------------------------------------
    def _lookup(self, repo: str, revision: str, path: str) -> tuple[str, str | None, bytes | None]:
        """(error code or "", commit, data)."""
        entry = self._repos.get(repo)
        if entry is None:
            return "RepoNotFound", None, None
        commit = entry.branches.get(revision, revision)
        files = entry.commits.get(commit)
        if files is None:
            return "RevisionNotFound", None, None
        data = files.get(path)
        if data is None:
            return "EntryNotFound", commit, None
        return "", commit, data


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    # A stalled client must not keep a server thread forever.
    timeout = 10

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.owner._lock:
            self.owner.requests.append(
                Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
            failure = self.owner._failures.pop(0) if self.owner._failures else None
        if failure is not None:
            self._error(failure, "ServerError")
            return
        if path.startswith("/cdn/"):
            self._serve_blob(path[len("/cdn/"):], body=body)
            return
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self._error(404, "RepoNotFound")
            return
        repo, revision, file_path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        code, commit, data = self.owner._lookup(repo, revision, file_path)
        if code:
            self._error(404, code, commit)
            return
        assert commit is not None and data is not None
        if self.owner.is_lfs(file_path):
            digest = sha256(data)
            self.send_response(302)
            default = f"{(self.owner._cdn or self.owner).url}/cdn/{digest}"
            self.send_header("Location", self.owner._locations.get(digest, default))
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(self.owner._sizes.get(file_path, len(data))))
            self.send_header("ETag", f'"{digest}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        served = self.owner._repos[repo].served.get(file_path, data)
        self._send_bytes(served, etag=git_blob_sha1(data), commit=commit, body=body)

    def _serve_blob(self, digest: str, *, body: bool) -> None:
        blob = self.owner._blobs.get(digest)
        if blob is None:
            self._error(404, "EntryNotFound")
            return
        cut = False
        if body and self.owner.hold is not None:
            self.owner.hold.wait(60)
        if body:
            with self.owner._lock:
                if blob.cuts_left > 0:
                    blob.cuts_left -= 1
                    cut = True
        self._send_bytes(blob.data, etag=blob.advertised_sha256, commit=None, body=body, cut=cut)

    def _send_bytes(self, data: bytes, *, etag: str, commit: str | None, body: bool, cut: bool = False) -> None:
        start, end = 0, len(data)
        spec = self.headers.get("Range")
        status = 200
        if spec and spec.startswith("bytes=") and self.owner.honour_range:
            first, _, last = spec[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        if commit:
            self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if cut:
            # Half the body, then a dead connection: the client sees a short read despite Content-Length.
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(chunk)

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        message = f"{code}: {self.path}".encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(message)

