"""`capwatch serve` and videos: a poster thumbnail (the representative frame), the photo page's player, and the
video itself with Range requests, only inside the roots and only from a regular file."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient
from video_helpers import FFMPEG, make_video

from capwatch.config import Config, IndexConfig, LibraryConfig, ModelConfig, RootConfig
from capwatch.library.index import Index
from capwatch.library.scan import reconcile
from capwatch.library.search import SearchFilters
from capwatch.models.captioner import open_captioner
from capwatch.web.app import ServeSettings, create_app
from capwatch.web.media import parse_range
from tests.web_helpers import MODEL

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not FFMPEG, reason="ffmpeg makes the videos")
CSRF = "test-csrf-0123456789abcdefghijklmnop"


@dataclasses.dataclass(frozen=True)
class VideoLibrary:
    root: Path
    ids: dict[str, int]
    settings: ServeSettings


@pytest.fixture
def vlib(tmp_path: Path) -> VideoLibrary:
    root = tmp_path / "videos"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    make_video(root / "clip.mp4", seconds=2)
    make_video(root / "escape.mov", seconds=1)
    secret = make_video(outside / "secret.mov", seconds=1)
    Image.new("RGB", (64, 48), (200, 20, 20)).save(root / "photo.jpg")
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=tmp_path / "index.db"),
                    model=ModelConfig(dir=MODEL, precision="fp32"))
    with Index.open(tmp_path / "index.db") as index:
        reconcile(config.library.roots[0], config, index)
        ids = {Path(r.path).name: i for i, r in index.browse(SearchFilters(), limit=100)}
    # After indexing, escape.mov becomes a link to a video outside every root.
    (root / "escape.mov").unlink()
    (root / "escape.mov").symlink_to(secret)
    settings = ServeSettings(config=config, csrf=CSRF, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(MODEL, config.model), live_state=lambda: None)
    return VideoLibrary(root, ids, settings)


@pytest.fixture
def client(vlib: VideoLibrary) -> Iterator[TestClient]:
    with TestClient(create_app(vlib.settings), base_url="http://127.0.0.1:8765", follow_redirects=False) as c:
        yield c


def test_the_video_is_served_whole_and_by_byte_ranges(client: TestClient, vlib: VideoLibrary) -> None:
    data = (vlib.root / "clip.mp4").read_bytes()
    row = vlib.ids["clip.mp4"]
    whole = client.get(f"/video/{row}")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(f"/video/{row}", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    tail = client.get(f"/video/{row}", headers={"Range": "bytes=-500"})
    assert tail.status_code == 206 and tail.content == data[-500:]
    open_end = client.get(f"/video/{row}", headers={"Range": f"bytes={len(data) - 10}-"})
    assert open_end.content == data[-10:]
    beyond = client.get(f"/video/{row}", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    stale = client.get(f"/video/{row}", headers={"Range": "bytes=0-9", "If-Range": '"another version"'})
    assert stale.status_code == 200 and stale.content == data


def test_the_poster_is_a_frame_of_the_video_and_the_page_plays_it(client: TestClient, vlib: VideoLibrary) -> None:
    row = vlib.ids["clip.mp4"]
    thumb = client.get(f"/thumb/{row}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    poster = Image.open(io.BytesIO(thumb.content))
    assert poster.size == (320, 240)
    page = client.get(f"/photo/{row}").text
    assert f'<video class="preview" id="video" controls preload="metadata" poster="/preview/{row}" ' \
           f'src="/video/{row}"' in page
    grid = client.get("/?q=clip").text
    assert "▶ video" in grid


def test_only_videos_inside_the_roots_from_regular_files_are_served(client: TestClient, vlib: VideoLibrary) -> None:
    assert client.get(f"/video/{vlib.ids['escape.mov']}").status_code == 404  # a link out of the root
    assert client.get(f"/video/{vlib.ids['photo.jpg']}").status_code == 404  # not a video
    assert client.get("/video/999999").status_code == 404
    # The video's name now leads to a FIFO: refused at once, never a hang.
    clip = vlib.root / "clip.mp4"
    clip.unlink()
    os.mkfifo(clip)
    assert client.get(f"/video/{vlib.ids['clip.mp4']}").status_code == 404


def test_range_headers_are_parsed_as_http_says() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-0", 100) == (0, 0)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole file
    assert parse_range("items=0-1", 100) is None
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


def test_a_real_capwatch_serve_streams_byte_ranges_of_a_video(vlib: VideoLibrary, tmp_path: Path) -> None:
    from tests.web_helpers import serving

    config = tmp_path / "config.toml"
    settings = vlib.settings.config
    config.write_text(f'[library]\nroots = ["{vlib.root}"]\n[index]\npath = "{settings.index_path()}"\n'
                      f'[model]\ndir = "{MODEL}"\nprecision = "fp32"\n')
    with serving(tmp_path, config) as server:
        path = f"/video/{vlib.ids['clip.mp4']}"
        data = (vlib.root / "clip.mp4").read_bytes()
        ranged = server.get(path, headers={"Range": "bytes=1000-"})
        assert ranged.status == 206
        assert ranged.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert ranged.body == data[1000:]
        whole = server.get(path)
        assert whole.status == 200 and whole.body == data
        assert server.get(path, token=False).status == 401  # the token is asked for here too
