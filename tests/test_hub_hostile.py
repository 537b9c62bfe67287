"""capwatch.models.hub against mirrors that misbehave on purpose: redirect schemes, where the token goes, size caps,
deadlines, garbage on the wire. Every server is a real one on 127.0.0.1 (tests/hostile_server.py, and
tests/hub_server.py for a whole pull); "hosts" are ports, https is a self-signed certificate made with openssl and
trusted through $SSL_CERT_FILE. Deadlines and rates are passed small through ``hub.Limits``, so no test waits long.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hostile_server import Exchange, Scripted, make_certificate, server_context, tarpit
from hub_server import FakeHub

from capwatch.errors import CapwatchError, ModelError
from capwatch.models import hub
from capwatch.models.hub import Unreachable, download_file, head_file
from capwatch.models.registry import FileSpec, ModelSpec, PrecisionSpec
from capwatch.models.store import pull

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loopback_only")]

REPO = "capwatch-test/hostile"
COMMIT = hashlib.sha1(b"hostile").hexdigest()
PATH = "onnx/model.onnx"
TOKEN = "hf_secret"
#: Small limits for tests that need them: one attempt, deadlines well under a second or two.
FAST: dict[str, Any] = {"timeout": 3.0, "headers": 1.0, "min_bytes": 1, "window": 5.0, "attempts": 1}


def _limits(**overrides: Any) -> hub.Limits:
    return hub.Limits(**{**FAST, **overrides})


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxies only where a test sets them."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The server side of the self-signed certificate; the client (capwatch) trusts it through $SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    return server_context(*certificate)


def _one_line(exc: BaseException) -> str:
    assert isinstance(exc, CapwatchError | Unreachable), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def _raised(call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised (None when it returned), so a test can check side effects before the outcome."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


def _never_more_than(limit: int) -> Callable[[int], None]:
    """A progress callback that stops a download the moment it has written more than ``limit`` bytes."""
    def report(done: int) -> None:
        if done > limit:
            raise AssertionError(f"{done} bytes written for a file of {limit}")
    return report


# --------------------------------------------------------------------------------------------------------------
# 1. Only http and https are followed, never https -> http


def test_head_redirect_to_a_file_url_is_a_one_line_refusal() -> None:
    with Scripted(lambda ex: ex.reply(302, {"Location": "file:///etc/hostname", "X-Repo-Commit": COMMIT})) as server:
        exc = _raised(lambda: head_file(server.url, REPO, "main", PATH, {}))
    assert isinstance(exc, ModelError), repr(exc)
    text = _one_line(exc)
    assert "file://" in text and "refused" in text and PATH in text


@pytest.mark.parametrize("form", ["file://localhost{}", "file://{}"])
def test_download_never_opens_a_file_url(tmp_path: Path, form: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"a file of the machine running capwatch\n" * 10)
    location = form.format(secret)
    part = tmp_path / "staging" / "model.onnx.part"
    with Scripted(lambda ex: ex.reply(302, {"Location": location})) as server:
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, secret.stat().st_size, {}))
    assert not part.exists() or part.read_bytes() == b""
    assert isinstance(exc, ModelError), repr(exc)
    assert "file://" in _one_line(exc)


def test_redirect_to_dev_zero_writes_nothing(tmp_path: Path) -> None:
    part = tmp_path / "model.onnx.part"
    with Scripted(lambda ex: ex.reply(302, {"Location": "file:///dev/zero"})) as server:
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, 1000, {}, _never_more_than(1000)))
    assert not part.exists() or part.stat().st_size == 0
    assert isinstance(exc, ModelError), repr(exc)
    assert "file://" in _one_line(exc)


def test_pull_refuses_an_lfs_redirect_to_a_local_file_even_with_its_sha256(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"local secret " * 100)
    spec = ModelSpec(
        name="tiny", repo=REPO, revision=COMMIT, family="vision-encoder-decoder", description="", licence="MIT",
        shared_files=(FileSpec("config.json"),), precisions=(PrecisionSpec("fp32", (FileSpec(PATH),), 1),),
        default_precision="fp32",
    )
    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache")}
    with FakeHub() as fake:
        # The mirror advertises the local file's sha256 and size, so verification alone would accept it.
        fake.add_commit(REPO, COMMIT, {"config.json": b"{}", PATH: secret.read_bytes()})
        fake.redirect(secret.read_bytes(), f"file://localhost{secret}")
        exc = _raised(lambda: pull("tiny", "fp32", env, endpoint=fake.url, registry=[spec]))
    copies = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.read_bytes() == secret.read_bytes()]
    assert copies == []
    assert isinstance(exc, ModelError), repr(exc)
    assert "file://" in _one_line(exc)


def test_https_to_http_redirect_is_refused_and_the_token_never_travels_in_clear(
    tls: ssl.SSLContext, tmp_path: Path
) -> None:
    def answer(ex: Exchange) -> None:
        if ex.scheme == "https":  # the same host and port, only the scheme changes
            ex.reply(302, {"Location": f"http://127.0.0.1:{ex.server.port}/cdn/blob"})
        else:
            ex.reply(200, {}, b"x" * 100)

    part = tmp_path / "model.onnx.part"
    with Scripted(answer, tls=tls) as server:
        exc = _raised(lambda: download_file(server.https_url, REPO, COMMIT, PATH, part, 100, {"HF_TOKEN": TOKEN}))
        seen = server.seen
    assert [s for s in seen if s.scheme == "http" and s.authorization] == []  # no token in clear text
    assert [s for s in seen if s.scheme == "http"] == []  # not even a request
    assert seen and all(s.authorization == f"Bearer {TOKEN}" for s in seen)  # the https origin did get it
    assert isinstance(exc, ModelError), repr(exc)
    text = _one_line(exc)
    assert "https" in text and "http://" in text and "refused" in text


# --------------------------------------------------------------------------------------------------------------
# 2. The token goes to the endpoint's exact origin only


def test_token_goes_to_the_endpoint_port_and_never_to_another_port_or_host(tmp_path: Path) -> None:
    data = b"d" * 64
    with Scripted(lambda ex: ex.reply(200, {}, data)) as cdn:
        def answer(ex: Exchange) -> None:
            name = ex.path.rsplit("/", 1)[-1]
            if name == "same.bin":  # absolute, same origin
                ex.reply(302, {"Location": f"http://127.0.0.1:{ex.server.port}/cdn/same"})
            elif name == "port.bin":  # same host, another port
                ex.reply(302, {"Location": f"{cdn.url}/cdn/port"})
            elif name == "host.bin":  # same port, another host name
                ex.reply(302, {"Location": f"http://localhost:{ex.server.port}/cdn/host"})
            else:
                ex.reply(200, {}, data)

        with Scripted(answer) as endpoint:
            for name in ("same.bin", "port.bin", "host.bin"):
                download_file(endpoint.url, REPO, COMMIT, name, tmp_path / name, len(data), {"HF_TOKEN": TOKEN})
            at_endpoint = {urlsplit(s.target).path: s.authorization for s in endpoint.seen}
        at_cdn = {s.target: s.authorization for s in cdn.seen}
    bearer = f"Bearer {TOKEN}"
    assert at_endpoint == {
        f"/{REPO}/resolve/{COMMIT}/same.bin": bearer, "/cdn/same": bearer,
        f"/{REPO}/resolve/{COMMIT}/port.bin": bearer,
        f"/{REPO}/resolve/{COMMIT}/host.bin": bearer, "/cdn/host": None,
    }
    assert at_cdn == {"/cdn/port": None}


def test_token_origin_treats_the_default_port_as_the_same_origin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Through an http proxy (this server) the endpoint can be http://hub.test with its implicit port 80.
    data = b"p" * 32
    redirects = {"a.bin": "http://hub.test:80/cdn/a", "b.bin": "http://hub.test:8080/cdn/b",
                 "c.bin": "http://cdn.hub.test/cdn/c"}

    def answer(ex: Exchange) -> None:
        name = urlsplit(ex.path).path.rsplit("/", 1)[-1]
        if name in redirects:
            ex.reply(302, {"Location": redirects[name]})
        else:
            ex.reply(200, {}, data)

    with Scripted(answer) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        for name in redirects:
            download_file("http://hub.test", REPO, "main", name, tmp_path / name, len(data), {"HF_TOKEN": TOKEN})
        seen = {s.target: s.authorization for s in proxy.seen}
    bearer = f"Bearer {TOKEN}"
    resolve = f"http://hub.test/{REPO}/resolve/main"
    assert seen == {
        f"{resolve}/a.bin": bearer, "http://hub.test:80/cdn/a": bearer,  # http://h and http://h:80: one origin
        f"{resolve}/b.bin": bearer, "http://hub.test:8080/cdn/b": None,
        f"{resolve}/c.bin": bearer, "http://cdn.hub.test/cdn/c": None,
    }


def test_https_through_a_connect_proxy_still_works(
    tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 20
    part = tmp_path / "model.onnx.part"
    with Scripted(lambda ex: ex.reply(200, {}, data), tls=tls) as origin, \
            Scripted(lambda ex: ex.tunnel()) as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)
        download_file(origin.https_url, REPO, COMMIT, PATH, part, len(data), {"HF_TOKEN": TOKEN})
        through, arrived = proxy.seen, origin.seen
    assert part.read_bytes() == data
    assert [(s.method, s.target, s.authorization) for s in through] == [("CONNECT", f"127.0.0.1:{origin.port}", None)]
    assert [(s.scheme, s.authorization) for s in arrived] == [("https", f"Bearer {TOKEN}")]


def test_no_proxy_still_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = b"n" * 50
    with tarpit() as dead_proxy, Scripted(lambda ex: ex.reply(200, {}, data)) as server:
        monkeypatch.setenv("http_proxy", f"http://{dead_proxy}")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        download_file(server.url, REPO, COMMIT, PATH, tmp_path / "p", len(data), {}, limits=_limits())
    assert (tmp_path / "p").read_bytes() == data


# --------------------------------------------------------------------------------------------------------------
# 3. Never more than the expected size


def _chunked(ex: Exchange, body: bytes) -> None:
    ex.raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
def test_body_longer_than_the_expected_size_is_cut_and_refused(tmp_path: Path, framing: str) -> None:
    body = b"A" * 10_000

    def answer(ex: Exchange) -> None:
        if framing == "chunked":
            _chunked(ex, body)
        else:
            ex.reply(200, {}, body, length=False)

    part = tmp_path / "model.onnx.part"
    with Scripted(answer) as server:
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, 1000, {}))
    assert part.read_bytes() == b"A" * 1000
    assert isinstance(exc, ModelError), repr(exc)
    assert "more than the 1000 bytes" in _one_line(exc)


def test_content_length_that_disagrees_with_the_expected_size_is_refused_before_writing(tmp_path: Path) -> None:
    part = tmp_path / "model.onnx.part"
    part.write_bytes(b"P" * 500)  # an earlier attempt's bytes; the server ignores Range and answers 200
    with Scripted(lambda ex: ex.reply(200, {}, b"B" * 2000)) as server:
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, 1000, {}))
    assert part.read_bytes() == b"P" * 500
    assert isinstance(exc, ModelError), repr(exc)
    text = _one_line(exc)
    assert "2000" in text and "1000" in text


def test_unknown_size_without_content_length_is_refused(tmp_path: Path) -> None:
    part = tmp_path / "model.onnx.part"
    with Scripted(lambda ex: ex.reply(200, {}, b"C" * 5000, length=False)) as server:
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, None, {}))
    assert not part.exists() or part.stat().st_size == 0
    assert isinstance(exc, ModelError), repr(exc)
    assert "no size known" in _one_line(exc) and "unbounded" in str(exc)


def test_unknown_size_is_capped_by_the_content_length(tmp_path: Path) -> None:
    part = tmp_path / "model.onnx.part"
    with Scripted(lambda ex: ex.reply(200, {}, b"D" * 5000)) as server:
        download_file(server.url, REPO, COMMIT, PATH, part, None, {})
    assert part.read_bytes() == b"D" * 5000


def test_range_answer_whose_total_disagrees_is_refused(tmp_path: Path) -> None:
    part = tmp_path / "model.onnx.part"
    part.write_bytes(b"E" * 100)

    def answer(ex: Exchange) -> None:
        ex.reply(206, {"Content-Range": "bytes 100-4999/5000"}, b"F" * 4900)

    with Scripted(answer) as server:
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, 1000, {}))
        assert [s.range for s in server.seen] == ["bytes=100-"]
    assert part.read_bytes() == b"E" * 100
    assert isinstance(exc, ModelError), repr(exc)
    text = _one_line(exc)
    assert "5000" in text and "1000" in text


# --------------------------------------------------------------------------------------------------------------
# 4. Deadlines: headers in time, bodies at a minimum rate


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_headers_trickling_in_past_the_deadline_fail_in_time(tmp_path: Path, method: str) -> None:
    def answer(ex: Exchange) -> None:
        ex.raw(b"HTTP/1.1 200 OK\r\n")
        ex.trickle(b"X-Padding: " + b"a" * 5000 + b"\r\n\r\n", every=0.02)  # a byte every 20 ms: never idle

    limits = _limits(headers=0.5, timeout=3.0)
    with Scripted(answer) as server:
        start = time.monotonic()
        if method == "HEAD":
            exc = _raised(lambda: head_file(server.url, REPO, "main", PATH, {}, limits=limits))
        else:
            exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, tmp_path / "p", 10, {}, limits=limits))
        elapsed = time.monotonic() - start
    assert isinstance(exc, Unreachable), repr(exc)
    assert "headers" in _one_line(exc) and "0.5 s" in str(exc)
    assert elapsed < 2.5


def test_headers_deadline_covers_a_tls_handshake_that_never_ends() -> None:
    with tarpit() as hostport:
        start = time.monotonic()
        exc = _raised(lambda: head_file(f"https://{hostport}", REPO, "main", PATH, {},
                                        limits=_limits(headers=0.5, timeout=10.0)))
        elapsed = time.monotonic() - start
    assert isinstance(exc, Unreachable), repr(exc)
    assert "headers" in _one_line(exc)
    assert elapsed < 2.5  # the deadline, not the 10 s per-read timeout


def test_slow_body_fails_at_the_minimum_rate_and_the_next_pull_resumes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 400
    slow = True

    def answer(ex: Exchange) -> None:
        wanted = ex.headers.get("Range")
        if slow:
            ex.raw(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data))
            ex.trickle(data, every=0.02, step=50)  # 2.5 kB/s
        elif wanted:
            first = int(wanted.removeprefix("bytes=").rstrip("-"))
            ex.reply(206, {"Content-Range": f"bytes {first}-{len(data) - 1}/{len(data)}"}, data[first:])
        else:
            ex.reply(200, {}, data)

    part = tmp_path / "model.onnx.part"
    limits = _limits(min_bytes=20_000, window=0.3, timeout=5.0)
    with Scripted(answer) as server:
        start = time.monotonic()
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, len(data), {}, limits=limits))
        elapsed = time.monotonic() - start
        kept = part.read_bytes()
        slow = False
        download_file(server.url, REPO, COMMIT, PATH, part, len(data), {}, limits=limits)
        ranges = [s.range for s in server.seen]
    assert isinstance(exc, Unreachable), repr(exc)
    assert "20000 bytes per 0.3 s" in _one_line(exc)
    assert elapsed < 2.5
    assert 0 < len(kept) < len(data) and data.startswith(kept)  # what arrived stayed for the next attempt
    assert ranges == [None, f"bytes={len(kept)}-"]
    assert part.read_bytes() == data


def test_body_that_stops_fails_after_one_window_not_after_the_read_timeout(tmp_path: Path) -> None:
    def answer(ex: Exchange) -> None:
        ex.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + b"G" * 100)
        ex.stall()

    part = tmp_path / "model.onnx.part"
    with Scripted(answer) as server:
        start = time.monotonic()
        exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, 1000, {},
                                            limits=_limits(min_bytes=50, window=0.3, timeout=10.0)))
        elapsed = time.monotonic() - start
    assert isinstance(exc, Unreachable), repr(exc)
    assert "per 0.3 s" in _one_line(exc)
    assert elapsed < 2.5
    assert part.read_bytes() == b"G" * 100


def test_endless_trailers_after_a_complete_chunked_body_do_not_hang_the_download(tmp_path: Path) -> None:
    body = b"H" * 1000

    def answer(ex: Exchange) -> None:
        ex.raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + b"%x\r\n" % len(body) + body + b"\r\n0\r\n")
        ex.trickle(b"X-Trailer: y\r\n" * 100_000, every=0.001, step=1400)  # trailer lines, forever

    part = tmp_path / "model.onnx.part"
    with Scripted(answer) as server:
        start = time.monotonic()
        download_file(server.url, REPO, COMMIT, PATH, part, len(body), {}, limits=_limits(min_bytes=1, window=0.3))
        elapsed = time.monotonic() - start
    assert part.read_bytes() == body
    assert elapsed < 2.5


def test_no_watchdog_thread_outlives_its_request(tmp_path: Path) -> None:
    def answer(ex: Exchange) -> None:
        if ex.path.endswith("/slow.bin"):
            ex.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n")
            ex.stall()
        else:
            ex.reply(200, {"X-Repo-Commit": COMMIT}, b"I" * 100)

    limits = _limits(min_bytes=10, window=0.2)
    with Scripted(answer) as server:
        head_file(server.url, REPO, "main", PATH, {}, limits=limits)
        download_file(server.url, REPO, COMMIT, PATH, tmp_path / "ok.part", 100, {}, limits=limits)
        with pytest.raises(Unreachable):
            download_file(server.url, REPO, COMMIT, "slow.bin", tmp_path / "slow.part", 1000, {}, limits=limits)
    until = time.monotonic() + 2
    while any(t.name == "capwatch-hub-watchdog" for t in threading.enumerate()) and time.monotonic() < until:
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name == "capwatch-hub-watchdog"] == []


# --------------------------------------------------------------------------------------------------------------
# 5. Anything else a hostile server sends is a clean failure (or a harmless answer), never a traceback


def _redirect(location: str) -> Callable[[Exchange], None]:
    return lambda ex: ex.reply(302, {"Location": location})


def _status_206(headers: dict[str, str]) -> Callable[[Exchange], None]:
    return lambda ex: ex.reply(206, headers, b"r" * 900)


#: (what the server does, request, answer, outcome: an exception class, or None for "answers normally")
HOSTILE: list[tuple[str, str, Callable[[Exchange], None], type[Exception] | None]] = [
    ("garbage status line", "HEAD", lambda ex: ex.raw(b"GARBAGE\r\n\r\n"), Unreachable),
    ("non-numeric status code", "HEAD", lambda ex: ex.raw(b"HTTP/1.1 abc OK\r\n\r\n"), Unreachable),
    ("status code out of range", "GET", lambda ex: ex.raw(b"HTTP/1.1 1000 Big\r\nContent-Length: 0\r\n\r\n"),
     Unreachable),
    ("connection closed without an answer", "HEAD", lambda ex: None, Unreachable),
    ("superscript digit as Content-Length (HEAD)", "HEAD",
     lambda ex: ex.reply(200, {"Content-Length": "\u00b2", "X-Repo-Commit": COMMIT}, length=False), None),
    ("5000-digit X-Linked-Size", "HEAD",
     lambda ex: ex.reply(200, {"X-Linked-Size": "9" * 5000, "X-Repo-Commit": COMMIT}), None),
    ("non-numeric Content-Length on a download", "GET",
     lambda ex: ex.reply(200, {"Content-Length": "abc"}, b"x" * 1000, length=False), ModelError),
    ("negative Content-Length on a download", "GET",
     lambda ex: ex.reply(200, {"Content-Length": "-5"}, b"x" * 1000, length=False), ModelError),
    ("superscript digit as Content-Length on a download", "GET",
     lambda ex: ex.reply(200, {"Content-Length": "\u00b2"}, b"x" * 1000, length=False), ModelError),
    ("header line over 64 KiB", "HEAD", lambda ex: ex.reply(200, {"X-Big": "a" * 70_000}), Unreachable),
    ("more than 100 headers", "HEAD", lambda ex: ex.reply(200, [(f"X-H{i}", "v") for i in range(150)]), Unreachable),
    ("redirect to a malformed URL (HEAD)", "HEAD", _redirect("http://[::1"), ModelError),
    ("redirect to a malformed URL", "GET", _redirect("http://[::1/x"), ModelError),
    ("redirect to a non-numeric port", "GET", _redirect("http://127.0.0.1:port/x"), ModelError),
    ("redirect to ftp", "GET", _redirect("ftp://127.0.0.1:9/x"), ModelError),
    ("redirect to a data: URL", "GET", _redirect("data:,hello"), ModelError),
    ("redirect loop", "GET", lambda ex: ex.reply(302, {"Location": ex.path}), Unreachable),
    ("206 without Content-Range", "GET", _status_206({}), Unreachable),
    ("206 with a garbage Content-Range", "GET", _status_206({"Content-Range": "bytes abc"}), Unreachable),
    ("206 with a 5000-digit Content-Range", "GET", _status_206({"Content-Range": "bytes " + "1" * 5000 + "-"}),
     Unreachable),
    ("206 from another offset", "GET", _status_206({"Content-Range": "bytes 0-899/1000"}), Unreachable),
    ("206 whose Content-Length disagrees with its Content-Range", "GET",
     _status_206({"Content-Range": "bytes 100-999/1000", "Content-Length": "5"}), ModelError),
    ("chunked body with a bad chunk size", "GET",
     lambda ex: ex.raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n"), Unreachable),
]


@pytest.mark.parametrize(("request_", "answer", "outcome"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_answers_are_clean_failures(
    tmp_path: Path, request_: str, answer: Callable[[Exchange], None], outcome: type[Exception] | None
) -> None:
    part = tmp_path / "model.onnx.part"
    part.write_bytes(b"s" * 100)  # so that a download asks for a Range
    with Scripted(answer) as server:
        if request_ == "HEAD":
            exc = _raised(lambda: head_file(server.url, REPO, "main", PATH, {}))
        else:
            exc = _raised(lambda: download_file(server.url, REPO, COMMIT, PATH, part, 1000, {},
                                                _never_more_than(1000)))
    if outcome is None:
        assert exc is None, repr(exc)
    else:
        assert isinstance(exc, outcome), repr(exc)
        _one_line(exc)
    assert not part.exists() or part.stat().st_size <= 1000

