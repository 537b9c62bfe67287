"""The worker side of ``scan --cluster``: the plugin that loads capwatch's model once per Dask worker, the task that
captions one batch of image bytes there, and the ``--preload capwatch.cluster`` hook."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click
from distributed import Worker, WorkerPlugin, get_worker

from capwatch import __version__
from capwatch.cluster.messages import (
    FRAME_SUFFIX,
    PLUGIN_NAME,
    BatchResult,
    ClusterError,
    ModelRequest,
    SentFrames,
)
from capwatch.config import Config, Provider
from capwatch.errors import CapwatchError, ImageError, ModelError
from capwatch.models.captioner import DescribeOptions

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder
    from capwatch.text.reader import TextReader

log = logging.getLogger(__name__)



#: A worker's own onnxruntime providers (``dask worker ... --preload capwatch.cluster --providers cuda,cpu`` sets it
#: in the worker's process); without it the worker uses the coordinator's ``[model] providers``.
PROVIDERS_ENV = "CAPWATCH_WORKER_PROVIDERS"


def parse_providers(text: str) -> tuple[Provider, ...]:
    """``cuda,cpu`` -> ("cuda", "cpu"). Raises ValueError (one line) for a name capwatch does not know."""
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    known = get_args(Provider)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown onnxruntime provider {name!r} (known: {', '.join(known)})")
    return names  # type: ignore[return-value]


def open_worker_captioner(request: ModelRequest, threads: int, env: dict[str, str] | os._Environ[str]) -> Captioner:
    """Resolve ``request``'s model from this machine's own cache (pulling its pinned revision when allowed) and
    open it with ``threads`` intra-op threads, on this worker's own providers ($CAPWATCH_WORKER_PROVIDERS, e.g.
    ``cuda,cpu`` on a GPU box) or else the coordinator's.

    Raises ModelError (one line) when the model is not here, or is here as another revision or precision than the
    coordinator's, or when this capwatch is another version than the coordinator's.
    """
    from capwatch.models.captioner import open_captioner
    from capwatch.models.derived import DerivedCache
    from capwatch.models.store import resolve_model

    if request.version != __version__:
        raise ModelError(f"capwatch {__version__} here, {request.version} on the coordinator: install the same "
                         "version on both")
    try:
        providers = parse_providers(env.get(PROVIDERS_ENV, "")) or request.model.providers
    except ValueError as exc:
        raise ModelError(f"${PROVIDERS_ENV}: {exc}") from None
    resolved = resolve_model(request.model, env, download=True)
    model = dataclasses.replace(request.model, precision=resolved.precision, threads=max(1, threads),  # type: ignore[arg-type]
                                idle_unload_seconds=0.0, providers=providers)
    captioner = open_captioner(resolved.dir, model, model_id=resolved.model_id, revision=resolved.revision,
                               derived=DerivedCache.from_env(env))
    have = (captioner.model_id, captioner.revision, captioner.precision)
    if have != (request.model_id, request.revision, request.precision):
        captioner.close()
        here = f"{have[0]} at revision {have[1] or '(unknown)'} ({have[2]})"
        raise ModelError(f"model mismatch: this worker has {here}, the coordinator runs {request.describe()}; "
                         "give both the same model and revision")
    try:
        with captioner.sessions.use():  # load now: a graph that cannot load is refused before any batch
            pass
    except BaseException:
        captioner.close()
        raise
    return captioner


def open_worker_embedder(request: ModelRequest, threads: int, env: dict[str, str] | os._Environ[str]
                         ) -> ImageTextEmbedder | None:
    """The coordinator's embedding model on this worker (pulled like the captioner when allowed), or None when
    the request has none. Raises ModelError (one line) when it cannot be had or is another model here."""
    if request.embed is None:
        return None
    from capwatch.models.derived import DerivedCache
    from capwatch.models.embedding import open_embedder

    embed, model_id = request.embed
    config = Config(model=dataclasses.replace(request.model, threads=max(1, threads), idle_unload_seconds=0.0),
                    embed=embed)
    embedder = open_embedder(config, env, download=True, derived=DerivedCache.from_env(env))
    if embedder is None:
        return None
    if embedder.model_id != model_id:
        embedder.close()
        raise ModelError(f"embedding model mismatch: this worker has {embedder.model_id}, the coordinator embeds "
                         f"with {model_id}; give both the same [embed] model")
    return embedder


def open_worker_text_reader(request: ModelRequest, threads: int) -> TextReader | None:
    """The coordinator's OCR engine on this worker with ``threads`` onnxruntime threads, or None when the request
    has none. Raises ConfigError (one line) when the engine's extra is not installed here."""
    if request.ocr is None or request.ocr.engine != "rapidocr":
        return None
    from capwatch.text.rapid import RapidOcrReader

    return RapidOcrReader(threads=max(1, threads), max_pixels=request.ocr.max_pixels)


class CaptionerPlugin(WorkerPlugin):
    """A Dask worker plugin: opens the coordinator's model once on each worker (also on workers that join later)
    and captions batches with it, one at a time.

    A worker that cannot have the model keeps the reason and raises it (as ModelError) for every batch sent to it,
    so the coordinator refuses in one line. Picklable until :meth:`setup` runs on the worker.
    """

    name = PLUGIN_NAME

    def __init__(self, request: ModelRequest) -> None:
        self.request = request
        self.captioner: Captioner | None = None
        self.embedder: ImageTextEmbedder | None = None
        self.text_reader: TextReader | None = None
        self.error: str | None = None
        self.address = ""
        self.local_directory = ""
        self._lock: threading.Lock | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"request": self.request}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["request"])  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        """Resolve and load the model with as many intra-op threads as this worker has threads."""
        self._lock = threading.Lock()
        self.address = str(worker.address)
        self.local_directory = str(worker.local_directory)
        try:
            self.captioner = open_worker_captioner(self.request, int(worker.state.nthreads), os.environ)
            self.embedder = open_worker_embedder(self.request, int(worker.state.nthreads), os.environ)
            self.text_reader = open_worker_text_reader(self.request, int(worker.state.nthreads))
        except CapwatchError as exc:
            self.error = f"worker {self.address}: {exc}"
            log.error("%s", self.error)

    def teardown(self, worker: Worker) -> None:
        if self.captioner is not None:
            self.captioner.close()
            self.captioner = None
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self.text_reader is not None:
            self.text_reader.close()
            self.text_reader = None

    def caption(self, items: Sequence[tuple[str, bytes]], videos: dict[int, SentFrames] | None = None
                ) -> BatchResult:
        """Decode each (file name, bytes) and caption the batch; ``videos`` (by position in ``items``) holds the
        other chosen frames of the videos among them. Raises ModelError when this worker has no model."""
        import numpy as np

        if self.captioner is None or self._lock is None:
            raise ModelError(self.error or f"worker {self.address}: capwatch's model is not loaded here")
        started = time.monotonic()
        with self._lock:  # one batch at a time: the model already uses every thread of this worker
            tensors: list[Any] = []
            embed_inputs: list[Any] = []
            errors: list[str | None] = []
            for name, data in items:
                try:
                    caption_input, embed_input = self._decode(self.captioner, name, data)
                    tensors.append(caption_input)
                    embed_inputs.append(embed_input)
                    errors.append(None)
                except ImageError as exc:
                    errors.append(str(exc))
            options = self.request.options or DescribeOptions(keywords=False)
            said = iter(self.captioner.describe_pixels(np.stack(tensors), options) if tensors else [])
            made = [None if error is not None else next(said) for error in errors]
            detects = options.keywords and self.captioner.detects_objects
            vectors: tuple[bytes | None, ...] = ()
            if self.embedder is not None:
                from capwatch.library.embed import embed_pixels

                made_vectors = iter(embed_pixels(self.embedder, embed_inputs) or [None] * len(embed_inputs))
                vectors = tuple(None if error is not None else _vector_bytes(next(made_vectors))
                                for error in errors)
            keywords = [d.keywords if d is not None and detects else None for d in made]
            texts = [d.text if d is not None else None for d in made]
            moments: tuple[tuple[float, tuple[tuple[float, bytes], ...]] | None, ...] = ()
            frames: dict[int, list[Any]] = {}
            if videos:
                keywords, texts, moments, frames = self._video_frames(items, videos, errors, keywords, texts,
                                                                      options)
            read = self._read_texts(items, errors, texts, frames)
        return BatchResult(
            self.address, time.monotonic() - started,
            tuple(d.caption.text if d is not None and d.caption is not None else None for d in made), tuple(errors),
            tuple(keywords), tuple(r[1] if r[0] else text for text, r in zip(texts, read, strict=True)),
            vectors, text_read=tuple(r[0] for r in read) if self.text_reader is not None else (),
            text_errors=tuple(r[2] for r in read) if self.text_reader is not None else (), moments=moments,
            precision=self.captioner.precision_used)

    # -- OCR on the worker (``[ocr] engine = "rapidocr"``) ------------------------------------------------------

    def _read_texts(self, items: Sequence[tuple[str, bytes]], errors: Sequence[str | None],
                    texts: Sequence[str | None], frames: dict[int, list[Any]]
                    ) -> list[tuple[bool, str | None, str | None]]:
        """Per image (read here?, its text, why not): the text the worker's OCR engine reads in each image that
        decoded, from the same bytes and as the coordinator would from the file. A video's is read in each of its
        chosen frames (``frames`` by position; else its representative frame alone) and merged after the model's
        own text (``texts``), as a local scan does (capwatch.library.videos.read_frames_text). An OCR failure
        costs that image's text alone (a frame's, that frame's)."""
        from capwatch.library.videos import read_frames_text

        out: list[tuple[bool, str | None, str | None]] = []
        for position, ((name, data), error) in enumerate(zip(items, errors, strict=True)):
            if self.text_reader is None or error is not None:
                out.append((False, None, None))
                continue
            if name.endswith(FRAME_SUFFIX):
                chosen = frames.get(position) or [_png(data)]
                out.append((True, read_frames_text(texts[position], chosen, self.text_reader), None))
                continue
            try:
                with self._temporary(name, data) as path:
                    try:
                        out.append((True, self.text_reader.read_file(path), None))
                    except ImageError as exc:
                        out.append((True, None, str(exc).replace(str(path), name)))
            except ClusterError as exc:
                out.append((True, None, str(exc)))
        return out

    @contextmanager
    def _temporary(self, name: str, data: bytes) -> Iterator[Path]:
        """``data`` as a temporary file named with ``name``'s suffix (decoders go by it) in the worker's directory.
        Raises ClusterError when this worker's own disk cannot take it."""
        suffix = Path(name).suffix if len(Path(name).suffix) <= 16 else ""
        try:
            with tempfile.NamedTemporaryFile(suffix=suffix, dir=self.local_directory or None) as handle:
                handle.write(data)
                handle.flush()
                yield Path(handle.name)
        except OSError as exc:
            raise ClusterError(f"worker {self.address}: cannot write a temporary file in {self.local_directory}: "
                               f"{exc.strerror or exc}") from None

    # -- a video's other frames (issue 23): what a local scan does with them, here ------------------------------

    def _video_frames(self, items: Sequence[tuple[str, bytes]], videos: dict[int, SentFrames],
                      errors: list[str | None], keywords: list[tuple[str, ...] | None], texts: list[str | None],
                      options: DescribeOptions) -> tuple[list[tuple[str, ...] | None], list[str | None],
                                                         tuple[tuple[float, tuple[tuple[float, bytes], ...]] | None,
                                                               ...], dict[int, list[Any]]]:
        """The keywords and model text of each video merged over its frames (as
        capwatch.library.videos.describe_frames does it in a local scan), its other frames embedded, and its
        chosen frames decoded (by position, the representative one first) for the OCR engine."""
        from capwatch.library.embed import moments_of_frames
        from capwatch.library.outcomes import Described
        from capwatch.library.videos import describe_frames

        assert self.captioner is not None
        moments: list[tuple[float, tuple[tuple[float, bytes], ...]] | None] = [None] * len(items)
        decoded: dict[int, list[Any]] = {}
        for position, sent in videos.items():
            if errors[position] is not None:
                continue
            chosen = [(sent.poster_at, _png(items[position][1])), *((at, _png(data)) for at, data in sent.frames)]
            decoded[position] = [image for _, image in chosen]
            said = Described("", keywords[position], texts[position])
            described = describe_frames([image for _, image in chosen], said, self.captioner, options, None)
            keywords[position], texts[position] = described.keywords, described.text
            if self.embedder is not None:
                made = moments_of_frames(self.embedder, chosen)
                moments[position] = (made.poster_at, tuple((at, _vector_bytes(v) or b"") for at, v in made.frames))
        return keywords, texts, tuple(moments) if self.embedder is not None else (), decoded

    def _decode(self, captioner: Captioner, name: str, data: bytes) -> tuple[Any, Any]:
        """The captioner's and the embedder's inputs (None without one) for one image sent as bytes, from one
        decode. Decoded from a temporary file with the original suffix
        (RAW and HEIF decoders go by it); its errors name the original file. Raises ImageError."""
        suffix = Path(name).suffix if len(Path(name).suffix) <= 16 else ""
        try:
            with tempfile.NamedTemporaryFile(suffix=suffix, dir=self.local_directory or None) as handle:
                handle.write(data)
                handle.flush()
                try:
                    from capwatch.library.embed import decode_pair

                    return decode_pair(captioner, self.embedder, Path(handle.name))
                except ImageError as exc:
                    raise ImageError(str(exc).replace(handle.name, name)) from None
        except OSError as exc:  # this worker's own disk (full, read-only): not the photo's fault
            raise ClusterError(f"worker {self.address}: cannot write a temporary file in {self.local_directory}: "
                               f"{exc.strerror or exc}") from None


def _vector_bytes(vector: Any) -> bytes | None:
    return None if vector is None else bytes(vector.astype("<f4").tobytes())


def _png(data: bytes) -> Any:
    """A frame sent as PNG bytes, decoded to the RGB image it was made from (lossless)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def caption_batch(items: list[tuple[str, bytes]], videos: dict[int, SentFrames] | None = None) -> BatchResult:
    """The Dask task: caption one batch on the worker it runs on, with its :class:`CaptionerPlugin`."""
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CaptionerPlugin):
        raise ModelError(f"worker {worker.address}: capwatch's model plugin is not installed there")
    return plugin.caption(items, videos)


def plugin_state(dask_worker: Worker) -> str | None:
    """Run on each worker after registration: why it cannot caption, or None when its model is loaded."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CaptionerPlugin):
        return f"worker {dask_worker.address}: capwatch's model plugin did not install"
    return plugin.error


def worker_model(dask_worker: Worker) -> str | None:
    """Run on each worker by :func:`cluster_state`: the model it holds for capwatch, why it has none, or None."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CaptionerPlugin):
        return None
    captioner = plugin.captioner
    if captioner is None:
        return plugin.error
    revision = captioner.revision[:12] if captioner.revision else "(revision unknown)"
    return f"{captioner.model_id} {revision} {captioner.precision_used} on {captioner.provider or 'cpu'}"


def _check_providers(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            parse_providers(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.command()
@click.option("--providers", metavar="LIST", callback=_check_providers,
              help="onnxruntime providers for this worker, most wanted first (e.g. cuda,cpu); default: the "
                   "coordinator's [model] providers.")
def dask_setup(worker: Worker, providers: str | None) -> None:
    """``dask worker ADDR --preload capwatch.cluster [--providers cuda,cpu]``: import capwatch's heavy modules once
    now, so a missing or broken install shows when the worker starts and the first batch does not pay for the
    imports; remember this worker's own providers for the model plugin."""
    import capwatch.library.process
    import capwatch.models.captioner  # noqa: F401

    if providers:
        os.environ[PROVIDERS_ENV] = providers  # read by CaptionerPlugin.setup in this process
    log.info("capwatch %s ready on worker %s (%d threads)", __version__, worker.address, worker.state.nthreads)
