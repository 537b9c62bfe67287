"""Image loading and preprocessing: transformers' image processor semantics and bad input handling."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from capwatch.errors import ImageError
from capwatch.models.preprocess import DRAFT_HEADROOM, Preprocessor, load_image

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_DIRS = sorted(p for p in (FIXTURES / "models").glob("vit-gpt2-*") if (p / "pixel_values.npz").is_file())
VIT = Preprocessor.from_config({"size": {"height": 32, "width": 32}})


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda p: p.name)
def test_matches_transformers_vit_image_processor_within_1e5(model_dir: Path) -> None:
    """pixel_values.npz holds ViTImageProcessor's output for each fixture image (tools/make_fixture_models.py)."""
    proc = Preprocessor.from_config(json.loads((model_dir / "preprocessor_config.json").read_text()))
    reference = np.load(model_dir / "pixel_values.npz")
    assert len(reference.files) >= 5
    for name in reference.files:
        got = proc(load_image(FIXTURES / "images" / name, target_size=proc.output_size))
        assert got.dtype == np.float32 and got.shape == reference[name].shape
        assert np.abs(got - reference[name]).max() <= 1e-5, name


def test_config_semantics_resample_mean_std_and_rescale() -> None:
    image = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) * 3)
    plain = Preprocessor.from_config({"size": {"height": 8, "width": 8}, "do_normalize": False})(image)
    assert np.allclose(plain.transpose(1, 2, 0), np.asarray(image) / 255.0, atol=1e-7)
    norm = Preprocessor.from_config({"size": {"height": 8, "width": 8}, "image_mean": [0.1, 0.2, 0.3],
                                     "image_std": [0.5, 0.25, 2.0]})(image)
    expected = (np.asarray(image, dtype=np.float32) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
    assert np.allclose(norm.transpose(1, 2, 0), expected, atol=1e-6)
    raw = Preprocessor.from_config({"size": {"height": 8, "width": 8}, "do_rescale": False, "do_normalize": False})
    assert raw(image).max() > 1.0
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    nearest = Preprocessor.from_config({"size": {"height": 10, "width": 10}, "resample": 0})(big)
    bicubic = Preprocessor.from_config({"size": {"height": 10, "width": 10}, "resample": 3})(big)
    assert not np.allclose(nearest, bicubic)
    with pytest.raises(ValueError, match="resample"):
        Preprocessor.from_config({"resample": 42})


def test_shortest_edge_resize_then_center_crop() -> None:
    proc = Preprocessor.from_config({"size": {"shortest_edge": 16}, "do_center_crop": True,
                                     "crop_size": {"height": 16, "width": 16}})
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    ImageDraw.Draw(wide).rectangle([24, 0, 39, 31], fill=(255, 255, 255))  # a white centre column
    out = proc(wide)
    assert out.shape == (3, 16, 16)
    assert out[0, 8, 8] > 0.9 and out[0, 8, 0] < -0.9


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = load_image(FIXTURES / "images" / "oriented.jpg")
    assert image.size == (30, 60)  # stored 60x30 with Orientation 6
    top = np.asarray(image)[:10].mean(axis=(0, 1))
    bottom = np.asarray(image)[-10:].mean(axis=(0, 1))
    assert top[0] > 150 and top[1] < 80  # the red band is at the top once rotated
    assert bottom.min() > 200


def test_first_frame_of_animated_gif_and_webp(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    for ext in ("gif", "webp"):
        path = tmp_path / f"anim.{ext}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
        pixel = np.asarray(load_image(path))[10, 10]
        assert pixel[0] > 200 and pixel[2] < 50, ext


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "P", "RGBA", "I;16", "1"])
def test_every_common_mode_becomes_8bit_rgb(tmp_path: Path, mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16))
        path = tmp_path / "deep.png"
    elif mode == "CMYK":
        img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
        path = tmp_path / "cmyk.jpg"
    elif mode == "P":
        img = Image.new("RGB", (32, 32), (0, 200, 0)).convert("P")
        img.info["transparency"] = 0  # palette image with a transparent index
        path = tmp_path / "p.png"
    else:
        img = Image.new("RGB", (32, 32), (0, 200, 0)).convert(mode)
        path = tmp_path / f"{mode}.png"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (32, 32)
    array = np.asarray(out)
    if mode == "I;16":
        # 16-bit grey is scaled, not clipped: a ramp from black to white, not a white image.
        assert array[0, 0, 0] < 10 and array[-1, -1, 0] > 245 and 100 < array.mean() < 155
    if mode == "CMYK":
        assert array[..., 0].mean() > 200 and array[..., 1].mean() < 60
    assert VIT(out).shape == (3, 32, 32)


def test_bad_files_raise_one_line_image_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    cases = {
        empty: "empty file",
        text: "not an image",
        truncated: "cannot decode",
        tmp_path / "missing.png": "not found",
        tmp_path: "directory",
    }
    for path, words in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(path)
        message = str(info.value)
        assert words in message and "\n" not in message and str(path) in message


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (the pixel data is never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(100_000, 100_000))
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(ImageError, match="too large"):
        load_image(small, max_pixels=5_000)


def test_large_jpeg_draft_decode_stays_close_to_full_decode(tmp_path: Path) -> None:
    """Draft decoding keeps >= DRAFT_HEADROOM x the model size; the measured effect on the tensor is tiny."""
    y, x = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([x * 255 // 1599, y * 255 // 1199, (x + y) * 255 // 2798], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=92)
    proc = Preprocessor.from_config({"size": {"height": 32, "width": 32}})
    drafted_image = load_image(path, target_size=(32, 32))
    assert min(drafted_image.size) < 1200  # draft mode was used...
    assert min(drafted_image.size) >= DRAFT_HEADROOM * 32  # ...but kept the headroom
    full = proc(load_image(path))  # no target size: full decode
    drafted = proc(drafted_image)
    # 2/255 in normalised units (std 0.5) is one 8-bit level: draft changes the input by less than that.
    assert np.abs(full - drafted).mean() < 2 / 255
    assert np.abs(full - drafted).max() < 4 * 2 / 255
