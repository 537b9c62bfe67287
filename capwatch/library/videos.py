"""Videos in the processing pipeline: the caption comes from the representative frame (which is what the captioner
decodes for a video, see :mod:`capwatch.models.frames`); keywords and text found in the other chosen frames are
merged in, so a video is described by more than its one best moment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from capwatch.errors import ImageError
from capwatch.metadata.formats import VIDEO_FORMATS, is_video_name

if TYPE_CHECKING:
    from PIL import Image

    from capwatch.library.outcomes import Described
    from capwatch.models.captioner import Captioner, DescribeOptions
    from capwatch.text.reader import TextReader


def is_video(path: str | Path, fmt: str | None = None) -> bool:
    """True for a video: MP4/MOV by content (``fmt``), other containers by suffix."""
    return fmt in VIDEO_FORMATS or is_video_name(Path(path).name)


def merge_keywords(first: tuple[str, ...] | None, more: list[tuple[str, ...] | None], limit: int
                   ) -> tuple[str, ...] | None:
    """``first`` (the representative frame's keywords, in their order) followed by the other frames' new ones
    (case-insensitively), at most ``limit``; None when no frame gave keywords (the model has no detector)."""
    lists = [k for k in (first, *more) if k is not None]
    if not lists:
        return None
    seen: set[str] = set()
    out: list[str] = []
    for keywords in lists:
        for keyword in keywords:
            if keyword.casefold() not in seen:
                seen.add(keyword.casefold())
                out.append(keyword)
    return tuple(out[:limit])


def merge_text(texts: list[str | None]) -> str | None:
    """The lines read in every frame, each once, in the order first seen; None when no frame was read."""
    read = [t for t in texts if t is not None]
    if not read:
        return None
    lines: list[str] = []
    for text in read:
        for line in text.splitlines():
            if line.strip() and line not in lines:
                lines.append(line)
    return "\n".join(lines)


def read_frames_text(text: str | None, frames: Sequence[Image.Image], text_reader: TextReader) -> str | None:
    """``text`` (what the model read in a video, or None) with the text ``text_reader`` reads in each of ``frames``
    (its chosen frames, the representative one first) merged in after it (see :func:`merge_text`): what a local scan
    and a cluster worker both record for a video. A frame the engine fails on adds nothing."""
    texts = [text]
    for frame in frames:
        try:
            texts.append(text_reader.read(frame))
        except ImageError:
            continue
    return merge_text(texts)


def describe_frames(chosen: Sequence[Image.Image], said: Described, captioner: Captioner, options: DescribeOptions,
                    text_reader: TextReader | None) -> Described:
    """``said`` (the description of ``chosen[0]``, a video's representative frame) with the keywords and text of
    its other chosen frames merged in: what a local scan and a cluster worker both do with a video's frames. Only
    what ``said`` already carries is gathered (keywords when the model detects objects, text when the model reads
    it, or ``text_reader``'s over every frame). Raises ModelError when the model cannot run."""
    import numpy as np

    wants_keywords = said.keywords is not None
    wants_model_text = options.text
    if not (wants_keywords or wants_model_text or text_reader is not None):
        return said
    others = chosen[1:]
    if not others:
        return said
    keywords: list[tuple[str, ...] | None] = []
    texts: list[str | None] = [said.text]
    if wants_keywords or wants_model_text:
        # No caption is wanted from these frames: only what they add.
        wanted = replace(options, caption=False, text=wants_model_text, keywords=wants_keywords)
        pixels = np.stack([captioner.preprocess_image(f) for f in others])
        for described in captioner.describe_pixels(pixels, wanted, image_sizes=[f.size for f in others]):
            keywords.append(described.keywords if wants_keywords else None)
            if wants_model_text:
                texts.append(described.text)
    if text_reader is not None:
        for frame in chosen:  # the representative frame too: the file-level OCR is skipped for a video
            try:
                texts.append(text_reader.read(frame))
            except ImageError:
                continue
    merged_keywords = merge_keywords(said.keywords, keywords, options.max_keywords) if wants_keywords else None
    merged_text = merge_text(texts) if (wants_model_text or text_reader is not None) else said.text
    return replace(said, keywords=merged_keywords, text=merged_text)
