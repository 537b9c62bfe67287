"""Thumbnails and previews against a real `capwatch serve`: nothing outside the roots, no hang on a FIFO, failures
remembered, oversized images refused before decoding, the cache pruned and bounded."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capwatch.library.index import Index
from capwatch.library.scan import reconcile
from tests.daemon_helpers import wait_until
from tests.web_helpers import Library, Served, build_library, make_jpeg, serving, write_config

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return build_library(tmp_path)


@pytest.fixture
def served(lib: Library, tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path, write_config(lib, tmp_path)) as server:
        yield server


def cache_files(tmp_path: Path) -> list[Path]:
    """The pictures the server keeps (its cache folder below the isolated XDG_CACHE_HOME)."""
    return sorted((tmp_path / "home" / ".cache" / "capwatch" / "thumbnails").rglob("*.webp"))


def rows_cached(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in cache_files(tmp_path))


def reindex(lib: Library) -> dict[str, int]:
    with Index.open(lib.config.index_path()) as index:
        reconcile(lib.config.library.roots[0], lib.config, index)
        return {Path(k).name: v for k, v in index.ids_for(str(p) for p in lib.root.rglob("*")).items()}


def lines_about(served: Served, name: str) -> list[str]:
    return [line for line in served.later if name in line]


def png_header_only(path: Path, width: int, height: int, *, data: bytes = b"") -> Path:
    """A PNG whose IHDR says ``width`` x ``height`` RGB, followed by ``data`` as its (truncated) IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data))
    return path


def truncated_png(path: Path, side: int) -> Path:
    """A real ``side`` x ``side`` PNG cut off halfway through its pixel data."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


# -- what is opened -----------------------------------------------------------------------------------------------


def test_a_folder_swapped_for_a_link_after_the_check_serves_nothing_from_outside(lib: Library,
                                                                              tmp_path: Path) -> None:
    """The window of issue 20 item 4: the path is checked below the root, then the folder on the way becomes a
    link out of it before the file is opened. The open (from the root, through no link) refuses; a descriptor
    opened before the swap still shows the inside photo and is cached under what it is."""
    from capwatch.web.security import open_servable, servable
    from capwatch.web.thumbnails import Entry, ThumbnailCache, cache_key

    inside = make_jpeg(lib.root / "2024" / "beach.jpg", (250, 250, 0))
    make_jpeg(lib.outside / "2024" / "beach.jpg", (0, 0, 250))
    real = servable(str(inside), [lib.root])
    assert real is not None
    held = open_servable(real, [lib.root])
    (lib.root / "2024").rename(tmp_path / "moved")
    (lib.root / "2024").symlink_to(lib.outside / "2024")
    with pytest.raises(OSError):
        os.close(open_servable(real, [lib.root]))
    try:
        cache = ThumbnailCache(tmp_path / "cache", max_bytes=1 << 20)
        entry = Entry(1, 64, cache_key("fp", os.fstat(held), 64))
        picture = Image.open(io.BytesIO(cache.render(held, str(real), entry))).convert("RGB")
    finally:
        os.close(held)
    red, _green, blue = picture.getpixel((10, 10))
    assert blue < 60 and red > 200  # the yellow inside photo, not the blue outside one


def test_a_link_inside_the_root_is_still_served_and_one_out_is_not(served: Served, lib: Library) -> None:
    """Links that stay inside a root were served before (servable resolves them) and still are; escape.jpg
    (a link out of the root) is not."""
    red = lib.path("red.jpg")
    alias = lib.path("alias.jpg")
    shutil.copy(red, alias)
    ids = reindex(lib)
    alias.unlink()
    alias.symlink_to(red)
    answer = served.get(f"/thumb/{ids['alias.jpg']}")
    assert answer.status == 200
    assert Image.open(io.BytesIO(answer.body)).convert("RGB").getpixel((5, 5))[0] > 150
    assert served.get(f"/thumb/{lib.ids['escape.jpg']}").status == 404


@pytest.mark.timeout(120)
def test_a_photo_swapped_for_a_fifo_costs_one_answer_not_a_decode_slot(served: Served, lib: Library) -> None:
    fifo_row = lib.ids["red.jpg"]
    lib.path("red.jpg").unlink()
    os.mkfifo(lib.path("red.jpg"))
    for _ in range(2 * (os.cpu_count() or 1) + 2):  # more than there are decode slots
        assert served.get(f"/thumb/{fifo_row}", timeout=30).status in (404, 415)
    # Every slot is still free: a real photo gets its thumbnail.
    assert served.get(f"/thumb/{lib.ids['rotated.jpg']}", timeout=30).status == 200


# -- failures and large images ------------------------------------------------------------------------------------


def test_a_file_that_failed_is_remembered_and_not_decoded_again_until_it_changes(served: Served, lib: Library,
                                                                              tmp_path: Path) -> None:
    broken = truncated_png(lib.root / "cut.png", 1500)
    row = reindex(lib)["cut.png"]
    for _ in range(3):
        assert served.get(f"/thumb/{row}").status == 415
    # Another broken file after them: once its line is read, every line about cut.png has been read too.
    assert served.get(f"/thumb/{lib.ids['broken.jpg']}").status == 415
    wait_until(lambda: lines_about(served, "broken.jpg"), what="the log line")
    assert len(lines_about(served, "cut.png")) == 1, served.later  # decoded once, then remembered
    Image.new("RGB", (40, 30), (0, 200, 0)).save(broken, "PNG")  # the file is mended: it is decoded again
    answer = served.get(f"/thumb/{row}")
    assert answer.status == 200 and Image.open(io.BytesIO(answer.body)).size == (40, 30)
    assert len(cache_files(tmp_path)) == 1


def test_images_over_the_decode_limit_are_refused_before_decoding_but_large_jpegs_are_reduced(
        served: Served, lib: Library) -> None:
    png_header_only(lib.root / "huge.png", 13000, 13000, data=zlib.compress(b"\0" * 100_000))
    make_jpeg(lib.root / "big.jpg", (20, 40, 200), size=(9000, 6000))  # 54 MP: decoded at 1/8 scale
    ids = reindex(lib)
    huge = served.get(f"/preview/{ids['huge.png']}")
    assert huge.status == 415
    line = wait_until(lambda: lines_about(served, "huge.png"), what="the log line")
    assert "too large" in line[0] and "13000x13000" in line[0] and "50 MP" in line[0]
    for url in (f"/thumb/{ids['big.jpg']}", f"/preview/{ids['big.jpg']}"):
        answer = served.get(url)
        assert answer.status == 200, url
        assert max(Image.open(io.BytesIO(answer.body)).size) in (320, 1600)
    from capwatch.web.thumbnails import MAX_DECODED_PIXELS

    assert MAX_DECODED_PIXELS < 9000 * 6000  # the JPEG was over the limit at full scale


# -- the cache folder ----------------------------------------------------------------------------------------------


def test_an_edited_then_deleted_photo_leaves_no_pictures_behind(lib: Library, tmp_path: Path) -> None:
    red = lib.ids["red.jpg"]
    config = write_config(lib, tmp_path)
    with serving(tmp_path, config) as served:
        for edit in range(5):
            assert served.get(f"/thumb/{red}").status == 200
            assert served.get(f"/preview/{red}").status == 200
            Image.new("RGB", (50 + edit, 40), (edit * 40, 0, 0)).save(lib.path("red.jpg"), "JPEG")
            os.utime(lib.path("red.jpg"), ns=(1, 2_000_000_000_000_000_000 + edit))
        assert len(cache_files(tmp_path)) == 2  # one thumbnail, one preview: the older ones went
        assert rows_cached(tmp_path) == [red, red]
        assert served.get(f"/thumb/{lib.ids['rotated.jpg']}").status == 200
    lib.path("red.jpg").unlink()
    with Index.open(lib.config.index_path()) as index:
        index.remove(lib.path("red.jpg"))
    with serving(tmp_path, config):  # the sweep at start finds the row gone
        wait_until(lambda: rows_cached(tmp_path) == [lib.ids["rotated.jpg"]], what="the sweep")


def test_the_cache_stays_under_its_bound_least_recently_shown_first(lib: Library, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    for i in range(12):  # noise: each preview is a few hundred KB of WebP
        Image.fromarray(rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(lib.root / f"n{i:02}.png")
    ids = reindex(lib)
    rows = [ids[f"n{i:02}.png"] for i in range(12)]
    config = write_config(lib, tmp_path, "[serve]\nthumbnail_cache_mb = 1\n")
    with serving(tmp_path, config) as served:
        for row in rows[:3]:
            assert served.get(f"/preview/{row}").status == 200
        assert served.get(f"/preview/{rows[0]}").status == 200  # shown again: now the most recent of the three
        used = [rows[1], rows[2], rows[0]]  # the order of last use
        for row in rows[3:]:
            before = set(rows_cached(tmp_path))
            assert served.get(f"/preview/{row}").status == 200
            used.append(row)
            if before - set(rows_cached(tmp_path)):
                break
        else:
            raise AssertionError("the cache never went over its bound")
        kept = set(rows_cached(tmp_path))
        # Least recently shown first: what went is the start of the order of last use (1, 2, 0, 3, 4, ...),
        # so row 1 went, and row 0 (made first) did not go before row 2.
        gone = [row for row in used if row not in kept]
        assert gone and gone == used[:len(gone)], (used, gone)
        assert sum(p.stat().st_size for p in cache_files(tmp_path)) <= 1 << 20


def test_a_request_waits_for_a_decoder_only_so_long(lib: Library, tmp_path: Path) -> None:
    """Every decode slot taken (each by a decode that does not finish): the next request is told to come back
    (Busy, the page's 503) instead of waiting for ever; once a slot is free it is rendered."""
    from capwatch.web.security import open_servable
    from capwatch.web.thumbnails import Busy, Entry, ThumbnailCache, cache_key

    cache = ThumbnailCache(tmp_path / "cache", max_bytes=1 << 20, parallel=1, slot_wait=0.2)
    real = lib.path("red.jpg").resolve()
    fd = open_servable(real, [lib.root])
    try:
        entry = Entry(lib.ids["red.jpg"], 64, cache_key("fp", os.fstat(fd), 64))
        cache._slots.acquire()  # the one decoder, held by a decode that hangs
        try:
            with pytest.raises(Busy, match="busy"):
                cache.render(fd, str(real), entry)
        finally:
            cache._slots.release()
        assert Image.open(io.BytesIO(cache.render(fd, str(real), entry))).format == "WEBP"
    finally:
        os.close(fd)
