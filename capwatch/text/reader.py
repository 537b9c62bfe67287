"""The OCR interface, image loading for it, and the choice of engine from the configuration."""

from __future__ import annotations

import abc
import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from capwatch.config import Config
from capwatch.errors import ImageError
from capwatch.metadata.safeopen import NotRegularFile, open_binary
from capwatch.models.captioner import Captioner
from capwatch.models.preprocess import load_image, to_rgb

#: Images at least this small on either side hold no legible text: read as "" without running a model.
MIN_SIDE = 8


def fitted_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``size`` (width, height) scaled down, aspect kept, to at most ``max_pixels`` pixels (unchanged if it fits)."""
    width, height = size
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    # A side that would round to nothing keeps one pixel; the other side then gives up the difference.
    w = max(1, math.floor(width * scale))
    h = max(1, min(math.floor(height * scale), max_pixels // w))
    return min(w, max(1, max_pixels // h)), h


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` as RGB with at most ``max_pixels`` pixels (scaled down with a box prefilter when larger)."""
    rgb = image if image.mode == "RGB" else to_rgb(image)
    target = fitted_size(rgb.size, max_pixels)
    if target == rgb.size:
        return rgb
    return rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)


def load_for_text(path: Path, max_pixels: int) -> Image.Image:
    """Decode ``path`` for OCR: EXIF-oriented RGB of at most ``max_pixels`` pixels.

    JPEGs are decoded in Pillow's draft mode at the smallest DCT scale still at least the fitted size (a 50 MP
    panorama is never held at full size); other formats (PNG, WebP, HEIC, camera RAW previews, ...) decode as the
    captioner decodes them. Raises ImageError (one line, naming the file) when the file cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            # Draft decoding keeps memory bounded; Pillow's bomb warning is about full decodes.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # One non-blocking open of a regular file: a FIFO or device swapped in is one line, never a hang.
            with open_binary(path) as handle, Image.open(handle) as img:
                if img.format == "JPEG" and img.size[0] * img.size[1] > 0:
                    img.draft("RGB", fitted_size(img.size, max_pixels))
                    img.load()
                    return fit_pixels(ImageOps.exif_transpose(img), max_pixels)
    except NotRegularFile as exc:
        raise ImageError(f"{path}: {exc.strerror}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError):
        pass  # not a JPEG Pillow opens directly: the general decoder below knows more formats and says why
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if not isinstance(exc, (FileNotFoundError, IsADirectoryError)):
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ImageError(f"{path}: cannot decode image: {reason}") from None
    return fit_pixels(load_image(path), max_pixels)


class TextReader(abc.ABC):
    """Reads the text in an image. One instance per process; not thread-safe (one worker thread reads)."""

    #: The engine's name as ``[ocr] engine`` spells it.
    name: str

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def read(self, image: Image.Image) -> str:
        """The text in ``image`` (already oriented), lines joined by newlines; "" when there is none or the image is
        too small to hold any. Larger images are scaled to ``max_pixels`` first. Raises ImageError (one line) when
        the engine fails on this image."""
        if min(image.size) < MIN_SIDE:
            return ""
        return self._read(fit_pixels(image, self.max_pixels))

    def read_file(self, path: Path) -> str:
        """The text in the image file ``path`` (see :func:`load_for_text` and :meth:`read`). Raises ImageError."""
        return self.read(load_for_text(path, self.max_pixels))

    @abc.abstractmethod
    def _read(self, image: Image.Image) -> str:
        """The engine's reading of an RGB image within the size limits."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine's models (a later read loads them again)."""


def open_text_reader(config: Config, *, captioner: Captioner | None = None) -> TextReader | None:
    """The reader ``config.ocr.engine`` names, None for "off".

    ``rapidocr`` runs with ``config.model.threads`` onnxruntime threads (0: one per physical core); ``florence`` reads
    with ``captioner``, which must be a Florence-2 captioner. Raises ConfigError (one line) when the engine's extra
    is not installed or ``florence`` has no Florence-2 model.
    """
    engine = config.ocr.engine
    if engine == "off":
        return None
    if engine == "rapidocr":
        from capwatch.text.rapid import RapidOcrReader

        return RapidOcrReader(threads=config.model.threads, max_pixels=config.ocr.max_pixels)
    from capwatch.text.florence import FlorenceTextReader

    return FlorenceTextReader(captioner, max_pixels=config.ocr.max_pixels)

