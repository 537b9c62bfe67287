"""Tiles of JPEGs that carry a large preview of themselves (MPF in APP2, a big EXIF thumbnail) come from that preview
when it serves (large enough for the tile, the photo's aspect ratio, stored as the photo is), against a real
`capwatch serve`; otherwise the photo itself is decoded. The preview's pixels are another colour than the photo's,
so every tile says where it came from."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from capwatch.models.jpegpreview import preview_image, read_header
from tests.jpeg_previews import (
    DISPARITY,
    LARGE_THUMBNAIL_FULL_HD,
    LARGE_THUMBNAIL_VGA,
    exiftool_mpf,
    jpeg_bytes,
    set_exif_thumbnail,
    with_mpf,
)
from tests.test_web_thumbnails import reindex
from tests.web_helpers import Library, Served, build_library, serving, write_config

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")

PHOTO = (200, 30, 30)  # the photo's own pixels: red
PREVIEW = (30, 30, 200)  # the preview's: blue


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return build_library(tmp_path)


@pytest.fixture
def served(lib: Library, tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path, write_config(lib, tmp_path)) as server:
        yield server


def _halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _mpf_photo(path: Path, previews: list[tuple[tuple[int, int], int]], *, orientation: int | None = None,
               preview_orientation: int | None = None, size: tuple[int, int] = (3000, 2000)) -> Path:
    main = jpeg_bytes(Image.new("RGB", size, PHOTO), orientation=orientation)
    made = [(jpeg_bytes(Image.new("RGB", dims, PREVIEW), quality=80, orientation=preview_orientation), kind)
            for dims, kind in previews]
    path.write_bytes(with_mpf(main, made))
    # exiftool, an independent reader, finds the same previews in the file.
    assert [data for _, data in exiftool_mpf(path)] == [data for data, _ in made]
    return path


def _tile(served: Served, url: str) -> Image.Image:
    answer = served.get(url)
    assert answer.status == 200, (url, answer.status)
    return Image.open(io.BytesIO(answer.body)).convert("RGB")


def _colour(image: Image.Image, at: tuple[float, float] = (0.5, 0.5)) -> str:
    r, g, b = image.getpixel((int(image.width * at[0]), int(image.height * at[1])))  # type: ignore[misc]
    return "preview" if b > 150 and r < 100 else "photo" if r > 150 and b < 100 else f"other {(r, g, b)}"


def test_a_tile_of_a_jpeg_with_an_mpf_preview_comes_from_the_preview(served: Served, lib: Library) -> None:
    _mpf_photo(lib.root / "mpf.jpg", [((1620, 1080), LARGE_THUMBNAIL_FULL_HD)])
    row = reindex(lib)["mpf.jpg"]
    thumb, preview = _tile(served, f"/thumb/{row}"), _tile(served, f"/preview/{row}")
    assert (thumb.size, _colour(thumb)) == ((320, 213), "preview")
    assert (preview.size, _colour(preview)) == ((1600, 1067), "preview")


def test_a_preview_too_small_for_the_tile_is_ignored(served: Served, lib: Library) -> None:
    _mpf_photo(lib.root / "vga.jpg", [((640, 427), LARGE_THUMBNAIL_VGA)])
    row = reindex(lib)["vga.jpg"]
    assert _colour(_tile(served, f"/thumb/{row}")) == "preview"  # 640 px serve a 320 px tile
    big = _tile(served, f"/preview/{row}")
    assert (big.size, _colour(big)) == ((1600, 1067), "photo")  # but not a 1600 px one


def test_a_preview_of_another_aspect_ratio_or_kind_is_ignored(served: Served, lib: Library) -> None:
    _mpf_photo(lib.root / "four-three.jpg", [((1440, 1080), LARGE_THUMBNAIL_FULL_HD)])
    _mpf_photo(lib.root / "stereo.jpg", [((1620, 1080), DISPARITY)])  # the other eye: another picture
    ids = reindex(lib)
    for name in ("four-three.jpg", "stereo.jpg"):
        tile = _tile(served, f"/thumb/{ids[name]}")
        assert (tile.size, _colour(tile)) == ((320, 213), "photo"), name


def test_the_smallest_preview_that_serves_is_the_one_decoded(tmp_path: Path) -> None:
    path = tmp_path / "two.jpg"
    main = jpeg_bytes(Image.new("RGB", (3000, 2000), PHOTO))
    vga = jpeg_bytes(Image.new("RGB", (640, 427), (30, 200, 30)))
    full_hd = jpeg_bytes(Image.new("RGB", (1620, 1080), PREVIEW))
    path.write_bytes(with_mpf(main, [(full_hd, LARGE_THUMBNAIL_FULL_HD), (vga, LARGE_THUMBNAIL_VGA)]))
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(os.pread(fd, 1 << 16, 0))
        assert header is not None and header.size == (3000, 2000) and len(header.previews) == 2
        small, large = preview_image(fd, 320, max_pixels=50_000_000), preview_image(fd, 1600, max_pixels=50_000_000)
        assert small is not None and small.getpixel((10, 10))[1] > 150  # type: ignore[index]  # the VGA one
        assert large is not None and _colour(large) == "preview"
        assert preview_image(fd, 3000, max_pixels=50_000_000) is None  # the photo is no larger than the tile
    finally:
        os.close(fd)


def test_the_photos_orientation_turns_its_preview_as_it_turns_the_photo(served: Served, lib: Library) -> None:
    # Stored 3000x2000 with EXIF orientation 6 (shown turned a quarter clockwise: 2000x3000), left half dark
    # and right half light in both the photo and the preview (in their own colours).
    photo = jpeg_bytes(_halves((3000, 2000), (120, 0, 0), (255, 60, 60)), orientation=6)
    preview = jpeg_bytes(_halves((1620, 1080), (0, 0, 120), (60, 60, 255)))
    (lib.root / "turned.jpg").write_bytes(with_mpf(photo, [(preview, LARGE_THUMBNAIL_FULL_HD)]))
    # A preview that says it is stored another way than the photo is not used.
    odd = jpeg_bytes(Image.new("RGB", (1620, 1080), PREVIEW), orientation=3)
    (lib.root / "odd.jpg").write_bytes(with_mpf(jpeg_bytes(Image.new("RGB", (3000, 2000), PHOTO)),
                                                [(odd, LARGE_THUMBNAIL_FULL_HD)]))
    ids = reindex(lib)
    tile = _tile(served, f"/thumb/{ids['turned.jpg']}")
    assert tile.size == (213, 320)
    # Orientation 6: the stored left side is shown on top, as in the photo's own full decode.
    top, bottom = tile.getpixel((106, 40)), tile.getpixel((106, 280))
    assert top[2] < bottom[2] and top[2] > top[0], (top, bottom)  # type: ignore[index]  # preview's, dark on top
    assert _colour(_tile(served, f"/thumb/{ids['odd.jpg']}")) == "photo"


def test_a_large_exif_thumbnail_serves_a_tile_and_a_small_one_does_not(served: Served, lib: Library,
                                                                        tmp_path: Path) -> None:
    for name, dims in (("exif-large.jpg", (640, 427)), ("exif-small.jpg", (160, 107))):
        Image.new("RGB", (3000, 2000), PHOTO).save(lib.root / name, quality=90)
        thumbnail = tmp_path / f"thumb-{name}"
        Image.new("RGB", dims, PREVIEW).save(thumbnail, quality=70)
        set_exif_thumbnail(lib.root / name, thumbnail)
    ids = reindex(lib)
    assert _colour(_tile(served, f"/thumb/{ids['exif-large.jpg']}")) == "preview"
    assert _colour(_tile(served, f"/thumb/{ids['exif-small.jpg']}")) == "photo"


def test_a_preview_that_does_not_decode_falls_back_to_the_photo(served: Served, lib: Library) -> None:
    main = jpeg_bytes(Image.new("RGB", (3000, 2000), PHOTO))
    good = jpeg_bytes(Image.new("RGB", (1620, 1080), PREVIEW))
    broken = good[:600] + b"\0" * (len(good) - 600)  # its header says 1620x1080; its data is gone
    (lib.root / "broken-preview.jpg").write_bytes(with_mpf(main, [(broken, LARGE_THUMBNAIL_FULL_HD)]))
    tile = _tile(served, f"/thumb/{reindex(lib)['broken-preview.jpg']}")
    assert (tile.size, _colour(tile)) == ((320, 213), "photo")


def test_embedded_previews_off_decodes_the_photo_itself(lib: Library, tmp_path: Path) -> None:
    _mpf_photo(lib.root / "mpf.jpg", [((1620, 1080), LARGE_THUMBNAIL_FULL_HD)])
    row = reindex(lib)["mpf.jpg"]
    with serving(tmp_path, write_config(lib, tmp_path, "[serve]\nembedded_previews = false\n")) as server:
        off = server.get(f"/thumb/{row}")
        tile = _tile(server, f"/thumb/{row}")
    assert _colour(tile) == "photo"
    with serving(tmp_path, write_config(lib, tmp_path)) as server:
        on = server.get(f"/thumb/{row}")
        assert _colour(_tile(server, f"/thumb/{row}")) == "preview"  # not the picture cached with the other setting
    assert off.headers["etag"] != on.headers["etag"]


@pytest.mark.parametrize("which", ["photo", "preview"])
def test_a_frame_header_of_zero_height_is_no_preview_and_no_error(tmp_path: Path, which: str) -> None:
    # A JPEG frame header may give height 0 (the height then follows in a DNL marker): such a photo or preview
    # has no aspect ratio to compare, so the photo is decoded instead (before: a ZeroDivisionError, a failed tile).
    def zero_height(data: bytes) -> bytes:
        sof = data.index(b"\xff\xc0")
        return data[:sof + 5] + b"\x00\x00" + data[sof + 7:]

    main = jpeg_bytes(Image.new("RGB", (3000, 2000), PHOTO))
    preview = jpeg_bytes(Image.new("RGB", (1620, 1080), PREVIEW))
    if which == "photo":
        main = zero_height(main)
    else:
        preview = zero_height(preview)
    path = tmp_path / "dnl.jpg"
    path.write_bytes(with_mpf(main, [(preview, LARGE_THUMBNAIL_FULL_HD)]))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert preview_image(fd, 320, max_pixels=50_000_000) is None
    finally:
        os.close(fd)


def test_damaged_segments_never_raise_they_only_cost_the_preview(tmp_path: Path) -> None:
    # Whatever the segments before the image data say (lengths, offsets, counts, sizes cut or changed), finding a
    # preview gives a picture or None: the photo is then decoded, which reports a damaged file in its own words.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    main = jpeg_bytes(Image.new("RGB", (3000, 2000), PHOTO), orientation=6)
    preview = jpeg_bytes(Image.new("RGB", (1620, 1080), PREVIEW), quality=80)
    good = with_mpf(main, [(preview, LARGE_THUMBNAIL_FULL_HD)])
    head = good.index(b"\xff\xda")  # everything before the photo's scan: the segments that are parsed
    path = tmp_path / "damaged.jpg"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, head - 1), st.integers(0, 255)), min_size=1, max_size=8),
           st.integers(head // 2, len(good)))
    def check(changes: list[tuple[int, int]], keep: int) -> None:
        data = bytearray(good[:keep])
        for at, value in changes:
            if at < len(data):
                data[at] = value
        path.write_bytes(bytes(data))
        fd = os.open(path, os.O_RDONLY)
        try:
            image = preview_image(fd, 320, max_pixels=50_000_000)
        finally:
            os.close(fd)
        assert image is None or max(image.size) >= 320

    check()
