"""Florence-2 task outputs parsed exactly as transformers' ``Florence2Processor.post_process_generation`` does.

The reference is transformers 4.57 ``models/florence2/processing_florence2.py``: the generated ids are decoded with
``skip_special_tokens=False`` and then

* ``<OD>`` ("description_with_bboxes"): ``<s>``, ``</s>``, ``<pad>`` removed; every run of text followed by four or
  more ``<loc_N>`` tokens is one phrase; its label is the text before the first location token, stripped and reduced
  to ASCII (``str.encode("ascii", "ignore")``); every complete group of four locations is one box, dequantized from
  1000 bins to the image size as ``int((bin + 0.5) * size / 1000)`` in float32 (as torch computes it);
* ``<OCR>`` ("pure_text"): ``<s>`` and ``</s>`` removed, surrounding whitespace stripped.

tools/florence_post_goldens.py runs transformers' own post-processor on a table of realistic outputs; the tests
compare these functions with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Location bins per axis (Florence2PostProcessor.quantize_bins).
BINS = 1000

_PHRASE_RE = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_LABEL_RE = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_MAX_BIN = 1_000_000
_BOX_RE = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")


@dataclass(frozen=True)
class Detection:
    """One detected object: its label and box (xmin, ymin, xmax, ymax) in pixels of the image size given."""

    label: str
    box: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        """The box's area in square pixels (0 for a degenerate box, whose max lies before its min)."""
        x0, y0, x1, y1 = self.box
        return max(0, x1 - x0) * max(0, y1 - y0)


def dequantize(bins: tuple[int, int, int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box of four location bins for an image of ``image_size`` (width, height), as transformers does it.

    transformers computes ``(bin + 0.5) * (size / 1000)`` on float32 tensors and truncates with ``.int()``; the same
    arithmetic in float32 here gives the same integers.
    """
    width, height = image_size
    per_bin = np.array([width / BINS, height / BINS, width / BINS, height / BINS], dtype=np.float32)
    values = (np.asarray(bins, dtype=np.float32) + np.float32(0.5)) * per_bin
    x0, y0, x1, y1 = (int(v) for v in values.astype(np.int32))
    return x0, y0, x1, y1


def parse_od(text: str, image_size: tuple[int, int]) -> list[Detection]:
    """Detections in the decoded ``<OD>`` output ``text`` (special tokens kept), in the order generated.

    ``image_size`` is (width, height) of the image the boxes are scaled to. A phrase without a label, or whose
    label is lost to the ASCII reduction, still yields boxes with an empty label, as transformers' does. Never
    raises for any text.
    """
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    detections: list[Detection] = []
    for phrase_text in _PHRASE_RE.findall(text):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        if not phrase_text:
            continue
        match = _LABEL_RE.search(phrase_text)
        if not match:
            continue
        label = match.group().strip().encode("ascii", "ignore").decode("ascii")
        for box in _BOX_RE.finditer(phrase_text):
            # Real vocabularies stop at <loc_999>; the cap only keeps absurd digits from overflowing float32.
            bins = tuple(min(int(box.group(i)), _MAX_BIN) for i in range(1, 5))
            assert len(bins) == 4
            detections.append(Detection(label, dequantize(bins, image_size)))
    return detections


def clean_pure_text(text: str) -> str:
    """The ``<OCR>`` answer in decoded output ``text``: ``<s>``/``</s>`` removed and the rest stripped."""
    return text.replace("<s>", "").replace("</s>", "").strip()
