"""Talk to a Hugging Face-compatible hub over its plain file endpoint: metadata, resumable downloads.

``{endpoint}/{repo}/resolve/{revision}/{path}``: a HEAD tells the commit a revision resolves to (``X-Repo-Commit``),
the file's size and checksum (LFS files: a redirect to the CDN carrying the sha256 in ``X-Linked-Etag`` and the
size in ``X-Linked-Size``; other files: ``ETag`` = git blob sha1); a GET follows the redirect and, with ``Range``,
continues a partial file. ``$HF_TOKEN`` is sent to the endpoint's own host only, never to the CDN; the usual
``https_proxy``/``no_proxy`` variables apply (urllib's default proxy handling).

Why not ``huggingface_hub.hf_hub_download``: across the versions capwatch allows (0.23 - 1.x) it does not keep a
partial download from one run to the next (current releases delete it on failure, huggingface_hub PR #4228), it
retries a dead network with backoff for ~25 s per request before failing, it never checks sha256, it cannot
report progress per chunk portably, and on Xet-backed repositories it writes a chunk cache outside capwatch's cache.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch.errors import ModelError

#: Seconds to wait for any answer (connect, headers, or the next block of a body) before counting it a failure.
TIMEOUT = 15.0
#: Attempts per request; a failed download attempt leaves its bytes for the next one to continue.
ATTEMPTS = 3
#: Bytes read (and reported to the progress callback) at a time.
BLOCK = 1 << 20

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file: the commit the revision resolved to, size and checksum (if reported)."""

    commit: str | None
    size: int | None
    sha256: str | None
    git_sha1: str | None


class Unreachable(Exception):
    """The hub could not be reached (or kept failing) after every attempt; ``str()`` says why, in a few words."""


class _Transient(Exception):
    """A failure worth retrying (network trouble, a short body, a 5xx); the next attempt resumes."""


def file_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    """The hub URL of ``path`` in ``repo`` at ``revision``."""
    return f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


def head_file(
    endpoint: str, repo: str, revision: str, path: str, env: Mapping[str, str], *, optional: bool = False
) -> RemoteFile | None:
    """Ask the hub for one file's commit, size and checksum.

    Returns None when the file does not exist and ``optional`` is True. Raises ModelError (one line) for a missing
    repository, revision or required file and for a refusal; Unreachable when no usable answer came after
    ``ATTEMPTS`` quick attempts.
    """
    url = file_url(endpoint, repo, revision, path)
    problem = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(0.2 * attempt)
        try:
            with _open(url, "HEAD", env) as response:
                status, headers = response.status, _lower(response.headers)
        except _Transient as exc:
            problem = str(exc)
            continue
        except urllib.error.HTTPError as exc:
            status, headers = exc.code, _lower(exc.headers)
            exc.close()
        if status == 404 and optional and headers.get("x-error-code", "EntryNotFound") == "EntryNotFound":
            return None
        failure = _status_failure(status, headers, repo, revision, path, endpoint)
        if isinstance(failure, ModelError):
            raise failure
        if failure:
            problem = failure
            continue
        etag = (headers.get("x-linked-etag") or headers.get("etag") or "").strip()
        etag = etag.removeprefix("W/").strip('"').lower()
        size = headers.get("x-linked-size") or headers.get("content-length")
        return RemoteFile(
            commit=headers.get("x-repo-commit"),
            size=int(size) if size and size.isdigit() else None,
            sha256=etag if _SHA256_RE.match(etag) else None,
            git_sha1=etag if _SHA1_RE.match(etag) else None,
        )
    raise Unreachable(problem or "no answer")


def download_file(
    endpoint: str,
    repo: str,
    revision: str,
    path: str,
    part: Path,
    size: int | None,
    env: Mapping[str, str],
    report: Callable[[int], None] | None = None,
) -> None:
    """Make ``part`` hold the whole file, continuing whatever an earlier attempt or run left in it.

    ``size`` (when known) lets a complete part skip the network and an over-long one start again. ``report(done)``
    is called after every block. The content is not verified here. Raises ModelError for a final refusal (404,
    401, ...), Unreachable when every attempt failed (the bytes that did arrive stay in ``part``).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    url = file_url(endpoint, repo, revision, path)
    problem = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(0.2 * attempt)
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:  # not a prefix of this file: start over
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            return
        try:
            _fetch(url, part, offset, size, env, report)
            return
        except _Transient as exc:
            problem = str(exc)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:  # the server does not recognise our part as a prefix
                part.unlink(missing_ok=True)
                problem = "HTTP 416"
                continue
            failure = _status_failure(exc.code, _lower(exc.headers), repo, revision, path, endpoint)
            if isinstance(failure, ModelError):
                raise failure from None
            problem = failure or f"HTTP {exc.code}"
    raise Unreachable(problem or "no answer")


def _status_failure(
    status: int, headers: Mapping[str, str], repo: str, revision: str, path: str, endpoint: str
) -> ModelError | str | None:
    """None for a usable answer, a reason string for one worth retrying, a ModelError for a final one."""
    if status < 400:
        return None
    if status >= 500 or status == 429:
        return f"HTTP {status}"
    where = f"{repo}@{revision[:12] if _COMMIT_RE.match(revision) else revision}"
    code = headers.get("x-error-code", "")
    if code == "RepoNotFound":
        return ModelError(f"{repo}: repository not found on {endpoint} (HTTP {status})")
    if code == "RevisionNotFound":
        return ModelError(f"{repo}: revision {revision} not found on {endpoint} (HTTP {status})")
    if status == 404:
        return ModelError(f"{where}: file {path} not found on {endpoint} (HTTP 404)")
    if status in (401, 403):
        return ModelError(f"{where}: access to {path} refused by {endpoint} (HTTP {status}; is HF_TOKEN needed?)")
    return ModelError(f"{where}: {endpoint} answered HTTP {status} for {path}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # _open follows redirects itself: the X-Linked-* headers of an LFS file are only on the redirect, and the token
    # must not travel to the CDN.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def _open(
    url: str, method: str, env: Mapping[str, str], *, offset: int = 0, follow: bool = False
) -> Iterator[http.client.HTTPResponse]:
    """Send one request and yield the response; with ``follow`` also follow redirects to other hosts.

    Relative redirects (a renamed repository) are always followed, as the hub client does. Raises
    urllib.error.HTTPError for an error status (or a redirect not followed) and _Transient for network trouble.
    """
    opener = urllib.request.build_opener(_NoRedirect())
    origin = urllib.parse.urlsplit(url).netloc
    for _hop in range(10):
        headers = {"User-Agent": "capwatch", "Accept-Encoding": "identity"}
        token = env.get("HF_TOKEN")
        if token and urllib.parse.urlsplit(url).netloc == origin:
            headers["Authorization"] = f"Bearer {token}"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            response = opener.open(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location", "") if 300 <= exc.code < 400 else ""
            if location and (follow or not urllib.parse.urlsplit(location).netloc):
                exc.close()
                url = urllib.parse.urljoin(url, location)
                continue
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, refused, reset, timeout
            raise _Transient(first_line(getattr(exc, "reason", None) or exc)) from None
        with response:
            yield response
        return
    raise _Transient(f"too many redirects for {url}")


def _fetch(
    url: str, part: Path, offset: int, size: int | None, env: Mapping[str, str],
    report: Callable[[int], None] | None,
) -> None:
    """GET ``url`` from byte ``offset`` and append to ``part``; raises _Transient when the body comes up short."""
    with _open(url, "GET", env, offset=offset, follow=True) as response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if match is None or int(match.group(1)) != offset:
                raise _Transient(f"unexpected Content-Range {content_range!r} for a request from byte {offset}")
            mode, done = "ab", offset
        else:  # 200: the server ignored the Range header, so the body is the whole file
            mode, done = "wb", 0
        length = response.headers.get("Content-Length")
        expected_end = done + int(length) if length and length.isdigit() else size
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(BLOCK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(first_line(exc)) from None
                if not block:
                    break
                out.write(block)
                done += len(block)
                if report is not None:
                    report(done)
            out.flush()
            os.fsync(out.fileno())
        if expected_end is not None and done < expected_end:
            # http.client returns a short body quietly when the connection drops; what arrived is kept.
            raise _Transient(f"connection closed after {done} of {expected_end} bytes")


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def first_line(exc: object) -> str:
    """The first line of an error's text, whitespace collapsed, at most 200 characters."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:200]
