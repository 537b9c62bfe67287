"""Who gets into `capwatch serve`: the access token on loopback too, another local account shut out, the token
cookie read leniently and named per port, the token's redirect kept on this server, and strangers' slow
connections unable to lock out the person with the token. Real `capwatch serve` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from capwatch.models.captioner import open_captioner
from capwatch.web.app import ServeSettings, create_app
from capwatch.web.security import AccessToken, cookie_values
from tests.conftest import CliRunner
from tests.web_helpers import MODEL, Library, Served, build_library, serving, token_file, write_config

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
NOBODY = 65534


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return build_library(tmp_path)


@pytest.fixture
def server(lib: Library, tmp_path: Path) -> Served:
    with serving(tmp_path, write_config(lib, tmp_path)) as served:
        yield served  # type: ignore[misc]


# -- the token on loopback ----------------------------------------------------------------------------------------


def test_a_loopback_server_requires_the_token_and_the_401_shows_no_path(server: Served, lib: Library,
                                                                         tmp_path: Path) -> None:
    assert server.token and server.token == token_file(tmp_path).read_text().strip()
    for path in ("/", "/?q=bicycle", f"/photo/{lib.ids['red.jpg']}", f"/thumb/{lib.ids['red.jpg']}", "/status",
                 "/static/style.css", "/favicon.ico"):
        refused = server.get(path, token=False)
        assert refused.status == 401, path
        # Nothing but the way in: no path of this machine (token file, state folder, photos, index).
        assert "/" not in refused.text.replace("http://", "").replace("127.0.0.1:PORT/", ""), refused.text
        assert str(tmp_path) not in refused.text and "serve-token" not in refused.text
        assert refused.headers.get("connection") == "close"
    assert server.get("/", headers={"Authorization": "Bearer " + server.token[:-1] + "x"}, token=False).status == 401
    assert server.get(f"/?token={server.token}x", token=False).status == 401
    assert server.get("/?q=bicycle").status == 200
    entry = server.get(f"/?q=red&token={server.token}", token=False)
    assert entry.status == 303 and entry.headers["location"] == "/?q=red"
    cookie = entry.headers["set-cookie"]
    assert cookie.startswith(f"capwatch_token_{server.port}={server.token};")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    # The cookie alone lets the browser in from then on.
    with_cookie = server.get("/?q=red", headers={"Cookie": f"capwatch_token_{server.port}={server.token}"},
                             token=False)
    assert with_cookie.status == 200 and "bicycle" in with_cookie.text


_NOBODY_CLIENT = r"""
import http.client, json, os, sys
port, photo, token_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {"uid": os.getuid()}
try:
    open(token_path).read()
    out["token_file"] = "read"
except OSError as exc:
    out["token_file"] = type(exc).__name__
def ask(method, path, body=None, headers={}):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    return answer.status, answer.read().decode("utf-8", "replace")
out["search"] = ask("GET", "/?q=bicycle")
out["photo"] = ask("GET", "/photo/%d" % photo)
out["thumb"] = ask("GET", "/thumb/%d" % photo)[0]
out["edit"] = ask("POST", "/photo/%d/caption" % photo, b"csrf=x&caption=written+by+nobody",
                  {"Content-Type": "application/x-www-form-urlencoded"})[0]
print(json.dumps(out))
"""


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _python_for_nobody() -> str:
    """A Python interpreter uid 65534 may run (this one may live below root's private home)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([candidate, "-I", "-c", "pass"], preexec_fn=_as_nobody, cwd="/", timeout=30,
                              capture_output=True).returncode == 0:
                return candidate
        except OSError:
            continue
    pytest.skip("no Python interpreter that uid 65534 may run")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another account (uid 65534)")
def test_another_local_account_can_neither_read_nor_write_through_the_page(server: Served, lib: Library,
                                                                            tmp_path: Path) -> None:
    red = lib.path("red.jpg")
    red.chmod(0o644)  # root's photo, readable by everyone: only the page could let nobody write it
    before = red.read_bytes()
    # The token is the owner's alone: 0600 in a 0700 folder (whatever the folders above it allow).
    assert token_file(tmp_path).stat().st_mode & 0o777 == 0o600
    assert token_file(tmp_path).parent.stat().st_mode & 0o777 == 0o700
    done = subprocess.run([_python_for_nobody(), "-I", "-c", _NOBODY_CLIENT, str(server.port),
                           str(lib.ids["red.jpg"]), str(token_file(tmp_path))],
                          capture_output=True, text=True, timeout=60, cwd="/", preexec_fn=_as_nobody)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] == NOBODY
    assert seen["token_file"] == "PermissionError"
    assert seen["search"][0] == 401 and "bicycle" not in seen["search"][1]
    assert seen["photo"][0] == 401 and "red bicycle" not in seen["photo"][1]
    assert seen["thumb"] == 401 and seen["edit"] == 401
    assert red.read_bytes() == before
    # The owner, with the token, still gets in.
    assert server.get(f"/photo/{lib.ids['red.jpg']}").status == 200


def test_auth_none_is_the_explicit_choice_for_loopback_only(lib: Library, tmp_path: Path, run_cli: CliRunner) -> None:
    config = write_config(lib, tmp_path, '[serve]\nauth = "none"\n')
    with serving(tmp_path, config) as served:
        assert served.token is None and 'auth = "none"' in served.first_line
        assert served.get("/?q=bicycle", token=False).status == 200
        assert served.get("/", headers={"Host": "evil.example"}, token=False).status == 421
    assert not token_file(tmp_path).exists()
    refused = run_cli("--config", config, "serve", "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert refused.code == 2 and len(refused.err_lines) == 1 and "loopback" in refused.err
    assert "Traceback" not in refused.err


def test_print_url_gives_the_address_with_the_token_the_server_accepts(lib: Library, tmp_path: Path,
                                                                      run_cli: CliRunner) -> None:
    config = write_config(lib, tmp_path)
    printed = run_cli("--config", config, "serve", "--port", "8765", "--print-url", timeout=30)
    assert printed.code == 0, printed.err
    token = token_file(tmp_path).read_text().strip()
    assert printed.out.strip() == f"http://127.0.0.1:8765/?token={token}"
    with serving(tmp_path, config) as served:
        assert served.token == token
        assert served.get(f"/?token={token}", token=False).status == 303
    bad = run_cli("--config", config, "serve", "--port", "0", "--print-url", timeout=30)
    assert bad.code == 2 and len(bad.err_lines) == 1 and "port" in bad.err


# -- the cookie ---------------------------------------------------------------------------------------------------


def _token_app(lib: Library, tmp_path: Path, token: AccessToken) -> TestClient:
    settings = ServeSettings(config=lib.config, csrf="c" * 43, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(MODEL, lib.config.model),
                             live_state=lambda: None, token=token)
    return TestClient(create_app(settings), base_url="http://127.0.0.1:8765", follow_redirects=False)


@pytest.mark.parametrize("others", [
    'prefs={"theme": "dark", "n": 1}',         # JSON
    "session=a b c",                           # spaces
    'path=C:\\Users\\x',                       # backslashes
    "name=Jürgen",                             # not ASCII
    "flag",                                    # no value at all
    '"quoted"=1; =empty; ;;',                  # odd shapes
])
def test_an_odd_cookie_from_another_app_does_not_lock_the_user_out(lib: Library, tmp_path: Path,
                                                                   others: str) -> None:
    token = AccessToken("t" * 43, tmp_path / "serve-token", created=False)
    with _token_app(lib, tmp_path, token) as client:
        for header in (f"{others}; capwatch_token_8765={token.value}", f"capwatch_token_8765={token.value}; {others}"):
            answer = client.get("/", headers={"Cookie": header.encode("utf-8")})  # as browsers send it
            assert answer.status_code == 200, header


def test_the_token_cookie_is_named_for_the_servers_port(lib: Library, tmp_path: Path) -> None:
    token = AccessToken("t" * 43, tmp_path / "serve-token", created=False)
    with _token_app(lib, tmp_path, token) as client:
        entry = client.get(f"/?token={token.value}")
        assert entry.headers["set-cookie"].startswith("capwatch_token_8765=")
        client.cookies.clear()
        # Another port's cookie (another capwatch serve on this host) is not this server's.
        assert client.get("/", headers={"Cookie": f"capwatch_token_9999={token.value}"}).status_code == 401
        assert client.get("/", headers={"Cookie": f"capwatch_token={token.value}"}).status_code == 401
        assert client.get("/", headers={"Cookie": f'capwatch_token_8765="{token.value}"'}).status_code == 200


def test_cookie_values_are_read_leniently() -> None:
    header = 'a={"x": 1}; b=\\\\; capwatch_token_1=one; c=é é;capwatch_token_1 = two ; capwatch_token_12=no'
    assert cookie_values(header, "capwatch_token_1") == ["one", "two"]
    assert cookie_values("", "x") == [] and cookie_values("x", "x") == []


# -- the token's redirect -----------------------------------------------------------------------------------------


def test_the_token_redirect_stays_on_this_server(server: Served) -> None:
    for path, expected in [("//evil.example/", "/evil.example/"), ("///evil.example/x", "/evil.example/x"),
                           ("/\\evil.example/", "/evil.example/"), ("/\\/evil.example", "/evil.example"),
                           ("/%2F%2Fevil.example", "/%2F%2Fevil.example"), ("/photo/1", "/photo/1")]:
        answer = server.get(f"{path}?token={server.token}&q=a+b", token=False)
        assert answer.status == 303, path
        location = answer.headers["location"]
        assert location == expected + "?q=a+b", (path, location)
        assert location.startswith("/") and location[1:2] not in ("/", "\\")


# -- strangers' slow connections -------------------------------------------------------------------------------


class SlowLoris:
    """``count`` connections from 127.0.0.1 that send a request line and then one header line every
    ``interval`` seconds, never finishing the head; stops by itself after ``limit`` seconds."""

    def __init__(self, port: int, count: int, interval: float, limit: float) -> None:
        self.socks: list[socket.socket] = []
        self.closed: set[int] = set()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            self.socks.append(sock)
        self._stop = threading.Event()
        self._interval = interval
        self._until = time.monotonic() + limit
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.wait(self._interval) and time.monotonic() < self._until:
            self.poll()
            for n, sock in enumerate(self.socks):
                if n not in self.closed:
                    try:
                        sock.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        self.closed.add(n)

    def poll(self) -> int:
        """Mark the sockets the server closed; returns how many are closed."""
        for n, sock in enumerate(self.socks):
            if n in self.closed:
                continue
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                try:
                    if sock.recv(1024, socket.MSG_DONTWAIT) == b"":
                        self.closed.add(n)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.closed.add(n)
        return len(self.closed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def test_slow_strangers_cannot_lock_out_the_person_with_the_token(lib: Library, tmp_path: Path) -> None:
    config = write_config(lib, tmp_path, "[serve]\nheader_timeout_seconds = 3\n")
    with serving(tmp_path, config) as served:
        loris = SlowLoris(served.port, count=80, interval=0.5, limit=30)
        try:
            # 80 unfinished heads are open (more than uvicorn's limit_concurrency of 64 that capwatch used).
            for _ in range(3):
                answer = served.get("/?q=bicycle", timeout=15)
                assert answer.status == 200, answer.text
                assert "<mark>bicycle</mark>" in answer.text
            # The token as a cookie, from a browser that keeps its connection: the same.
            assert served.get("/status", timeout=15).status == 200
            # No stranger keeps a connection past the header deadline (3 s): wait for that, with a bound.
            deadline = time.monotonic() + 20
            while loris.poll() < len(loris.socks) and time.monotonic() < deadline:
                time.sleep(0.25)
            assert loris.poll() == len(loris.socks)
        finally:
            loris.stop()
        assert served.proc.poll() is None


def test_a_server_whose_stderr_is_the_journal_does_not_log_its_token(lib: Library, tmp_path: Path) -> None:
    from tests.conftest import isolated_env

    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**isolated_env(tmp_path), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}  # as systemd sets it
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(write_config(lib, tmp_path)), "serve",
                             "--port", "0"], env=env, cwd=tmp_path, stderr=write_end, stdout=subprocess.DEVNULL)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as stream:
            line = stream.readline()
            assert "capwatch: serving http://127.0.0.1:" in line, line
            assert "?token=" not in line and "--print-url" in line
            assert token_file(tmp_path).read_text().strip() not in line
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_print_url_for_the_system_service_reads_its_token(lib: Library, tmp_path: Path, run_cli: CliRunner) -> None:
    system = tmp_path / "sysroot"
    state = system / "var" / "lib" / "capwatch"
    state.mkdir(parents=True)
    state.chmod(0o750)
    (system / "etc" / "capwatch").mkdir(parents=True)
    config = write_config(lib, tmp_path, "[serve]\nin_daemon = true\nport = 8999\n")
    (system / "etc" / "capwatch" / "config.toml").write_text(config.read_text())
    env = {"CAPWATCH_SYSTEM_ROOT": str(system)}
    printed = run_cli("--system", "serve", "--print-url", env=env, timeout=30)
    assert printed.code == 0, printed.err
    token = (state / "serve-token").read_text().strip()
    assert printed.out.strip() == f"http://127.0.0.1:8999/?token={token}"
    assert ((state / "serve-token").stat().st_mode & 0o777) == 0o600
    assert not token_file(tmp_path).exists()  # the service's token, not the caller's


def test_strangers_waiting_connections_are_capped_per_client_oldest_closed_first(lib: Library,
                                                                                 tmp_path: Path) -> None:
    from capwatch.web.gate import PENDING_PER_CLIENT

    # A deadline far away: what closes connections here is the cap, not the clock.
    config = write_config(lib, tmp_path, "[serve]\nheader_timeout_seconds = 120\n")
    with serving(tmp_path, config) as served:
        count = PENDING_PER_CLIENT + 24
        loris = SlowLoris(served.port, count=count, interval=0.5, limit=30)
        try:
            deadline = time.monotonic() + 20
            while loris.poll() < count - PENDING_PER_CLIENT and time.monotonic() < deadline:
                time.sleep(0.1)
            assert loris.closed == set(range(count - PENDING_PER_CLIENT))  # the oldest went, the newest wait
            assert served.get("/?q=bicycle", timeout=15).status == 200
            # The owner's connection took a place for the milliseconds its head took: the oldest waiting went.
            deadline = time.monotonic() + 20
            while loris.poll() < count - PENDING_PER_CLIENT + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert loris.closed == set(range(count - PENDING_PER_CLIENT + 1))
        finally:
            loris.stop()
