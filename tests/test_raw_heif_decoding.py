"""RAW files are captioned from their embedded JPEG preview; HEIC decodes through pillow-heif."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from capwatch.errors import ImageError
from capwatch.models.preprocess import load_image
from capwatch.models.rawpreview import extract_preview
from tests.conftest import FIXTURES, CliRunner

MODEL = FIXTURES / "models" / "vit-gpt2-tiny-greedy"


def _jpeg(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (0, 0, size[0] // 4, size[1] // 4))  # a white top-left corner to check rotation
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def _ifd(entries: list[tuple[int, int, int, int]], next_ifd: int = 0) -> bytes:
    """A little-endian IFD; entries are (tag, type, count, inline value)."""
    body = struct.pack("<H", len(entries))
    for tag, typ, count, value in sorted(entries):
        inline = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        body += struct.pack("<HHI", tag, typ, count) + inline
    return body + struct.pack("<I", next_ifd)


def tiff_raw_with_preview(preview: bytes, orientation: int = 1) -> bytes:
    """TIFF header, IFD0 (orientation + JPEGInterchangeFormat), then the preview bytes (like CR2/NEF/PEF)."""
    ifd_offset = 8
    ifd_size = 2 + 12 * 3 + 4
    jpeg_offset = ifd_offset + ifd_size
    ifd = _ifd([(0x0112, 3, 1, orientation), (0x0201, 4, 1, jpeg_offset), (0x0202, 4, 1, len(preview))])
    return b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + preview


def dng_like(small: bytes, large: bytes, sensor: bytes) -> bytes:
    """IFD0 holds a small preview strip; two SubIFDs: a big JPEG preview strip and undecodable 'sensor' data."""
    header = 8
    ifd0_size = 2 + 12 * 5 + 4
    sub_size = 2 + 12 * 3 + 4
    subs_array = header + ifd0_size
    sub1 = subs_array + 8
    sub2 = sub1 + sub_size
    data = sub2 + sub_size
    small_at, large_at, sensor_at = data, data + len(small), data + len(small) + len(large)
    ifd0 = _ifd([(0x0103, 3, 1, 7), (0x0111, 4, 1, small_at), (0x0117, 4, 1, len(small)), (0x0112, 3, 1, 1),
                 (0x014A, 4, 2, subs_array)])
    ifd_sub1 = _ifd([(0x0103, 3, 1, 7), (0x0111, 4, 1, large_at), (0x0117, 4, 1, len(large))])
    ifd_sub2 = _ifd([(0x0103, 3, 1, 7), (0x0111, 4, 1, sensor_at), (0x0117, 4, 1, len(sensor))])
    out = b"II*\x00" + struct.pack("<I", header) + ifd0 + struct.pack("<II", sub1, sub2) + ifd_sub1 + ifd_sub2
    assert len(out) == data
    return out + small + large + sensor


def test_tiff_raw_preview_is_decoded_and_oriented_by_the_raw(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.CR2"
    path.write_bytes(tiff_raw_with_preview(_jpeg((120, 80), (200, 20, 20)), orientation=6))
    image = load_image(path)
    assert image.size == (80, 120)  # orientation 6: rotated 90° clockwise
    assert image.getpixel((79, 0))[0] > 240 and image.getpixel((79, 0))[1] > 240  # white corner now top-right


def test_dng_like_file_uses_the_largest_decodable_preview(tmp_path: Path) -> None:
    sensor = b"\xff\xd8\xff\xc3" + b"\x00" * 500  # SOI + lossless-JPEG marker: what raw sensor strips look like
    path = tmp_path / "photo.dng"
    path.write_bytes(dng_like(_jpeg((32, 24), (0, 0, 255)), _jpeg((320, 240), (0, 200, 0)), sensor))
    preview = extract_preview(path)
    assert preview is not None
    assert Image.open(io.BytesIO(preview.data)).size == (320, 240)
    assert load_image(path).size == (320, 240)


def test_fujifilm_raf_preview(tmp_path: Path) -> None:
    preview = _jpeg((160, 120), (10, 10, 240))
    header = bytearray(b"FUJIFILMCCD-RAW 0201FF383501".ljust(100, b"\x00"))
    struct.pack_into(">II", header, 84, len(header), len(preview))
    path = tmp_path / "DSCF0001.RAF"
    path.write_bytes(bytes(header) + preview + b"\x00" * 64)
    assert load_image(path).size == (160, 120)


def test_raw_without_a_preview_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.nef"
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + _ifd([(0x0112, 3, 1, 1)]) + b"\x00" * 100)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "RAW without an embedded JPEG preview" in str(info.value) and "\n" not in str(info.value)


def test_heic_and_raw_caption_end_to_end_in_a_fresh_process(run_cli: CliRunner, tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    heic = tmp_path / "IMG_1234.HEIC"
    try:
        # from_pillow encodes without registering a Pillow plugin here: the CLI process must do that itself.
        pillow_heif.from_pillow(Image.new("RGB", (64, 48), (30, 160, 60))).save(heic, quality=90)
    except (OSError, KeyError, ValueError) as exc:  # a pillow-heif build without an HEVC encoder
        pytest.skip(f"cannot encode HEIC here: {exc}")
    raw = tmp_path / "DSC_0001.NEF"
    raw.write_bytes(tiff_raw_with_preview(_jpeg((96, 64), (90, 90, 200))))
    result = run_cli("caption", "--model", MODEL, "--dry-run", "--json", heic, raw)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["IMG_1234.HEIC", "DSC_0001.NEF"]
    assert all(r["caption"] and r["error"] is None for r in rows), rows
