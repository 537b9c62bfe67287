"""A small photo library for the `capwatch serve` tests: real JPEGs, real metadata, a real index.

Captions are put into the files through the real write path (a model's with capwatch provenance, people's with
exiftool), then the index is built by the real reconcile, as `capwatch scan --no-caption` would.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
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


def start_server(lib: Library, tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    """A real `capwatch serve` on 127.0.0.1 and a free port; returns the process and its address (stop it with
    ``proc.terminate()``). Every test that talks to a real server starts it here, so a change to how the server
    must be reached (a token, say) is made in one place."""
    config = tmp_path / "config.toml"
    config.write_text(f'[library]\nroots = ["{lib.root}"]\n[index]\npath = "{lib.config.index_path()}"\n'
                      f'[model]\ndir = "{lib.config.model.dir}"\nprecision = "fp32"\n')
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), "serve", "--port", "0"],
                            env=isolated_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"capwatch serve did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


@dataclass(frozen=True)
class Answer:
    status: int
    text: str
    headers: dict[str, str]


def http(url: str, form: dict[str, str] | None = None) -> Answer:
    """GET ``url``, or POST ``form`` to it as the page's forms do; redirects are not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    data = None if form is None else urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/x-www-form-urlencoded"}
                                     if data is not None else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=60) as reply:
            return Answer(reply.status, reply.read().decode(), {k.lower(): v for k, v in reply.headers.items()})
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read().decode(), {k.lower(): v for k, v in exc.headers.items()})
