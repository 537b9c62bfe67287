"""Talk to a Hugging Face-compatible hub over its plain file endpoint: metadata, resumable downloads.

``{endpoint}/{repo}/resolve/{revision}/{path}``: a HEAD tells the commit a revision resolves to (``X-Repo-Commit``),
the file's size and checksum (LFS files: a redirect to the CDN carrying the sha256 in ``X-Linked-Etag`` and the
size in ``X-Linked-Size``; other files: ``ETag`` = git blob sha1); a GET follows the redirect and, with ``Range``,
continues a partial file. The usual ``https_proxy``/``no_proxy`` variables apply (urllib's ProxyHandler), and
``$SSL_CERT_FILE`` names extra trusted certificates as for any OpenSSL program.

A mirror, its CDN and anything in between are not trusted further than this:

* Schemes: only ``http`` and ``https`` URLs are ever opened; the opener has no file, ftp or data handler, and every
  URL is checked before it is opened. A redirect to another scheme (``file://``, ...), from https to http, or to
  a URL that does not parse is refused with a one-line ModelError. At most ``Limits.redirects`` (10) redirects are
  followed per request.
* The token: ``$HF_TOKEN`` is sent only to the origin of the endpoint's URL, exact scheme + host + port (default
  ports normalised: ``https://h`` and ``https://h:443`` are one origin); never to another port, host or scheme,
  so never to the CDN and never in clear text.
* Size: a download never writes more than the expected size: the caller's ``size`` (the registry pin or what the
  HEAD reported), else the response's Content-Length; with neither, it is refused as unbounded. A body that goes
  on past that size is cut there and refused; a 200 whose Content-Length, or a 206 whose Content-Range total,
  disagrees with the expected size is refused before anything is written.
* Time: each network wait is bounded by ``Limits.timeout`` (15 s); the status line and headers must all be in
  within ``Limits.headers`` (60 s) of the start of the request (connect, proxy tunnel and TLS handshake included),
  however slowly they trickle; a body must bring at least ``Limits.min_bytes`` (64 KiB) in every
  ``Limits.window`` (30 s). A slow attempt ends there; the bytes that did arrive stay for the next one.
* Anything else malformed on the wire (status line, headers, Content-Range, chunking) is a failed attempt
  (Unreachable once every attempt failed) or a ModelError, never another exception.

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
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch.errors import ModelError
from capwatch.models import transport
from capwatch.models.transport import LIMITS, Limits

#: Largest read at a time; progress is reported after every BLOCK bytes that arrive.
BLOCK = 1 << 20

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# At most 18 ASCII digits (below 2**63): int() alone would also take "²", "1_000", " 12" and die on 5000 digits.
_SIZE_RE = re.compile(r"[0-9]{1,18}")
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)")
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    """A failure worth retrying (network trouble, a short or slow body, a 5xx); the next attempt resumes."""


class _Refused(Exception):
    """An answer capwatch will not use (a forbidden redirect, a size it did not expect); not retried."""


def file_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    """The hub URL of ``path`` in ``repo`` at ``revision``."""
    return f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


def head_file(
    endpoint: str, repo: str, revision: str, path: str, env: Mapping[str, str], *, optional: bool = False,
    limits: Limits = LIMITS,
) -> RemoteFile | None:
    """Ask the hub for one file's commit, size and checksum.

    Returns the RemoteFile (a size or checksum the hub did not report, or reported garbled, is None), or None when
    the file does not exist and ``optional`` is True. Raises ModelError (one line) for a missing repository,
    revision or required file, for a refusal, and for a redirect capwatch does not follow (another scheme, https to
    http, a malformed URL); Unreachable when no usable answer came after ``limits.attempts`` quick attempts.
    """
    url = file_url(endpoint, repo, revision, path)
    problem = ""
    for attempt in range(limits.attempts):
        if attempt:
            time.sleep(0.2 * attempt)
        try:
            with _open(url, "HEAD", env, limits) as response:
                status, headers = response.status, _lower(response.headers)
        except _Transient as exc:
            problem = str(exc)
            continue
        except _Refused as exc:
            raise _refusal(exc, repo, revision, path, endpoint) from None
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
        # The LFS size is only on the redirect; there the Content-Length is the redirect's own (0).
        size = headers.get("x-linked-size") if "x-linked-size" in headers else headers.get("content-length")
        return RemoteFile(
            commit=headers.get("x-repo-commit"),
            size=_parse_size(size),
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
    *,
    limits: Limits = LIMITS,
) -> None:
    """Make ``part`` hold the whole file, continuing whatever an earlier attempt or run left in it.

    ``size`` is the expected size (the registry's pin or the hub's X-Linked-Size/Content-Length): a complete part
    skips the network, an over-long one starts again, and no more than ``size`` bytes are ever written. Without it
    the response's Content-Length is the cap, and a response without one is refused. ``report(done)`` is called
    after every BLOCK (1 MiB) that arrives and at the end. The content is not verified here.

    Returns None once ``part`` has the expected size. Raises ModelError (one line) for a final refusal (404, 401,
    ...), a forbidden redirect, an answer that announces another size or sends more than announced (the part then
    holds the expected size at most), or no known size; Unreachable when every attempt failed (network trouble,
    too slow, cut short: the bytes that did arrive stay in ``part`` for the next pull to continue).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    url = file_url(endpoint, repo, revision, path)
    problem = ""
    for attempt in range(limits.attempts):
        if attempt:
            time.sleep(0.2 * attempt)
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:  # not a prefix of this file: start over
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            return
        try:
            _fetch(url, part, offset, size, env, report, limits)
            return
        except _Transient as exc:
            problem = str(exc)
        except _Refused as exc:
            raise _refusal(exc, repo, revision, path, endpoint) from None
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


def _where(repo: str, revision: str) -> str:
    return f"{repo}@{revision[:12] if _COMMIT_RE.match(revision) else revision}"


def _refusal(exc: _Refused, repo: str, revision: str, path: str, endpoint: str) -> ModelError:
    return ModelError(f"{_where(repo, revision)}: {path} from {endpoint}: {exc}")


def _status_failure(
    status: int, headers: Mapping[str, str], repo: str, revision: str, path: str, endpoint: str
) -> ModelError | str | None:
    """None for a usable answer, a reason string for one worth retrying, a ModelError for a final one."""
    if status < 400:
        return None
    if status >= 500 or status == 429:
        return f"HTTP {status}"
    where = _where(repo, revision)
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


# --------------------------------------------------------------------------------------------------------------
# One request: redirects, the token's origin, schemes


@contextlib.contextmanager
def _open(
    url: str, method: str, env: Mapping[str, str], limits: Limits, *, offset: int = 0, follow: bool = False
) -> Iterator[http.client.HTTPResponse]:
    """Send one request and yield the response; with ``follow`` also follow redirects to other hosts.

    Relative redirects (a renamed repository) are always followed, as the hub client does. The token goes only to
    the origin (scheme, host, port) of ``url``. Raises urllib.error.HTTPError for an error status (or a redirect
    not followed), _Refused for a URL or redirect that must not be opened (not http/https, https to http,
    malformed) and _Transient for network trouble, a headers deadline or too many redirects.
    """
    origin = _origin(url)
    if origin is None:
        raise _Refused(f"{_show(url)} is not an http or https URL; refused")
    token = env.get("HF_TOKEN")
    opener = transport.opener(limits)
    for _hop in range(limits.redirects + 1):
        headers = {"User-Agent": "capwatch", "Accept-Encoding": "identity"}
        if token and _origin(url) == origin:
            headers["Authorization"] = f"Bearer {token}"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            request = urllib.request.Request(url, method=method, headers=headers)
            response = opener.open(request, timeout=limits.timeout)
        except urllib.error.HTTPError as exc:
            location = (exc.headers.get("Location") or "") if 300 <= exc.code < 400 and exc.headers else ""
            if not location:
                raise
            try:
                # Checked even when not followed: the GET after this HEAD would follow it.
                target, relative = _redirect_target(url, location)
            except _Refused:
                exc.close()
                raise
            if follow or relative:
                exc.close()
                url = target
                continue
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, refused, reset, timeout
            raise _Transient(first_line(getattr(exc, "reason", None) or exc)) from None
        with response:
            yield response
        return
    raise _Transient(f"more than {limits.redirects} redirects (the last to {_show(url)})")


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http or https URL, the port filled in when implicit; None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a malformed IPv6 address or port
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, _DEFAULT_PORTS[parts.scheme] if port is None else port


def _redirect_target(current: str, location: str) -> tuple[str, bool]:
    """The absolute URL a redirect from ``current`` to ``location`` leads to, and whether ``location`` is relative.

    Raises _Refused for a target that is not http/https, an https to http downgrade, and a malformed URL.
    """
    try:
        # As urllib's own redirect handler does: spaces, control and non-ASCII characters become %XX, so nothing
        # the server sent can split a request line or an error message.
        quoted = urllib.parse.quote(location.strip(), encoding="iso-8859-1", safe=string.punctuation)
        relative = not urllib.parse.urlsplit(quoted).netloc
        target = urllib.parse.urljoin(current, quoted)
        parts = urllib.parse.urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise _Refused(f"the mirror redirected to a malformed URL {_show(location)}; refused") from None
    scheme = parts.scheme
    if scheme not in _DEFAULT_PORTS:
        slashes = "//" if target[len(scheme) + 1:].startswith("//") else ""
        raise _Refused(f"the mirror redirected to a {scheme}:{slashes} URL ({_show(target)}); refused")
    if urllib.parse.urlsplit(current).scheme == "https" and scheme == "http":
        raise _Refused(f"the mirror redirected from https to {_show(target)}; refused")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise _Refused(f"the mirror redirected to a malformed URL {_show(target)}; refused")
    return target, relative


# --------------------------------------------------------------------------------------------------------------
# Bodies: never more than expected


def _fetch(
    url: str, part: Path, offset: int, size: int | None, env: Mapping[str, str],
    report: Callable[[int], None] | None, limits: Limits,
) -> None:
    """GET ``url`` from byte ``offset`` into ``part`` (appended after a 206, replaced after a 200).

    Returns None when the body filled ``part`` to the expected end. Raises _Refused for an answer that announces
    another size, has no size at all, or sends more than announced (``part`` is then cut at the announced end);
    _Transient when the body came up short, too slowly or broken (what arrived is kept); and what _open raises.
    """
    with _open(url, "GET", env, limits, offset=offset, follow=True) as response:
        start, end = _body_span(response, offset, size)  # checked before anything is written
        watchdog = response.watchdog if isinstance(response, transport.GuardedResponse) else None
        done, reported, failure, more = start, start, None, False
        with open(part, "ab" if start else "wb") as out:
            try:
                while done < end:
                    # read1 returns what one recv brought (read(n) would wait for all n bytes), so the progress
                    # and the watchdog's rate follow the network.
                    block = response.read1(min(BLOCK, end - done))
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if watchdog is not None:
                        watchdog.advance(len(block))
                    if report is not None and (done - reported >= BLOCK or done == end):
                        report(done)
                        reported = done
                if done == end:
                    more = _more_follows(response)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failure = exc
            out.flush()
            os.fsync(out.fileno())
        reason = watchdog.stop() if watchdog is not None else None
    if more:
        span = f"{end - start} bytes it announced" + (f" from byte {start}" if start else "")
        raise _Refused(f"the mirror sent more than the {span}; refused")
    if done < end:
        # http.client returns a short body quietly when the connection drops; what arrived is kept.
        if reason is not None:
            raise _Transient(reason)
        if failure is not None:
            raise _Transient(first_line(failure))
        raise _Transient(f"connection closed after {done} of {end} bytes")


def _body_span(response: http.client.HTTPResponse, offset: int, size: int | None) -> tuple[int, int]:
    """The bytes [start, end) of the file this response's body must bring, checked against ``size``.

    Raises _Refused when the response announces another size than expected, or when no size is known at all;
    _Transient for a 206 whose Content-Range is missing, malformed or starts elsewhere than ``offset``.
    """
    raw_length = response.headers.get("Content-Length")
    length = _parse_size(raw_length)
    if raw_length is not None and length is None:
        raise _Refused(f"the mirror sent an invalid Content-Length {_show(raw_length)}; refused")
    if response.status == 206:
        content_range = response.headers.get("Content-Range") or ""
        match = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
        if match is None or int(match[1]) != offset or int(match[2]) < offset:
            raise _Transient(f"unexpected Content-Range {_show(content_range)} for a request from byte {offset}")
        last = int(match[2])
        announced = None if match[3] == "*" else int(match[3])
        total = size if size is not None else announced
        if total is None:
            raise _Refused("no size known (Content-Range without a total); refusing an unbounded download")
        if announced is not None and announced != total:
            raise _Refused(f"the mirror announced {announced} bytes in all (Content-Range) where {total} were "
                           f"expected; refused")
        if last >= total:
            raise _Refused(f"the mirror announced bytes up to {last} of a {total}-byte file; refused")
        if length is not None and length != last + 1 - offset:
            raise _Refused(f"the mirror's Content-Length {length} disagrees with its Content-Range "
                           f"{_show(content_range)}; refused")
        return offset, last + 1
    # A 200 (or another 2xx): the whole file, whatever Range asked for.
    total = size if size is not None else length
    if total is None:
        raise _Refused("no size known (no Content-Length either); refusing an unbounded download")
    if length is not None and length != total:
        raise _Refused(f"the mirror announced {length} bytes (Content-Length) where {total} were expected; refused")
    return 0, total


def _more_follows(response: http.client.HTTPResponse) -> bool:
    """True when the body goes on after the expected end (possible without a Content-Length, or when chunked)."""
    try:
        return bool(response.read1(1))
    except (OSError, http.client.HTTPException, ValueError):
        # Trouble after the last expected byte (a reset, the watchdog ending endless trailers) is not more data.
        return False


def _parse_size(value: str | None) -> int | None:
    """A byte count from a header: plain ASCII digits only, else None."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if _SIZE_RE.fullmatch(value) else None


def _show(text: str) -> str:
    """Text a server sent, made safe for a one-line message: quoted, escaped, at most 100 characters."""
    return repr(text[:100] + ("..." if len(text) > 100 else ""))


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()} if headers is not None else {}


def first_line(exc: object) -> str:
    """The first line of an error's text, whitespace collapsed, at most 200 characters."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:200]
