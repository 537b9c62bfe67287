"""Caption on a Dask cluster: many workers caption, one coordinator (where the files and the index are) writes.

The coordinator (``capwatch scan DIR --cluster tcp://HOST:8786``) reads each file's snapshot and applies the policy
exactly as a local scan does (:meth:`capwatch.library.process.Processor.prepare`), then sends the image BYTES of one
model batch per Dask task: workers need no access to the photos. A worker captions them with the model it resolved
from its own cache (the same name, revision and precision as the coordinator's, or it refuses) and sends back the
text. The coordinator alone writes files and index, through the same group-committed path as a local scan
(:meth:`Processor.complete`); each file is written only if it is still exactly what was read and sent.

Workers: ``dask worker tcp://HOST:8786 --preload capwatch.cluster`` (the preload only checks that capwatch imports
there and warms its imports). The model is loaded once per worker by :class:`CaptionerPlugin`, which the
coordinator registers with the model it runs; its onnxruntime uses as many intra-op threads as the worker has
threads, and the worker captions one batch at a time.

Failure: a batch lives in its Dask task until a result comes back, so a worker that dies mid-batch has the batch
redone elsewhere by the scheduler, and the coordinator writes each result once. When the scheduler goes away the
coordinator stops (:class:`ClusterLost`): what was written was written whole, the rest stays pending for the next
run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click
from distributed import Client, Worker, WorkerPlugin, as_completed, get_worker
from distributed.client import ClosedClientError
from distributed.scheduler import KilledWorker

from capwatch import __version__
from capwatch.config import Config, EmbedConfig, ModelConfig, OcrConfig, Provider
from capwatch.errors import CapwatchError, ImageError, ModelError
from capwatch.metadata.safeopen import open_binary
from capwatch.models.captioner import DescribeOptions

if TYPE_CHECKING:
    from capwatch.library.process import Described, FileOutcome, Job, Processor
    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder
    from capwatch.models.frames import FrameCache, VideoFrames
    from capwatch.text.reader import TextReader

log = logging.getLogger(__name__)

#: The name the worker plugin is registered under (one model per worker at a time).
PLUGIN_NAME = "capwatch-captioner"
#: Attempts for a file that changed between its snapshot and the write (as Processor.process does locally).
ATTEMPTS = 3


class ClusterError(CapwatchError):
    """The cluster cannot be used for this scan: no scheduler at the address, no worker, a worker refused the
    model. Nothing was written."""


class ClusterLost(CapwatchError):
    """The scheduler went away mid-run, or every worker did: what was written is complete, the rest is left for the
    next run."""

    exit_code = 1


# -- worker side ----------------------------------------------------------------------------------------------


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
    #: images they caption, so the coordinator decodes nothing; None: no such engine.
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
        from capwatch.library.process import Described

        keywords = self.keywords or (None,) * len(self.texts)
        found = self.found_text or (None,) * len(self.texts)
        return [ImageError(error) if error is not None else Described(text or "", words, seen)
                for text, error, words, seen in zip(self.texts, self.errors, keywords, found, strict=True)]


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
    from capwatch.models.embedding import open_embedder

    embed, model_id = request.embed
    config = Config(model=dataclasses.replace(request.model, threads=max(1, threads), idle_unload_seconds=0.0),
                    embed=embed)
    embedder = open_embedder(config, env, download=True)
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
            if videos:
                keywords, texts, moments = self._video_frames(items, videos, errors, keywords, texts, options)
            read = self._read_texts(items, errors)
        return BatchResult(
            self.address, time.monotonic() - started,
            tuple(d.caption.text if d is not None and d.caption is not None else None for d in made), tuple(errors),
            tuple(keywords), tuple(r[1] if r[0] else text for text, r in zip(texts, read, strict=True)),
            vectors, text_read=tuple(r[0] for r in read) if self.text_reader is not None else (),
            text_errors=tuple(r[2] for r in read) if self.text_reader is not None else (), moments=moments)

    # -- OCR on the worker (``[ocr] engine = "rapidocr"``) ------------------------------------------------------

    def _read_texts(self, items: Sequence[tuple[str, bytes]], errors: Sequence[str | None]
                    ) -> list[tuple[bool, str | None, str | None]]:
        """Per image (read here?, its text, why not): the text the worker's OCR engine reads in each image that
        decoded, from the same bytes and as the coordinator would from the file. A video's frame is left to the
        coordinator (its text comes from several frames); an OCR failure costs that image's text alone."""
        out: list[tuple[bool, str | None, str | None]] = []
        for (name, data), error in zip(items, errors, strict=True):
            if self.text_reader is None or error is not None or name.endswith(FRAME_SUFFIX):
                out.append((False, None, None))
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
                                                               ...]]:
        """The keywords and model text of each video merged over its frames (as
        capwatch.library.videos.describe_frames does it in a local scan) and its other frames embedded."""
        from capwatch.library.embed import moments_of_frames
        from capwatch.library.process import Described
        from capwatch.library.videos import describe_frames

        assert self.captioner is not None
        moments: list[tuple[float, tuple[tuple[float, bytes], ...]] | None] = [None] * len(items)
        for position, sent in videos.items():
            if errors[position] is not None:
                continue
            chosen = [(sent.poster_at, _png(items[position][1])), *((at, _png(data)) for at, data in sent.frames)]
            said = Described("", keywords[position], texts[position])
            described = describe_frames([image for _, image in chosen], said, self.captioner, options, None)
            keywords[position], texts[position] = described.keywords, described.text
            if self.embedder is not None:
                made = moments_of_frames(self.embedder, chosen)
                moments[position] = (made.poster_at, tuple((at, _vector_bytes(v) or b"") for at, v in made.frames))
        return keywords, texts, tuple(moments) if self.embedder is not None else ()

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


def _plugin_state(dask_worker: Worker) -> str | None:
    """Run on each worker after registration: why it cannot caption, or None when its model is loaded."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CaptionerPlugin):
        return f"worker {dask_worker.address}: capwatch's model plugin did not install"
    return plugin.error


def _worker_model(dask_worker: Worker) -> str | None:
    """Run on each worker by :func:`cluster_state`: the model it holds for capwatch, why it has none, or None."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CaptionerPlugin):
        return None
    captioner = plugin.captioner
    if captioner is None:
        return plugin.error
    revision = captioner.revision[:12] if captioner.revision else "(revision unknown)"
    return f"{captioner.model_id} {revision} {captioner.precision} on {captioner.provider or 'cpu'}"


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


# -- coordinator side -------------------------------------------------------------------------------------------


@dataclass
class WorkerStats:
    """Images captioned by one worker and the seconds it spent on them (decode + model)."""

    images: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ClusterRun:
    """What a cluster run did, for the summary and the progress bar."""

    workers: dict[str, WorkerStats] = field(default_factory=dict)
    batches: int = 0
    redone: int = 0


@dataclass
class _Sent:
    jobs: list[tuple[int, Job]]


def _quiet_dask(verbose: bool) -> None:
    """Dask logs reconnect attempts and worker deaths on its own; the coordinator reports what matters in one
    line, so Dask's messages go to capwatch's log only with -v."""
    handlers = list(logging.getLogger("capwatch").handlers) if verbose else [logging.NullHandler()]
    # Dask gives some of its loggers their own stderr handler (distributed.client): each is redirected.
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "distributed"]
    for name in ["distributed", *names]:
        target = logging.getLogger(name)
        if name == "distributed" or target.handlers:
            target.handlers[:] = handlers
            target.propagate = False
            target.setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)


@contextmanager
def connect(address: str, *, timeout: float, verbose: bool = False) -> Iterator[Client]:
    """A Dask client of the scheduler at ``address``. Raises ClusterError (one line) when there is none, or
    when the extra is not installed."""
    import dask.config

    _quiet_dask(verbose)
    if address.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file", None):
        raise ClusterError(f"{address} needs Dask's TLS configuration (a CA file, and the client's certificate and "
                           "key), e.g. $DASK_DISTRIBUTED__COMM__TLS__CA_FILE; see the README")
    try:
        client = Client(address, timeout=timeout, set_as_default=False)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError, ValueError, TypeError) as exc:  # TypeError: a TLS configuration Dask rejects
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {str(exc).splitlines()[0]}") from None
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):  # the scheduler is gone already: nothing left to close cleanly
            client.close(timeout=5)  # type: ignore[no-untyped-call]


def cluster_state(address: str, *, timeout: float) -> dict[str, Any]:
    """The scheduler at ``address`` and its workers (address, threads, the capwatch model each holds), for
    `capwatch status`; ``error`` says why not when the scheduler cannot be asked. Never raises."""
    state: dict[str, Any] = {"scheduler": address, "error": None, "workers": []}
    try:
        with connect(address, timeout=timeout) as client:
            threads: dict[str, int] = client.nthreads()  # type: ignore[no-untyped-call]
            try:
                models: dict[str, str | None] = client.run(_worker_model)
            except Exception:  # a worker without capwatch cannot run it; its threads still show
                models = {}
    except (CapwatchError, OSError, TimeoutError) as exc:
        state["error"] = str(exc)
        return state
    state["workers"] = [{"address": worker, "threads": count, "model": models.get(worker)}
                        for worker, count in sorted(threads.items())]
    return state


def model_request(captioner: Captioner, model: ModelConfig, options: DescribeOptions | None = None,
                  embed: tuple[EmbedConfig, str] | None = None, ocr: OcrConfig | None = None) -> ModelRequest:
    """The request for the model ``captioner`` was opened with, from the ``[model]`` section it came from, asking
    the workers for what ``options`` names besides the caption, for embeddings by ``embed`` ([embed]
    section, model id) when given, and for the text ``ocr``'s engine reads when it is one beside the model."""
    beside = ocr if ocr is not None and ocr.engine == "rapidocr" else None
    return ModelRequest(model, captioner.model_id, captioner.revision, captioner.precision, options=options,
                        embed=embed, ocr=beside)


def install(client: Client, request: ModelRequest, *, wait_seconds: float) -> list[str]:
    """Wait (up to ``wait_seconds``) for a worker, have every worker open the model, and return their addresses.

    A worker that goes away meanwhile (killed, its machine gone) is left out and the others go on; only the loss
    of the scheduler itself stops here. Raises ClusterError when no worker joins (or none is left) or one cannot
    load capwatch, ModelError (one line, naming the worker) when a worker cannot have the coordinator's model,
    ClusterLost when the scheduler goes away meanwhile (the message says what the scheduler's connection said).
    """
    plugin = CaptionerPlugin(request)
    for _ in range(_INSTALL_ATTEMPTS):
        try:
            client.wait_for_workers(1, timeout=wait_seconds)
        except TimeoutError:
            raise ClusterError(f"no Dask worker joined the scheduler at {_address(client)} within "
                               f"{wait_seconds:g} s (start one: dask worker ADDRESS --preload capwatch.cluster)"
                               ) from None
        except (CancelledError, ClosedClientError, OSError) as exc:
            raise _lost_while_loading(client, exc) from None
        try:
            client.register_plugin(plugin, name=PLUGIN_NAME)
            # on_error="return": one worker's failure (a worker killed mid-call among them) is its own entry.
            answers: dict[str, object] = client.run(_plugin_state, on_error="return")
        except (CancelledError, ClosedClientError, OSError, TimeoutError) as exc:
            if _scheduler_alive(client):
                log.info("a Dask worker went away while the workers were loading the model (%s); asking those left",
                         _exc_line(exc))
                continue
            raise _lost_while_loading(client, exc) from None
        except Exception as exc:  # Dask relays a worker's failure as a bare Exception carrying its text
            raise _refused(exc) from None
        states: dict[str, str | None] = {}
        for worker, answer in answers.items():
            if isinstance(answer, OSError | CancelledError | TimeoutError):
                log.info("Dask worker %s went away while loading the model (%s)", worker, _exc_line(answer))
            elif isinstance(answer, BaseException):
                raise _refused(answer)
            else:
                states[worker] = answer if isinstance(answer, str) else None
        for state in states.values():
            if state is not None:
                raise ModelError(state)
        if states:
            return sorted(states)
    raise ClusterError(f"the Dask workers at {_address(client)} kept going away while they were loading the model; "
                       "nothing was written")


#: How many times :func:`install` asks the workers again after some went away while it asked.
_INSTALL_ATTEMPTS = 5


def _exc_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scheduler_alive(client: Client) -> bool:
    """Whether the scheduler still answers this client (a short round trip). Never raises."""
    if client.status not in ("running", "connecting"):
        return False
    try:
        client.scheduler_info()
        client.nthreads()  # type: ignore[no-untyped-call]  # a call to the scheduler, not the cached copy
    except Exception:
        return False
    return True


def _lost_while_loading(client: Client, exc: BaseException) -> ClusterLost:
    return ClusterLost(f"the Dask scheduler at {_address(client)} went away while its workers were loading the "
                       f"model ({_exc_line(exc)}); nothing was written")


def _refused(exc: BaseException) -> ClusterError:
    return ClusterError(f"a Dask worker could not take capwatch's model plugin ({str(exc).splitlines()[0]}): "
                        f"install capwatch[cluster] {__version__} on every worker")


def _read_bytes(job: Job) -> bytes | None:
    """The file's bytes, or None when it is no longer exactly the file the snapshot describes."""
    try:
        with open_binary(job.path) as handle:  # a FIFO or device swapped in: refused at once, never waited on
            data = handle.read()
            st = os.fstat(handle.fileno())
    except OSError:
        return None
    return data if job.snap.identity.matches_stat(st) else None


#: What a video's frame is sent as: the file name it is decoded under on the worker (the suffix picks the decoder).
FRAME_SUFFIX = "#frame.png"


@dataclass(frozen=True)
class SentFrames:
    """A video's chosen frames other than the representative one (which travels as the batch item itself), as
    (seconds, lossless PNG) each, and the representative frame's time: the worker merges their keywords and text
    and embeds them, as a local scan does."""

    poster_at: float
    frames: tuple[tuple[float, bytes], ...]


def _as_png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _payload(job: Job, frames: FrameCache | None = None) -> tuple[str, bytes] | None:
    """What is sent for one file: the name the worker decodes it under and its bytes. For a video, its
    representative frame as a lossless PNG (a few hundred KB instead of the whole video; the frame is chosen here,
    where the file is, through ``frames``: the coordinator's cache, so :func:`_video_payload` reuses the
    decode); for anything else the file itself. None when the file is no longer the one the snapshot
    describes."""
    from capwatch.library.videos import is_video

    if not is_video(job.path, job.snap.metadata.format):
        data = _read_bytes(job)
        return None if data is None else (job.path, data)
    chosen = _chosen_frames(job, frames)
    if chosen is None:
        return None
    if isinstance(chosen, ImageError):
        data = _read_bytes(job)  # the worker meets the same error and reports it as any undecodable file
        return None if data is None else (job.path, data)
    return job.path + FRAME_SUFFIX, _as_png(chosen.representative.image)


def _video_payload(job: Job, frames: FrameCache) -> SentFrames | None:
    """The other chosen frames of a video job (see :class:`SentFrames`); None for a photo, a video that cannot be
    decoded or one that changed."""
    from capwatch.library.videos import is_video

    if not is_video(job.path, job.snap.metadata.format):
        return None
    chosen = _chosen_frames(job, frames)
    if chosen is None or isinstance(chosen, ImageError):
        return None
    return SentFrames(chosen.representative.at, tuple((f.at, _as_png(f.image)) for f in chosen.chosen[1:]))


def _chosen_frames(job: Job, frames: FrameCache | None) -> VideoFrames | ImageError | None:
    """The video's chosen frames while the file is the one its snapshot describes (None when not), or the
    ImageError that stops its decode."""
    from capwatch.models.frames import FrameCache

    try:
        if not job.snap.identity.matches_stat(os.stat(job.path)):
            return None
        chosen = (frames if frames is not None else FrameCache()).get(Path(job.path))
        if not job.snap.identity.matches_stat(os.stat(job.path)):
            return None
    except OSError:
        return None
    except ImageError as exc:
        return exc
    return chosen


def caption_on_cluster(
    client: Client,
    processor: Processor,
    paths: Sequence[Path],
    *,
    skip_captioned: bool,
    batches_per_worker: int,
    on_outcomes: Callable[[Sequence[FileOutcome], ClusterRun], None],
    worker_wait_seconds: float = 60.0,
) -> ClusterRun:
    """Caption ``paths`` on the cluster's workers and write each result on this machine through ``processor``.

    At most ``batches_per_worker`` batches per worker are in flight (each holds its images' bytes until its
    result is written). ``on_outcomes`` gets every file's outcome as it is settled. Raises ModelError when a
    worker refuses the model, ClusterLost when the scheduler goes away or has had no worker for
    ``worker_wait_seconds`` (what was written stays; the rest is left for the next run), IndexUnavailable when the
    index cannot be written.
    """
    from capwatch.library.process import FileOutcome

    run = ClusterRun()
    size = max(1, processor.config.model.batch_size)
    waiting: deque[Path] = deque(paths)
    attempts: dict[str, int] = {}
    pending: dict[Any, _Sent] = {}
    address = _address(client)
    lost = f"the Dask scheduler at {address} went away"

    def retry_or_fail(outcomes: list[FileOutcome]) -> list[FileOutcome]:
        """Files that changed since they were read are read again (up to ATTEMPTS in all), as locally."""
        settled = []
        for outcome in outcomes:
            key = str(outcome.path)
            if not outcome.changed:
                settled.append(outcome)
            elif attempts.get(key, 1) < ATTEMPTS:
                attempts[key] = attempts.get(key, 1) + 1
                waiting.append(outcome.path)
            else:
                message = f"{outcome.path}: kept changing while being captioned; nothing written (run again once it " \
                    "is done)"
                settled.append(dataclasses.replace(outcome, changed=False, error=message))
        return settled

    def send() -> None:
        batch = [waiting.popleft() for _ in range(min(size, len(waiting)))]
        outcomes, jobs = processor.prepare(batch, skip_captioned=skip_captioned)
        early = list(outcomes.values())
        items: list[tuple[str, bytes]] = []
        ready: list[tuple[int, Job]] = []
        videos: dict[int, SentFrames] = {}
        for position, job in jobs:
            item = _payload(job, processor.frames)
            if item is None:
                early.append(FileOutcome(Path(job.path), None, None, changed=True,
                                         skipped=f"{job.path}: changed while it was being read"))
            else:
                extra = _video_payload(job, processor.frames) if item[0].endswith(FRAME_SUFFIX) else None
                if extra is not None:
                    videos[len(items)] = extra
                items.append(item)
                ready.append((position, job))
        if ready:
            # The bytes travel inside the task (not scattered): if its worker dies, the scheduler still has them
            # and runs the batch elsewhere.
            with warnings.catch_warnings():
                # Dask suggests scattering big graphs; here the bytes are the task on purpose (see above).
                warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
                future = client.submit(caption_batch, items, videos or None, pure=False)
            pending[future] = _Sent(ready)
            arrivals.add(future)  # type: ignore[no-untyped-call]
        settled = retry_or_fail(early)
        if settled:
            on_outcomes(settled, run)

    arrivals = as_completed(loop=client.loop)  # type: ignore[no-untyped-call]

    def next_results() -> list[Any]:
        """The next finished batches; waits, and raises ClusterLost once no worker was there for
        ``worker_wait_seconds`` (the batches would wait at the scheduler forever)."""
        alone_since: float | None = None
        checked = time.monotonic()
        while not (ready := arrivals.next_batch(block=False)):  # type: ignore[no-untyped-call]
            time.sleep(0.01)
            now = time.monotonic()
            if now - checked < 1.0:
                continue
            checked = now
            if client.nthreads():  # type: ignore[no-untyped-call]
                alone_since = None
            elif alone_since is None:
                alone_since = now
            elif now - alone_since >= worker_wait_seconds:
                raise ClusterLost(f"no Dask worker left at {address} for {worker_wait_seconds:g} s; what was "
                                  "captioned is written, run the scan again to finish")
        return list(ready)

    try:
        while waiting or pending:
            workers = max(1, len(client.nthreads()))  # type: ignore[no-untyped-call]
            while waiting and len(pending) < batches_per_worker * workers:
                send()
            if not pending:
                continue
            for future in next_results():
                sent = pending.pop(future)
                try:
                    result: BatchResult = future.result(timeout=1)
                except TimeoutError:
                    # Finished, but its result was lost with its worker before it reached us: the scheduler runs
                    # the batch again, and it comes back with the others.
                    pending[future] = sent
                    arrivals.add(future)  # type: ignore[no-untyped-call]
                    continue
                except KilledWorker:
                    # The batch killed every worker that tried it (Dask's allowed-failures): not the files' fault
                    # as far as anyone knows; left pending for the next run, reported now.
                    on_outcomes([FileOutcome(Path(job.path), None, None, error=f"{job.path}: the Dask workers "
                                             "captioning it died; left for the next run") for _, job in sent.jobs],
                                run)
                    continue
                run.batches += 1
                stats = run.workers.setdefault(result.worker, WorkerStats())
                stats.images += sum(text is not None for text in result.texts)
                stats.seconds += result.seconds
                for (_, job), problem in zip(sent.jobs, result.text_errors, strict=False):
                    if problem is not None:  # an OCR failure on the worker costs that file's text alone
                        log.warning("no text read: %s", problem if problem.startswith(job.path)
                                    else f"{job.path}: {problem}")
                finished = processor.complete(sent.jobs, result.described(), result.embeddings(),
                                              result.video_moments(), text_read=result.text_read or None)
                before = len(waiting)
                settled = retry_or_fail([outcome for _, outcome in finished])
                run.redone += len(waiting) - before
                if settled:
                    on_outcomes(settled, run)
    except CapwatchError:
        _cancel(client, pending)
        raise
    except (CancelledError, ClosedClientError, OSError, TimeoutError) as exc:
        # The client reconnects for connect_timeout_seconds, then cancels every future (CancelledError) and
        # refuses new ones (ClosedClientError); a comm cut mid-call raises OSError (CommClosedError).
        if _scheduler_alive(client):
            # Not the scheduler: say what did fail instead of a loss that did not happen.
            raise ClusterLost(f"the Dask cluster at {address} failed mid-run ({_exc_line(exc)}) although its "
                              "scheduler is still there; what was captioned is written, run the scan again to "
                              "finish") from None
        raise ClusterLost(f"{lost} ({type(exc).__name__}); what was captioned is written, "
                          "run the scan again to finish") from None
    finally:
        if pending and client.status == "running":
            _cancel(client, pending)
    return run


def _cancel(client: Client, pending: dict[Any, _Sent]) -> None:
    with contextlib.suppress(Exception):  # the scheduler is gone: nothing to cancel there
        client.cancel(list(pending))  # type: ignore[no-untyped-call]
    pending.clear()


def _address(client: Client) -> str:
    scheduler = client.scheduler
    return str(getattr(scheduler, "address", "?"))
