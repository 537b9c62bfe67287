"""The page as a new user meets it: "Caption again" answered by a redirect (a reload does not post again) in the
page's own words, the model released when idle, file names and a count on the grid, a favicon, and an empty
filter not called an empty index."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from capwatch.config import ModelConfig
from capwatch.errors import ModelError
from capwatch.library.index import Index
from capwatch.models.captioner import open_captioner
from capwatch.web.app import ServeSettings, create_app
from tests.web_helpers import GRANDMA, MODEL, Library, build_library, exif_fields

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
CSRF = "test-csrf-0123456789abcdefghijklmnop"


def _client(lib: Library, tmp_path: Path, **changes: Any) -> TestClient:
    settings = ServeSettings(config=lib.config, csrf=CSRF, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(MODEL, lib.config.model),
                             live_state=lambda: None)
    app = create_app(dataclasses.replace(settings, **changes))
    return TestClient(app, base_url="http://127.0.0.1:8765", follow_redirects=False)


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return build_library(tmp_path)


@pytest.fixture
def client(lib: Library, tmp_path: Path) -> Iterator[TestClient]:
    with _client(lib, tmp_path) as c:
        yield c


def test_caption_again_redirects_and_says_why_in_the_pages_words(client: TestClient, lib: Library) -> None:
    grandma = lib.ids["grandma.jpg"]
    before = lib.path("sub/grandma.jpg").read_bytes()
    kept = client.post(f"/photo/{grandma}/recaption", data={"csrf": CSRF})
    assert kept.status_code == 303 and kept.headers["location"].startswith(f"/photo/{grandma}?note=")
    page = client.get(kept.headers["location"])
    assert page.status_code == 200
    assert "Not captioned again: a person wrote this caption" in page.text
    assert "--force" not in page.text  # a command-line flag means nothing on the page
    # Reloading the page it landed on is a GET: nothing is posted (or captioned) again.
    assert client.get(kept.headers["location"]).text.count("Not captioned again") == 1
    assert lib.path("sub/grandma.jpg").read_bytes() == before and GRANDMA.replace("'", "&#39;") in page.text
    # A note belongs to its photo, and a made-up one shows nothing.
    red = lib.ids["red.jpg"]
    other = client.get(f"/photo/{red}?" + kept.headers["location"].split("?", 1)[1]).text
    assert "Not captioned again" not in other
    assert "Not captioned again" not in client.get(f"/photo/{grandma}?note=made-up").text


def test_caption_again_with_a_broken_model_redirects_to_the_error(lib: Library, tmp_path: Path) -> None:
    def broken() -> Any:
        raise ModelError("the model folder /models/x has no onnx/encoder_model.onnx\nsecond line")

    with _client(lib, tmp_path, open_captioner=broken) as client:
        red = lib.ids["red.jpg"]
        answer = client.post(f"/photo/{red}/recaption", data={"csrf": CSRF})
        assert answer.status_code == 303
        page = client.get(answer.headers["location"]).text
        assert '<p class="error" role="alert">the model folder /models/x has no onnx/encoder_model.onnx</p>' in page
        assert "second line" not in page


def test_the_pages_model_is_released_after_idle_unload_seconds(lib: Library, tmp_path: Path) -> None:
    model = ModelConfig(dir=MODEL, precision="fp32", idle_unload_seconds=3)
    config = dataclasses.replace(lib.config, model=model)
    lib = dataclasses.replace(lib, config=config)
    with _client(lib, tmp_path, config=config,
                 open_captioner=lambda: open_captioner(MODEL, model)) as client:
        assert 'id="page-model">not loaded<' in client.get("/status").text
        red = lib.ids["red.jpg"]
        assert client.post(f"/photo/{red}/recaption", data={"csrf": CSRF}).status_code == 303
        assert exif_fields(lib.path("red.jpg"))["XMP-capwatch:Source"] == "capwatch"
        status = client.get("/status").text
        # Kept between re-captions (opening it again costs seconds) ...
        assert 'id="page-model">loaded for "Caption again" (released after 3 s unused)<' in status
        released = False
        # ... and released once unused for idle_unload_seconds, as the daemon does.
        deadline = time.monotonic() + 30  # a bound, not a speed: the release comes after 3 s
        while time.monotonic() < deadline and not released:
            released = 'id="page-model">not loaded<' in client.get("/status").text
            time.sleep(0.2)
        assert released, "the model is still loaded 30 s after its last use"
        # And it comes back when asked again.
        assert client.post(f"/photo/{red}/recaption", data={"csrf": CSRF}).status_code == 303


def test_tiles_show_their_file_names_and_the_page_counts_the_results(lib: Library, tmp_path: Path) -> None:
    with Index.open(lib.config.index_path()) as index:
        for name in ("red.jpg", "xss.jpg"):
            row = index.get(lib.path(name))
            assert row is not None
            index.upsert(dataclasses.replace(row, caption="a cat on a sofa", source="model"))
    with _client(lib, tmp_path) as client:
        html = client.get("/", params={"q": "cat sofa"}).text
        tiles = re.findall(r'<li class="tile">.*?</li>', html, re.S)
        assert len(tiles) == 2
        names = sorted(re.search(r'<span class="name"[^>]*>([^<]+)</span>', t).group(1) for t in tiles)  # type: ignore[union-attr]
        assert names == ["red.jpg", "xss.jpg"]  # the same caption, told apart by the file's name
        assert '<p class="count" id="count">2 photos</p>' in html
        one = client.get("/", params={"q": "bicycle"}).text
        assert '<p class="count" id="count">1 photo</p>' in one or "No matches" in one
    small = dataclasses.replace(lib, config=dataclasses.replace(
        lib.config, serve=dataclasses.replace(lib.config.serve, page_size=2)))
    with _client(small, tmp_path, config=small.config) as client:
        first = client.get("/", params={"q": "jpg"}).text
        assert '<p class="count" id="count">photos 1–2 of more than 2</p>' in first
        second = client.get("/", params={"q": "jpg", "page": "2"}).text
        assert '<p class="count" id="count">photos 3–4 of more than 4</p>' in second


def test_favicon_is_an_icon_not_a_404(client: TestClient) -> None:
    answer = client.get("/favicon.ico")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(answer.content)).format == "ICO"
    assert '<link rel="icon" href="/favicon.ico">' in client.get("/").text


def test_an_empty_filter_is_not_called_an_empty_index(client: TestClient, lib: Library, tmp_path: Path) -> None:
    empty = tmp_path / "photos" / "nothing-here"
    empty.mkdir()
    html = client.get("/", params={"folder": str(empty)}).text
    assert "Nothing matches these filters." in html and "Nothing indexed" not in html
    html = client.get("/", params={"q": "zebra", "source": "human"}).text
    assert "No matches for <q>zebra</q> with these filters." in html
    html = client.get("/", params={"page": "999"}).text
    assert "past the last one" in html and "Nothing indexed" not in html


def test_an_empty_index_says_how_to_fill_it(lib: Library, tmp_path: Path) -> None:
    bare = tmp_path / "empty.db"
    Index.open(bare).close()
    empty = dataclasses.replace(lib, config=dataclasses.replace(
        lib.config, index=dataclasses.replace(lib.config.index, path=bare)))
    with _client(empty, tmp_path, config=empty.config) as client:
        assert "Nothing indexed here yet: run <code>capwatch scan</code>" in client.get("/").text
