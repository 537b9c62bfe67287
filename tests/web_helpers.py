"""A small photo library for the `capwatch serve` tests: real JPEGs, real metadata, a real index.

Captions are put into the files through the real write path (a model's with capwatch provenance, people's with
exiftool), then the index is built by the real reconcile, as `capwatch scan --no-caption` would.

A real `capwatch serve` process to test against: :func:`serving` / :func:`start_serve` (the same helpers as on
the web-server branch, which adds the access token on loopback: :class:`Served` sends it when there is one).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from capwatch.config import Config, IndexConfig, LibraryConfig, ModelConfig, RootConfig, ServeConfig
from capwatch.library.index import Index
from capwatch.library.scan import reconcile
from capwatch.metadata import Provenance, write_caption
from tests.conftest import FIXTURES, isolated_env

MODEL = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
RED_CAPTION = "a red bicycle leaning on a brick wall"
GRANDMA = "Grandma's 80th birthday"
XSS = "<script>alert(1)</script> party & cake"


@dataclass(frozen=True)
class Library:
    root: Path
    outside: Path
    config: Config
    ids: dict[str, int]

    def path(self, name: str) -> Path:
        return self.root / name


def make_jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (96, 64),
              taken: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken  # DateTimeOriginal
    Image.new("RGB", size, color).save(path, quality=90, exif=exif)
    return path


def set_description(path: Path, text: str) -> None:
    subprocess.run(["exiftool", "-q", "-overwrite_original", f"-XMP-dc:Description={text}",
                    "-DateTimeOriginal=2021:06:01 12:00:00", str(path)], check=True)


def build_library(tmp_path: Path, *, page_size: int = 48) -> Library:
    """photos/ with a model caption (red), two people's (grandma below sub/, an XSS attempt), a photo with no
    caption (EXIF-rotated), a broken file, and one whose path was swapped for a symlink leading out of the root;
    outside/ holds a file that is indexed but below no configured root."""
    root = tmp_path / "photos"
    outside = tmp_path / "outside"
    red = make_jpeg(root / "red.jpg", (200, 30, 30))
    write_caption(red, RED_CAPTION, Provenance("vit-gpt2-tiny-greedy", None, "2024-05-01T10:00:00Z"),
                  Config().metadata)
    # A person's words written by capwatch's own path for them (no provenance), and one by exiftool.
    grandma = make_jpeg(root / "sub" / "grandma.jpg", (30, 160, 30), taken="2021:06:01 12:00:00")
    write_caption(grandma, GRANDMA, None, Config().metadata)
    set_description(make_jpeg(root / "xss.jpg", (90, 90, 90)), XSS)
    shutil.copy(FIXTURES / "images" / "oriented.jpg", root / "rotated.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    make_jpeg(root / "escape.jpg", (10, 10, 200))
    secret = make_jpeg(outside / "secret.jpg", (1, 2, 3))
    stray = make_jpeg(outside / "stray.jpg", (3, 2, 1))
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=tmp_path / "index.db"),
                    model=ModelConfig(dir=MODEL, precision="fp32"), serve=ServeConfig(page_size=page_size))
    with Index.open(tmp_path / "index.db") as index:
        reconcile(config.library.roots[0], config, index)
        # A root taken out of the configuration later: its rows stay in the index, its files must not be served.
        other = dataclasses.replace(config.library.roots[0], path=outside)
        reconcile(other, config, index)
        index.remove(secret)
        ids = {Path(r.path).name: i for i, r in _rows(index)}
    assert stray.exists()
    # After indexing, escape.jpg becomes a symlink to a file outside every root.
    (root / "escape.jpg").unlink()
    (root / "escape.jpg").symlink_to(secret)
    return Library(root, outside, config, ids)


def _rows(index: Index) -> list[tuple[int, object]]:
    from capwatch.library.search import SearchFilters

    return [(i, r) for i, r in index.browse(SearchFilters(), limit=1000)]


def exif_fields(path: Path) -> dict[str, str]:
    out = subprocess.run(["exiftool", "-j", "-G1", "-a", "-ImageDescription", "-XMP-dc:Description",
                          "-XMP-capwatch:all", str(path)], capture_output=True, text=True, check=True).stdout
    return {k: str(v) for k, v in json.loads(out)[0].items() if k != "SourceFile"}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


# -- a real `capwatch serve` ------------------------------------------------------------------------------------

#: The line `capwatch serve` (or `watch` with [serve] in_daemon) prints on stderr when it listens.
SERVING = re.compile(r"capwatch: serving (http://(?:127\.0\.0\.1|\[::1\]|[\w.:-]+):(\d+)/)(?:\?token=(\S+))?")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class Served:
    """A running `capwatch serve` (or daemon with the page): its process, address and access token."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    token: str | None
    first_line: str
    #: What it wrote on stderr after the "serving" line (read by a thread, so that the pipe never fills).
    later: list[str] = dataclasses.field(default_factory=list)

    @property
    def login_url(self) -> str:
        """The address a browser opens once: it moves the token into the port's cookie."""
        return self.url + (f"?token={self.token}" if self.token else "")

    def request(self, method: str, path: str, *, body: bytes | None = None, headers: Mapping[str, str] = {},
                token: bool = True, timeout: float = 30) -> Answer:
        """One request on a fresh connection (http.client sends ``path`` exactly as given); the token as a bearer
        header unless ``token`` is False."""
        sent = dict(headers)
        if token and self.token:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def get(self, path: str = "/", **kwargs: object) -> Answer:
        return self.request("GET", path, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, fields: Mapping[str, str], **kwargs: object) -> Answer:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self.request("POST", path, body=urllib.parse.urlencode(fields).encode(),
                            headers=headers, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def write_config(lib: Library, tmp_path: Path, extra: str = "") -> Path:
    """config.toml for ``lib`` (its root, index and the tiny model), plus ``extra`` TOML lines."""
    path = tmp_path / "config.toml"
    path.write_text(f'[library]\nroots = ["{lib.root}"]\n[index]\npath = "{lib.config.index_path()}"\n'
                    f'[model]\ndir = "{lib.config.model.dir}"\nprecision = "fp32"\n{extra}')
    return path


def token_file(tmp_path: Path) -> Path:
    """Where a server started with :func:`tests.conftest.isolated_env` keeps its access token."""
    return tmp_path / "home" / ".local" / "state" / "capwatch" / "serve-token"


def start_serve(tmp_path: Path, config: Path, *args: str, command: tuple[str, ...] = ("serve", "--port", "0"),
                env: Mapping[str, str] | None = None) -> Served:
    """Start ``capwatch --config CONFIG serve --port 0 ARGS`` (or ``command``) in ``tmp_path``'s isolated
    environment and wait for its "serving" line. The token comes from that line, or, when the server does not
    print it (inside the daemon), from the token file. Raises AssertionError (with its output) when it did not
    start."""
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), *command, *args],
                            env={**isolated_env(tmp_path), **(env or {})}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen: list[str] = []
    match = None
    while match is None and len(seen) < 40:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        match = SERVING.search(line)
    if match is None:
        proc.kill()
        proc.wait(timeout=20)
        raise AssertionError("capwatch did not start serving:\n" + "".join(seen) + proc.stderr.read())
    token = match.group(3)
    if token is None and "auth = \"none\"" not in match.string and token_file(tmp_path).exists():
        token = token_file(tmp_path).read_text().strip()
    served = Served(proc, match.group(1), int(match.group(2)), token, match.string)
    stream = proc.stderr
    threading.Thread(target=lambda: served.later.extend(stream), daemon=True).start()
    return served


@contextmanager
def serving(tmp_path: Path, config: Path, *args: str, **kwargs: object) -> Iterator[Served]:
    """:func:`start_serve`, stopped afterwards."""
    served = start_serve(tmp_path, config, *args, **kwargs)  # type: ignore[arg-type]
    try:
        yield served
    finally:
        served.stop()
