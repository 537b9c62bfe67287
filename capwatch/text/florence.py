"""The ``florence`` engine: Florence-2's ``<OCR>`` task, cleaned as transformers' post-processor does.

In the captioning pass, ask the captioner for the text directly (``DescribeOptions(text=True)``): the vision
encoder's features are then shared with the caption. This reader is for reading text alone (it runs the vision
encoder itself).
"""

from __future__ import annotations

from PIL import Image

from capwatch.errors import ConfigError
from capwatch.models.captioner import Captioner, DescribeOptions
from capwatch.text.reader import TextReader

_READ_ONLY_TEXT = DescribeOptions(caption=False, keywords=False, text=True)


class FlorenceTextReader(TextReader):
    """Reads text with a Florence-2 captioner's ``<OCR>`` task."""

    name = "florence"

    def __init__(self, captioner: Captioner | None, *, max_pixels: int = 4_000_000) -> None:
        """Raises ConfigError (one line) when ``captioner`` is not a Florence-2 captioner."""
        super().__init__(max_pixels)
        from capwatch.models.florence2 import Florence2Captioner

        if not isinstance(captioner, Florence2Captioner):
            model = f"model {captioner.model_id!r}" if captioner is not None else "no model"
            raise ConfigError(f'ocr.engine = "florence" needs a Florence-2 model ({model} cannot read text); '
                              'use engine = "rapidocr" or "off"')
        self.captioner = captioner

    def _read(self, image: Image.Image) -> str:
        text = self.captioner.describe_batch([image], _READ_ONLY_TEXT)[0].text
        return text or ""

    def close(self) -> None:
        """Nothing of its own to release: the captioner (shared with captioning) unloads itself when idle."""
