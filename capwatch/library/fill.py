"""Fill in what the index lacks for the current settings, without captioning again.

A setting switched on after a first scan (``[ocr] engine``, ``[model] keywords``) reaches files already captioned,
and files whose description is a person's (which are never captioned), only through this step: for each indexed
row it asks what the current settings would have produced for it and the row does not have (:func:`lacking`), then
produces just that (:class:`Filler`) and records it in the index beside what the row holds. Captions are never
made again here and nothing is written into a file, so a person's words are never touched. A row remembers what
was looked for (``ImageRecord.filled``), found or not, so an image without text is not read on every scan; a file
that changes is read afresh and its marks go with what it no longer holds.

One more kind of thing a scan fills in is one more entry in :data:`FILLABLE` with its test in :func:`lacking` and
its producer in :meth:`Filler.fill`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from capwatch.config import Config
from capwatch.errors import ImageError, ModelError
from capwatch.library.index import ImageRecord, Index
from capwatch.library.scan import FILLED_KEYWORDS, FILLED_TEXT, with_filled, with_index_only_keywords
from capwatch.library.videos import is_video, merge_keywords, merge_text

if TYPE_CHECKING:
    from PIL import Image

    from capwatch.models.captioner import Captioner
    from capwatch.models.frames import FrameCache
    from capwatch.text import TextReader

log = logging.getLogger(__name__)

#: Everything a scan fills in, in the order it is produced.
FILLABLE = (FILLED_TEXT, FILLED_KEYWORDS)


def wanted(config: Config, *, detects_objects: bool | None = None) -> frozenset[str]:
    """What the current settings produce for every image besides its caption: the text in the image when an OCR
    engine is on, the model's keywords when ``[model] keywords`` is on and the model has an object detector
    (``detects_objects``; None while the model is not open: assumed, so that the caller opens it only then)."""
    out = set()
    if config.ocr.engine != "off":
        out.add(FILLED_TEXT)
    if config.model.keywords and config.metadata.max_keywords > 0 and detects_objects is not False:
        out.add(FILLED_KEYWORDS)
    return frozenset(out)


def lacking(record: ImageRecord, want: frozenset[str]) -> frozenset[str]:
    """What of ``want`` the row ``record`` lacks and a scan should fill in.

    Only rows that are done (captioned, or described by a person) are filled in: a pending file gets everything
    when it is captioned, a failed one when it is retried. Text is lacking unless it was looked for or the row has
    some (the file's own ``capwatch:Text``); keywords are lacking for a row with a model's caption (in the file,
    or beside a person's in the index) unless they were looked for or the row has capwatch's keywords: the model
    does not run for a person's description alone.
    """
    if record.status not in ("captioned", "described"):
        return frozenset()
    out = set()
    if FILLED_TEXT in want and FILLED_TEXT not in record.filled and record.ocr_text is None:
        out.add(FILLED_TEXT)
    if (FILLED_KEYWORDS in want and FILLED_KEYWORDS not in record.filled and not record.model_keywords
            and (record.source == "model" or record.model_caption)):
        out.add(FILLED_KEYWORDS)
    return frozenset(out)


@dataclass(frozen=True)
class FillResult:
    """What :meth:`Filler.fill` did: rows completed (per kind of thing, and in all), and the files it could not
    read (path, one-line reason; their rows stay as they were and are tried again by the next scan)."""

    rows: int = 0
    by_kind: tuple[tuple[str, int], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()


class Filler:
    """Produces what rows lack, with the configured OCR engine and (for keywords, and Florence's text) the model.

    ``open_captioner`` is called at most once, and only when a row needs the model. Close it with :meth:`close`.
    """

    def __init__(self, config: Config, index: Index, open_captioner: Callable[[], Captioner]) -> None:
        self.config = config
        self.index = index
        self._open_captioner = open_captioner
        self._captioner: Captioner | None = None
        self._reader: TextReader | None = None
        self._reader_open = False
        self._frames: FrameCache | None = None

    def close(self) -> None:
        """Release the OCR engine and the model, when they were opened."""
        if self._reader is not None:
            self._reader.close()
        if self._captioner is not None:
            self._captioner.close()

    def _model(self) -> Captioner:
        if self._captioner is None:
            self._captioner = self._open_captioner()
        return self._captioner

    def _text_reader(self) -> TextReader | None:
        if not self._reader_open:
            from capwatch.text import open_text_reader

            self._reader_open = True
            captioner = self._model() if self.config.ocr.engine == "florence" else None
            self._reader = open_text_reader(self.config, captioner=captioner)
        return self._reader

    def todo(self, records: Iterable[ImageRecord]) -> list[tuple[ImageRecord, frozenset[str]]]:
        """The rows of ``records`` that lack something, with what they lack (the model is opened to learn
        whether it detects objects only when some row would need its keywords)."""
        want = wanted(self.config)
        rows = [(r, lacking(r, want)) for r in records]
        rows = [(r, what) for r, what in rows if what]
        if any(FILLED_KEYWORDS in what for _, what in rows) and not self._detects_objects():
            rows = [(r, what - {FILLED_KEYWORDS}) for r, what in rows]
            rows = [(r, what) for r, what in rows if what]
        return rows

    def _detects_objects(self) -> bool:
        """Whether the model gives keywords; False (said once in the log) when it cannot be opened now: the
        keywords are then filled in by a later scan, and the text still is now."""
        try:
            return self._model().detects_objects
        except ModelError as exc:
            log.warning("keywords not filled in this time: %s", exc)
            return False

    def fill(self, rows: Sequence[tuple[ImageRecord, frozenset[str]]],
             progress: Callable[[int], None] | None = None) -> FillResult:
        """Produce what each row lacks and record it, a row at a time (each only while its file is still what the
        row describes). Raises ModelError when the model is needed and cannot run, IndexUnavailable when the index
        cannot be written; never for a single file."""
        counts = dict.fromkeys(FILLABLE, 0)
        failed: list[tuple[str, str]] = []
        done = 0
        for position, (record, what) in enumerate(rows, 1):
            try:
                updated: ImageRecord | None = self._fill_one(record, what)
            except ImageError as exc:
                if _unchanged(record):  # a file that changed meanwhile is read afresh by the next scan
                    message = str(exc) if str(exc).startswith(record.path) else f"{record.path}: {exc}"
                    failed.append((record.path, message))
                updated = None
            except OSError as exc:
                if _unchanged(record):  # gone or changed meanwhile: the next scan reads it afresh
                    failed.append((record.path, f"{record.path}: {exc.strerror or exc}"))
                updated = None
            if updated is not None and _unchanged(record):
                self.index.upsert(updated)
                done += 1
                for kind in what:
                    counts[kind] += 1
            if progress is not None:
                progress(position)
        return FillResult(rows=done, by_kind=tuple((k, n) for k, n in counts.items() if n), failed=tuple(failed))

    def _video_frames(self, path: Path) -> list[Image.Image] | None:
        """A video's chosen frames (the representative one first), decoded once for keywords and text; None for
        a photo. Raises ImageError."""
        if not is_video(path):
            return None
        if self._frames is None:
            from capwatch.models.frames import FrameCache

            self._frames = FrameCache()
        return [f.image for f in self._frames.get(path).chosen]

    def _fill_one(self, record: ImageRecord, what: frozenset[str]) -> ImageRecord:
        path = Path(record.path)
        updated = record
        # A video's keywords and text come from each of its chosen frames, merged, as when it is captioned.
        frames = self._video_frames(path) if what else None
        if FILLED_KEYWORDS in what:
            import numpy as np

            from capwatch.models.captioner import DescribeOptions

            captioner = self._model()
            options = DescribeOptions(caption=False, keywords=True, max_keywords=self.config.metadata.max_keywords,
                                      text=FILLED_TEXT in what and self.config.ocr.engine == "florence")
            if frames is None:
                [said] = captioner.describe_pixels(captioner.preprocess_file(path)[None], options)
                keywords, text = said.keywords, said.text
            else:
                pixels = np.stack([captioner.preprocess_image(f) for f in frames])
                # Sizes as the caption path gives them: the representative frame's is its model input's.
                sizes = [(pixels.shape[3], pixels.shape[2]), *(f.size for f in frames[1:])]
                made = captioner.describe_pixels(pixels, options, image_sizes=sizes)
                keywords = merge_keywords(made[0].keywords, [d.keywords for d in made[1:]],
                                          options.max_keywords) or ()
                text = merge_text([d.text for d in made]) if options.text else None
            # Searchable beside what the file holds; they go into the file with its next caption.
            updated = with_filled(with_index_only_keywords(updated, keywords), FILLED_KEYWORDS)
            if text is not None:
                updated = with_filled(replace(updated, ocr_text=text), FILLED_TEXT)
        if FILLED_TEXT in what and FILLED_TEXT not in updated.filled:
            reader = self._text_reader()
            if reader is not None:
                text = reader.read_file(path) if frames is None else merge_text([reader.read(f) for f in frames])
                updated = with_filled(replace(updated, ocr_text=text), FILLED_TEXT)
        return updated


def _unchanged(record: ImageRecord) -> bool:
    """True when the file is still in the state ``record`` was made from (else the next scan reads it afresh)."""
    try:
        st = os.stat(record.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (record.size, record.mtime_ns) and \
        (record.ctime_ns is None or st.st_ctime_ns == record.ctime_ns)
