"""What travels between the coordinator and the Dask workers of ``scan --cluster``: the model request, a batch's
result, a video's other frames, and the errors both sides raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capwatch import __version__
from capwatch.config import EmbedConfig, ModelConfig, OcrConfig
from capwatch.errors import CapwatchError, ImageError
from capwatch.models.captioner import DescribeOptions

if TYPE_CHECKING:
    from capwatch.library.outcomes import Described

#: The name the worker plugin is registered under (one model per worker at a time).
PLUGIN_NAME = "capwatch-captioner"


class ClusterError(CapwatchError):
    """The cluster cannot be used for this scan: no scheduler at the address, no worker, a worker refused the
    model. Nothing was written."""


class ClusterLost(CapwatchError):
    """The scheduler went away mid-run, or every worker did: what was written is complete, the rest is left for the
    next run."""

    exit_code = 1


@dataclass(frozen=True)
class ModelRequest:
    """The model the coordinator captions with, as every worker must have it: its ``[model]`` section and what it
    resolved to there (repository id, pinned revision, precision key), plus capwatch's version."""

    model: ModelConfig
    model_id: str
    revision: str | None
    precision: str
    version: str = __version__
    #: What the workers produce besides the caption (keywords, Florence's text), as the coordinator's config
    #: says; None: the caption alone.
    options: DescribeOptions | None = None
    #: The coordinator's image embedder: its ``[embed]`` section and the model id it resolved to (workers embed
    #: every image they caption, from the same decode, with the same model); None: no embeddings.
    embed: tuple[EmbedConfig, str] | None = None
    #: The coordinator's OCR engine beside the model (``[ocr] engine = "rapidocr"``): workers read the text in the
    #: images they caption (a video's in each of its chosen frames), so the coordinator decodes nothing and opens
    #: no engine; None: no such engine.
    ocr: OcrConfig | None = None

    def describe(self) -> str:
        return f"{self.model_id} at revision {self.revision or '(unknown)'} ({self.precision})"


@dataclass(frozen=True)
class BatchResult:
    """What one worker made of one batch: per image the caption text or why the image could not be decoded, and
    (when asked for) the keywords and the text read in it."""

    worker: str
    seconds: float
    texts: tuple[str | None, ...]
    errors: tuple[str | None, ...]
    keywords: tuple[tuple[str, ...] | None, ...] = ()
    found_text: tuple[str | None, ...] = ()
    #: Per image its embedding (float32 bytes) when the request asked for them; empty otherwise.
    vectors: tuple[bytes | None, ...] = ()
    #: Per image whether the worker's OCR engine read its text (``found_text``; None there: it failed, said in
    #: ``text_errors``); empty: no OCR on the worker.
    text_read: tuple[bool, ...] = ()
    text_errors: tuple[str | None, ...] = ()
    #: Per image, for a video sent with its other frames (:class:`SentFrames`): the representative frame's time
    #: and (seconds, float32 bytes) of each other frame embedded; None for a photo. Empty without embeddings.
    moments: tuple[tuple[float, tuple[tuple[float, bytes], ...]] | None, ...] = ()
    #: What the worker's captions were made with (its Captioner.precision_used, e.g. a static int8 image encoder
    #: where that passed its probe there): recorded in each file's provenance. "": not said.
    precision: str = ""

    def video_moments(self) -> list[Any] | None:
        """Per image its VideoMoments (capwatch.library.moments) or None, or None when none were made."""
        if not self.moments:
            return None
        import numpy as np

        from capwatch.library.moments import VideoMoments

        return [None if m is None else VideoMoments(m[0], tuple((at, np.frombuffer(v, dtype=np.float32))
                                                                for at, v in m[1]))
                for m in self.moments]

    def embeddings(self) -> list[Any] | None:
        """Per image its embedding (numpy float32) or None, or None when no embeddings were made."""
        if not self.vectors:
            return None
        import numpy as np

        return [None if v is None else np.frombuffer(v, dtype=np.float32) for v in self.vectors]

    def described(self) -> list[Described | ImageError]:
        """Per image what :meth:`capwatch.library.process.Processor.complete` takes."""
        from capwatch.library.outcomes import Described

        keywords = self.keywords or (None,) * len(self.texts)
        found = self.found_text or (None,) * len(self.texts)
        return [ImageError(error) if error is not None else Described(text or "", words, seen)
                for text, error, words, seen in zip(self.texts, self.errors, keywords, found, strict=True)]


#: What a video's frame is sent as: the file name it is decoded under on the worker (the suffix picks the decoder).
FRAME_SUFFIX = "#frame.png"


@dataclass(frozen=True)
class SentFrames:
    """A video's chosen frames other than the representative one (which travels as the batch item itself), as
    (seconds, lossless PNG) each, and the representative frame's time: the worker merges their keywords and text
    and embeds them, as a local scan does."""

    poster_at: float
    frames: tuple[tuple[float, bytes], ...]
