"""The ``rapidocr`` engine: PP-OCR text detection, angle classification and recognition on onnxruntime.

The PyPI package ``rapidocr`` (Apache-2.0; extra ``capwatch[ocr]``) ships its default models in the wheel
(``rapidocr/models/``: PP-OCRv6 detection and recognition, the PP-OCR angle classifier), so it runs offline right
after install. It downloads only models its configuration names but lacks; :func:`shipped_models` checks that the
configured ones are the files in the wheel and points at them explicitly, so a different default in a later release
fails at start with one line instead of reaching for the network.

Cost: the detector runs once per image; the classifier and recogniser run once per detected line, so a photo without
text costs the detector pass only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from capwatch.errors import ConfigError, ImageError
from capwatch.models.session import physical_cores
from capwatch.paths import install_hint
from capwatch.text.reader import TextReader

_EXTRA_HINT = f"ocr.engine = \"rapidocr\" needs the ocr extra: {install_hint('ocr')}"
#: Lines read with less confidence than this are dropped (rapidocr's own default).
MIN_SCORE = 0.5
#: A line of a single character must be read at least this surely: texture (a cat's eye, a cup's rim) is often read
#: as one digit or letter with a middling score, while a real lone character ("7" on a jersey) reads clearly.
MIN_SCORE_SINGLE = 0.9
#: Longest side the detector works at (rapidocr's default): larger inputs are scaled to it by rapidocr.
MAX_SIDE = 2000


def shipped_models(package_dir: Path) -> dict[str, Path]:
    """The detection, classification and recognition ONNX files in the installed wheel, by stage.

    Raises ConfigError (one line) when one is missing: this installation would need a download.
    """
    models = package_dir / "models"
    found = {
        "Det": sorted(models.glob("*_det_*.onnx")),
        "Cls": sorted(models.glob("*_cls_*.onnx")),
        "Rec": sorted(models.glob("*_rec_*.onnx")),
    }
    missing = [stage for stage, files in found.items() if not files]
    if missing:
        raise ConfigError(f"rapidocr: no {missing[0].lower()} model in {models} (a download would be needed; "
                          f"reinstall with {install_hint('ocr')})")
    return {stage: files[-1] for stage, files in found.items()}


def keep_lines(texts: Sequence[str], scores: Sequence[float]) -> list[str]:
    """The recognised lines worth keeping, stripped: lines without a letter or digit go (nothing to search for),
    and a line of a single letter or digit stays only with a score of at least :data:`MIN_SCORE_SINGLE`."""
    kept = []
    for text, score in zip(texts, scores, strict=False):
        line = text.strip()
        alnum = sum(c.isalnum() for c in line)
        if alnum == 0 or (alnum == 1 and score < MIN_SCORE_SINGLE):
            continue
        kept.append(line)
    return kept


class RapidOcrReader(TextReader):
    """Reads text with rapidocr (see the module docstring)."""

    name = "rapidocr"

    def __init__(self, *, threads: int = 0, max_pixels: int = 4_000_000) -> None:
        """Prepare the engine (its models load on the first read).

        ``threads``: onnxruntime intra-op threads per model, 0 = one per physical core (as ``[model] threads``).
        Raises ConfigError (one line) when rapidocr is not installed or its wheel lacks its models.
        """
        super().__init__(max_pixels)
        try:
            import rapidocr
        except ImportError:
            raise ConfigError(_EXTRA_HINT) from None
        self.threads = threads if threads > 0 else physical_cores()
        paths = shipped_models(Path(rapidocr.__file__).parent)
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.text_score": MIN_SCORE,
            "Global.max_side_len": MAX_SIDE,
            "EngineConfig.onnxruntime.intra_op_num_threads": self.threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        for stage, path in paths.items():
            params[f"{stage}.model_path"] = str(path)
        self._params = params
        self._factory: Any = rapidocr.RapidOCR
        self._engine: Any = None
        # rapidocr logs through its own logger at INFO on import/first use; capwatch's log stays readable.
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    def _loaded(self) -> Any:
        if self._engine is None:
            self._engine = self._factory(params=self._params)
        return self._engine

    def _read(self, image: Image.Image) -> str:
        """Recognised lines, top to bottom as rapidocr orders them, joined by newlines."""
        pixels = np.asarray(image)
        try:
            result = self._loaded()(pixels)
        except Exception as exc:  # onnxruntime/OpenCV raise their own types; one image's failure stays one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ImageError(f"OCR failed: {first}") from None
        texts = getattr(result, "txts", None) or ()
        scores = getattr(result, "scores", None) or (1.0,) * len(texts)
        return "\n".join(keep_lines(texts, scores))

    def close(self) -> None:
        # rapidocr holds its sessions on the engine object; the next read makes a new one.
        self._engine = None
