"""Video -> the frames worth captioning (PyAV, extra ``capwatch[video]``; its wheels bundle FFmpeg).

A video is sampled at :data:`SAMPLES` moments spread over its duration: each is a seek to the keyframe at or before
that moment (cheap: no decoding of the frames in between) and the decode of that one frame, scaled down to at most
:data:`MAX_SIDE` pixels on its longer side by FFmpeg's scaler (10-bit and HDR sources are converted to 8-bit RGB
there), then turned upright by the stream's display matrix (the rotation phones record).

Frames that show nothing are dropped: *black* (mean luma under :data:`BLACK_LUMA`, e.g. the fade-in that makes
other tools see every video as the same), *flat* (luma standard deviation under :data:`FLAT_STD`: a title card in
one colour, a lens cap) and *blurred* (variance of the Laplacian under :data:`BLUR_RATIO` of the clip's median: motion
blur relative to the clip itself, so a soft but steady clip keeps its frames).

The *representative* frame is the medoid of the frames kept: the one whose small colour layout (an 8x8 RGB
thumbnail) and colour histogram are closest, summed over all others, to the rest of the clip, i.e. the frame that
looks most like the video as a whole rather than its first or a random moment. The caption is made from it;
keywords and text are gathered from :data:`EXTRA` more frames, those farthest from it (what the representative
frame does not show). ``VideoFrames.chosen`` lists every frame used with its time in seconds: the place where
embeddings of several moments attach (search by meaning).
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from capwatch.errors import ImageError
from capwatch.metadata.formats import VIDEO_FORMATS, detect_format, is_video_name
from capwatch.metadata.safeopen import NotRegularFile, open_binary

#: Moments sampled over the duration.
SAMPLES = 8
#: Frames described besides the representative one (their keywords and text are merged in).
EXTRA = 2
#: Longer side of a decoded frame (Florence-2 takes 768x768; thumbnails 512).
MAX_SIDE = 1024
BLACK_LUMA = 16.0
FLAT_STD = 6.0
BLUR_RATIO = 0.2
#: Side of the grey image the quality measures run on.
_MEASURE_SIDE = 256



@dataclass(frozen=True)
class Frame:
    """One decoded frame: when it is shown (seconds from the start), the upright RGB image and its measures."""

    at: float
    image: Image.Image
    luma: float
    contrast: float
    sharpness: float

    @property
    def usable(self) -> bool:
        return self.luma >= BLACK_LUMA and self.contrast >= FLAT_STD


@dataclass(frozen=True)
class VideoFrames:
    """The frames chosen from one video: ``chosen[0]`` is the representative one (captioned), the rest add keywords
    and text. ``duration`` in seconds (None when the container does not say); ``sampled``: frames decoded."""

    chosen: tuple[Frame, ...]
    duration: float | None
    sampled: int
    rejected: tuple[tuple[float, str], ...] = ()

    @property
    def representative(self) -> Frame:
        return self.chosen[0]


def _av() -> Any:
    try:
        import av
    except ImportError:
        return None
    return av


def is_video(path: Path, head: bytes | None = None) -> bool:
    """True when ``path`` is a video by its content (MP4/MOV) or, for the other containers FFmpeg opens, its
    suffix."""
    if head is not None and detect_format(head, path.suffix) in VIDEO_FORMATS:
        return True
    return is_video_name(path.name)


def choose_frames(path: Path, *, samples: int = SAMPLES, extra: int = EXTRA, fd: int | None = None) -> VideoFrames:
    """Decode ``samples`` moments of the video at ``path`` and choose the representative frame and ``extra``
    others (see the module docstring). ``fd``: decode from this open descriptor (the caller's, left open) instead
    of opening ``path``, which then only names the file in messages. Raises ImageError (one line, naming the
    file) when PyAV is missing or the file cannot be decoded or has no video stream."""
    frames, duration = sample_frames(path, samples, fd=fd)
    return choose(frames, extra=extra, duration=duration)


def choose(frames: list[Frame], *, extra: int = EXTRA, duration: float | None = None) -> VideoFrames:
    """The choice of :func:`choose_frames` among decoded ``frames`` (not empty)."""
    rejected: list[tuple[float, str]] = []
    visible = [f for f in frames if f.usable]
    # The median, not the sharpest: one frame of noise or confetti would make every other frame look blurred.
    typical = float(np.median([f.sharpness for f in visible])) if visible else 0.0
    kept: list[Frame] = []
    for frame in frames:
        if frame.luma < BLACK_LUMA:
            rejected.append((frame.at, "black"))
        elif frame.contrast < FLAT_STD:
            rejected.append((frame.at, "flat"))
        elif typical > 0 and frame.sharpness < BLUR_RATIO * typical:
            rejected.append((frame.at, "blurred"))
        else:
            kept.append(frame)
    if not kept:
        # Nothing passes (a dark clip): the frame with the most to see.
        kept = [max(frames, key=lambda f: (f.contrast * (1 + f.sharpness), f.luma))]
    features = np.stack([_features(f.image) for f in kept])
    distances = np.sqrt(((features[:, None, :] - features[None, :, :]) ** 2).sum(axis=2))
    medoid = int(np.argmin(distances.sum(axis=1)))
    others = sorted((i for i in range(len(kept)) if i != medoid), key=lambda i: -distances[medoid, i])[:extra]
    chosen = (kept[medoid], *sorted((kept[i] for i in others), key=lambda f: f.at))
    return VideoFrames(chosen, duration, len(frames), tuple(rejected))


def _features(image: Image.Image) -> np.ndarray:
    """Colour layout (8x8 RGB) and a 3x16-bin histogram, both scaled to 0..1."""
    small = np.asarray(image.resize((8, 8), Image.Resampling.BOX), dtype=np.float32).reshape(-1) / 255.0
    pixels = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.uint8).reshape(-1, 3)
    hist = np.concatenate([np.bincount(pixels[:, c] >> 4, minlength=16) for c in range(3)]).astype(np.float32)
    return np.concatenate([small, hist / max(1.0, float(pixels.shape[0])) * 4.0])


def measure(image: Image.Image) -> tuple[float, float, float]:
    """(mean luma, luma standard deviation, variance of the Laplacian) on a grey copy at most 256 px wide."""
    grey = image.convert("L")
    if max(grey.size) > _MEASURE_SIDE:
        grey.thumbnail((_MEASURE_SIDE, _MEASURE_SIDE), Image.Resampling.BILINEAR)
    g = np.asarray(grey, dtype=np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return float(g.mean()), float(g.std()), 0.0
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(g.mean()), float(g.std()), float(lap.var())


_UPRIGHT = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def _to_image(frame: Any) -> Image.Image:
    """An upright RGB image of a decoded frame, scaled by FFmpeg to at most MAX_SIDE."""
    width, height = frame.width, frame.height
    scale = min(1.0, MAX_SIDE / max(width, height, 1))
    w, h = max(2, round(width * scale)), max(2, round(height * scale))
    image: Image.Image = frame.reformat(width=w, height=h, format="rgb24").to_image()
    # The display matrix's rotation is counter-clockwise in degrees; PIL's ROTATE_* are counter-clockwise too.
    turn = round(float(getattr(frame, "rotation", 0) or 0)) % 360
    if turn in _UPRIGHT:
        image = image.transpose(_UPRIGHT[turn])
    return image


def sample_frames(path: Path, samples: int = SAMPLES, *, fd: int | None = None
                  ) -> tuple[list[Frame], float | None]:
    """The frames at ``samples`` moments spread over the video (one per keyframe found; at least one) and the
    duration in seconds (None when unknown). Raises ImageError."""
    av = _av()
    if av is None:
        raise ImageError(f"{path}: videos need PyAV: pip install 'capwatch[video]'")
    try:
        with open_regular_file(path, fd) as handle, av.open(handle, mode="r") as container:
            if not container.streams.video:
                raise ImageError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = _duration(container, stream)
            base = stream.time_base
            frames: list[Frame] = []
            seen: set[int] = set()
            moments = [duration * (i + 0.5) / samples for i in range(samples)] if duration else [0.0]
            for moment in moments:
                if duration and base:
                    container.seek(int(moment / base) + (stream.start_time or 0), stream=stream, backward=True,
                                   any_frame=False)
                frame = next(container.decode(stream), None)
                if frame is None or frame.pts is None or frame.pts in seen:
                    continue
                seen.add(frame.pts)
                image = _to_image(frame)
                at = float((frame.pts - (stream.start_time or 0)) * base) if base else 0.0
                frames.append(Frame(max(0.0, at), image, *measure(image)))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (av.error.FFmpegError, OSError, ValueError, StopIteration) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot decode video: {reason}") from None
    if not frames:
        raise ImageError(f"{path}: no frame could be decoded")
    return frames, duration


def open_regular_file(path: Path, given: int | None = None) -> BinaryIO:
    """``path`` opened for reading without blocking (a FIFO swapped in for a video opens at once) and kept only
    when it is a regular file (:func:`capwatch.metadata.safeopen.open_binary`); FFmpeg then reads from this
    descriptor, not from the name. ``given``: use a duplicate of this descriptor instead of opening ``path``.
    Raises ImageError for anything but a regular file, FileNotFoundError when it is gone, OSError otherwise."""
    if given is None:
        try:
            return open_binary(path)
        except NotRegularFile as exc:
            raise ImageError(f"{path}: {exc.strerror}") from None
    fd = os.dup(given)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration / 1_000_000)
    return None


class FrameCache:
    """The last few :func:`choose_frames` results, by file identity (device, inode, size, mtime, ctime): the caption,
    the keywords of the other frames, the OCR and the embeddings of the same video decode it once. Made by whoever
    processes files (a Processor, a cluster coordinator) and passed to what decodes them. Thread-safe."""

    def __init__(self, entries: int = 4) -> None:
        self._entries = entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, ...], VideoFrames] = OrderedDict()
        #: Videos decoded through this cache (not found in it): what one decode per video is checked by.
        self.decoded = 0

    def get(self, path: Path, *, fd: int | None = None) -> VideoFrames:
        """:func:`choose_frames` of ``path`` (or of the open descriptor ``fd``, which ``path`` then only names),
        reused while the file is unchanged. Raises ImageError."""
        try:
            st = os.fstat(fd) if fd is not None else os.stat(path)
        except FileNotFoundError:
            raise ImageError(f"{path}: file not found") from None
        except OSError as exc:
            raise ImageError(f"{path}: {exc.strerror or exc}") from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        chosen = choose_frames(path, fd=fd)
        with self._lock:
            self.decoded += 1
            self._cache[key] = chosen
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return chosen


def representative_image(path: Path, *, fd: int | None = None, cache: FrameCache | None = None) -> Image.Image:
    """The upright RGB image of the video's representative frame (what is captioned and shown as its poster),
    decoded from ``fd`` when given (``path`` then only names the file); through ``cache`` when given (the
    frames are then decoded once for everything done with this video), else decoded now. Raises ImageError."""
    chosen = cache.get(path, fd=fd) if cache is not None else choose_frames(path, fd=fd)
    return chosen.representative.image.copy()
