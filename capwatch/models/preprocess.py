"""Image file -> model input tensor, exactly as the model's ``preprocessor_config.json`` says.

Two steps, kept apart so each can be tested on its own:

* :func:`load_image` decodes a file safely: first frame only, EXIF orientation applied, converted to 8-bit RGB,
  decompression bombs refused, and very large JPEGs decoded at a reduced DCT scale (Pillow's draft mode) when that
  still leaves at least :data:`DRAFT_HEADROOM` times the model's input size, so a 50-megapixel photo does not cost
  seconds before a 224-pixel resize.
* :class:`Preprocessor` reproduces transformers' slow image processors (``ViTImageProcessor``,
  ``CLIPImageProcessor`` family) step by step: PIL resize with the configured filter, optional center crop,
  rescale computed in float64 then cast to float32, normalise in float32, channels first. On the same PIL image the
  result equals transformers' to float32 rounding.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from capwatch.config import Range, short_repr
from capwatch.errors import ImageError
from capwatch.metadata.formats import HEAD_SIZE, detect_format
from capwatch.metadata.safeopen import NotRegularFile, open_binary
from capwatch.models import frames
from capwatch.models.rawpreview import extract_preview

#: Refuse images with more pixels than this before decoding them (Pillow's own hard limit is 2x its warning
#: threshold of ~89 MP; a 180 MP panorama is still accepted, a zip bomb is not).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
#: Draft-decode a JPEG only down to a size of at least this many times the model input on both axes: the following
#: antialiased resize then averages so many source pixels that the DCT-scaled decode changes the result by less
#: than one 8-bit level in practice (measured in tests/test_preprocess.py).
DRAFT_HEADROOM = 4

#: Model input sides (size, crop_size, shortest_edge) accepted from preprocessor_config.json: ViT-GPT2 uses 224,
#: Florence-2 768. An input of 4096x4096 already takes 200 MB as float32; a bigger one is a broken config.
IMAGE_SIDE = Range(1, 4096)
#: Pixels are in 0..1 after rescaling (0..255 without): a mean or std outside +-255 cannot be meant; a std near 0
#: turns every pixel into +-inf.
IMAGE_MEAN = Range(-255, 255)
IMAGE_STD = Range(0.001, 255)
#: 1/255 in every real config (1/127.5 in some); it must shrink 8-bit values, never zero or flip them.
RESCALE_FACTOR = Range(1e-6, 1)

# PIL resample codes as transformers stores them in preprocessor_config.json (PILImageResampling values).
_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessor:
    """The image-processor settings of one model (a subset of transformers' keys, with their defaults)."""

    do_resize: bool = True
    #: (height, width) of the resize, or None when ``shortest_edge`` is used instead.
    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    resample: int = 2
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocessor:
        """Build from a ``preprocessor_config.json`` mapping, checking every key this class uses.

        Unknown keys are ignored (transformers ignores what a processor does not use); null means the default, as
        an absent key does. Returns the Preprocessor; raises ValueError with one line ``<key>: expected ..., got
        ...`` naming the allowed range when a value has the wrong type or shape or is out of bounds (callers add
        the file name and turn it into a ModelError).
        """

        def get(name: str, default: Any) -> Any:
            value = config.get(name)
            return default if value is None else value

        kind = get("image_processor_type", "")
        clip_like = isinstance(kind, str) and kind.startswith(("CLIP", "Florence", "Siglip"))
        size: tuple[int, int] | None = None
        shortest: int | None = None
        raw_size = get("size", {"height": 224, "width": 224})
        if isinstance(raw_size, int) and not isinstance(raw_size, bool):
            size = (_side("size", raw_size), _side("size", raw_size))
        elif isinstance(raw_size, Mapping) and "height" in raw_size and "width" in raw_size:
            size = (_side("size.height", raw_size["height"]), _side("size.width", raw_size["width"]))
        elif isinstance(raw_size, Mapping) and "shortest_edge" in raw_size:
            shortest = _side("size.shortest_edge", raw_size["shortest_edge"])
        else:
            raise ValueError(f"size: expected {{height, width}} or {{shortest_edge}}, got {short_repr(raw_size)}")
        crop: tuple[int, int] | None = None
        raw_crop = config.get("crop_size")
        if isinstance(raw_crop, int) and not isinstance(raw_crop, bool):
            crop = (_side("crop_size", raw_crop), _side("crop_size", raw_crop))
        elif isinstance(raw_crop, Mapping) and "height" in raw_crop and "width" in raw_crop:
            crop = (_side("crop_size.height", raw_crop["height"]), _side("crop_size.width", raw_crop["width"]))
        elif raw_crop is not None:
            raise ValueError(f"crop_size: expected {{height, width}} or an integer, got {short_repr(raw_crop)}")
        resample = get("resample", 3 if clip_like else 2)
        if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _RESAMPLE:
            raise ValueError(f"resample: unknown PIL filter {short_repr(resample)} (allowed: 0 to {max(_RESAMPLE)})")

        def flag(name: str, default: bool) -> bool:
            value = get(name, default)
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {short_repr(value)}")
            return value

        def number(name: str, default: float, bounds: Range) -> float:
            value = get(name, default)
            if (problem := bounds.problem(value, integer=False)) is not None:
                raise ValueError(f"{name}: {problem}")
            return float(value)

        def triple(name: str, default: tuple[float, float, float], bounds: Range) -> tuple[float, float, float]:
            value = get(name, default)
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = [value] * 3
            if not isinstance(value, list | tuple) or len(value) != 3:
                raise ValueError(f"{name}: expected 3 numbers (one per RGB channel), got {short_repr(value)}")
            for i, item in enumerate(value):
                if (problem := bounds.problem(item, integer=False)) is not None:
                    raise ValueError(f"{name}.{i}: {problem}")
            return (float(value[0]), float(value[1]), float(value[2]))

        return cls(
            do_resize=flag("do_resize", True),
            size=size,
            shortest_edge=shortest,
            resample=resample,
            do_center_crop=flag("do_center_crop", False) and crop is not None,
            crop_size=crop,
            do_rescale=flag("do_rescale", True),
            rescale_factor=number("rescale_factor", 1 / 255, RESCALE_FACTOR),
            do_normalize=flag("do_normalize", True),
            image_mean=triple("image_mean", (0.5, 0.5, 0.5), IMAGE_MEAN),
            image_std=triple("image_std", (0.5, 0.5, 0.5), IMAGE_STD),
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of the tensor this produces, when it does not depend on the image."""
        if self.do_center_crop and self.crop_size is not None:
            return self.crop_size
        if self.do_resize and self.size is not None:
            return self.size
        return None

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Return the (3, H, W) float32 tensor for ``image`` (converted to RGB first if it is not)."""
        if image.mode != "RGB":
            image = to_rgb(image)
        if self.do_resize:
            if self.size is not None:
                height, width = self.size
            else:
                assert self.shortest_edge is not None
                height, width = _shortest_edge_size(image.height, image.width, self.shortest_edge)
            if (width, height) != image.size or self.resample != 0:
                image = image.resize((width, height), resample=_RESAMPLE[self.resample])
        pixels = np.asarray(image)
        if self.do_center_crop and self.crop_size is not None:
            pixels = _center_crop(pixels, self.crop_size)
        array: np.ndarray
        if self.do_rescale:
            # transformers upcasts to float64 before scaling, then casts the result to float32
            array = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            array = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def _side(key: str, value: object) -> int:
    """Return ``value`` as an image side; raises ValueError naming ``key`` and :data:`IMAGE_SIDE` otherwise."""
    if (problem := IMAGE_SIDE.problem(value, integer=True)) is not None:
        raise ValueError(f"{key}: {problem}")
    assert isinstance(value, int)
    return value


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    height, width = pixels.shape[:2]
    crop_h, crop_w = crop
    if crop_h > height or crop_w > width:  # transformers pads with zeros around the image
        padded = np.zeros((max(height, crop_h), max(width, crop_w), pixels.shape[2]), dtype=pixels.dtype)
        top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
        padded[top : top + height, left : left + width] = pixels
        pixels, height, width = padded, padded.shape[0], padded.shape[1]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return pixels[top : top + crop_h, left : left + crop_w]


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB.

    16-bit and 32-bit integer/float grey images are scaled to 0-255 (Pillow's own conversion clips them, which
    turns most 16-bit photos white); alpha is dropped as transformers' ``convert_rgb`` does.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or data.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(data * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(
    path: Path,
    *,
    target_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_pixels: int | None = None,
    fd: int | None = None,
    video_frames: frames.FrameCache | None = None,
) -> Image.Image:
    """Decode ``path`` into an EXIF-oriented 8-bit RGB image (first frame of animations).

    ``target_size`` (height, width) is the model input size; large JPEGs are draft-decoded down to no less than
    :data:`DRAFT_HEADROOM` times it. ``max_pixels`` bounds the image's own size; ``max_decoded_pixels``, when
    given, bounds what is actually decoded (a JPEG's draft-reduced size; other formats decode whole), which
    bounds the memory a decode takes. ``fd``: read from this open descriptor (the caller's, left open; its
    position is not used) instead of opening ``path``, which then only names the file in messages. The file is
    opened once, without blocking, and must be a regular file. Raises ImageError (one line, naming the file) for
    missing, empty, truncated, unsupported or too large files and for a FIFO or device where a photo was. A
    video (MP4/MOV by content, other containers FFmpeg opens by suffix) gives its representative frame, upright
    (:mod:`capwatch.models.frames`), through ``video_frames`` when given (the caller's cache of decoded frames).
    """
    if _is_video(path, fd):
        return frames.representative_image(path, fd=fd, cache=video_frames)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's global warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            handle = _handle(path, fd)
            with handle:
                img, raw_orientation = _open_source(path, handle)
                with img:
                    width, height = img.size
                    if width * height > max_pixels:
                        raise ImageError(
                            f"{path}: image too large ({width}x{height} = {width * height / 1e6:.0f} MP, "
                            f"limit {max_pixels / 1e6:.0f} MP)"
                        )
                    if width == 0 or height == 0:
                        raise ImageError(f"{path}: image has no pixels")
                    if getattr(img, "is_animated", False):
                        img.seek(0)
                    if img.format == "JPEG" and target_size is not None:
                        _draft(img, target_size)
                    decoded = img.size[0] * img.size[1]
                    if max_decoded_pixels is not None and decoded > max_decoded_pixels:
                        raise ImageError(
                            f"{path}: image too large to decode here ({img.size[0]}x{img.size[1]} = "
                            f"{decoded / 1e6:.0f} MP at full scale, limit {max_decoded_pixels / 1e6:.0f} MP; "
                            "only JPEGs are decoded reduced)"
                        )
                    img.load()
                    oriented = _orient(img) if raw_orientation is None else _transpose(img, raw_orientation)
                    return oriented if oriented.mode == "RGB" else to_rgb(oriented)
    except ImageError:
        raise
    except NotRegularFile as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except UnidentifiedImageError:
        size = _size_or_none(path)
        if size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)") from None
        raise ImageError(f"{path}: not an image, or a format this installation cannot decode") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: image too large (refused as a possible decompression bomb: {exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot decode image: {reason}") from None


def _draft(img: Image.Image, target_size: tuple[int, int]) -> None:
    want_h, want_w = (DRAFT_HEADROOM * s for s in target_size)
    width, height = img.size
    # EXIF orientation may swap axes later; requesting the larger side on both keeps the headroom either way.
    side = max(want_h, want_w)
    if width >= 2 * side and height >= 2 * side:
        img.draft("RGB", (side, side))


_TRANSPOSE = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


@functools.cache
def _register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (and AVIF where Pillow lacks it) through pillow-heif, once per process."""
    try:
        import pillow_heif  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _handle(path: Path, fd: int | None) -> BinaryIO:
    """A binary file object over ``fd`` (a duplicate: the caller keeps its own) or over ``path`` opened with
    :func:`capwatch.metadata.safeopen.open_file`. Raises OSError (NotRegularFile for a FIFO or device)."""
    if fd is None:
        return open_binary(path)
    handle = os.fdopen(os.dup(fd), "rb")
    handle.seek(0)
    return handle


def _open_source(path: Path, handle: BinaryIO) -> tuple[Image.Image, int | None]:
    """Open the file ``handle`` (``path`` names it) for decoding; camera RAW opens its embedded JPEG preview.

    Returns the image and, for RAW previews, the orientation from the RAW's IFD0 (the preview JPEG usually has no
    EXIF of its own). Raises ImageError for a RAW without a usable preview, OSError and Pillow's errors otherwise.
    """
    head = handle.read(HEAD_SIZE)
    handle.seek(0)
    kind = detect_format(head, path.suffix)
    if kind == "raw":
        preview = extract_preview(handle.read())
        if preview is None:
            raise ImageError(f"{path}: camera RAW without an embedded JPEG preview that capwatch can decode")
        image = Image.open(io.BytesIO(preview.data))
        own = image.getexif().get(0x0112)
        return image, None if own not in (None, 1) else preview.orientation
    if kind in ("heif", "avif"):
        _register_heif()
    return Image.open(handle), None


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    for method in _TRANSPOSE.get(orientation, []):
        img = img.transpose(method)
    return img


def _orient(img: Image.Image) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(img)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        return img  # unreadable EXIF: caption the pixels as stored rather than fail the image
    return oriented if oriented is not None else img


def _is_video(path: Path, fd: int | None = None) -> bool:
    if fd is not None:
        # The caller's descriptor (a regular file it opened beneath its root): its first bytes, position untouched.
        try:
            return frames.is_video(path, os.pread(fd, HEAD_SIZE, 0))
        except OSError:
            return False
    # Opened without blocking: a FIFO named like a photo must not hang the look at its first bytes.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # load_image reports it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, HEAD_SIZE)
    except OSError:
        return False
    finally:
        os.close(fd)
    return frames.is_video(path, head)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
