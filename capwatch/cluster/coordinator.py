"""The coordinator side of ``scan --cluster``: connect to the scheduler, install the model on the workers, send
each model batch's bytes and write what comes back through the local scan's own path."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import Client, as_completed
from distributed.client import ClosedClientError
from distributed.scheduler import KilledWorker

from capwatch import __version__
from capwatch.cluster.messages import (
    FRAME_SUFFIX,
    PLUGIN_NAME,
    BatchResult,
    ClusterError,
    ClusterLost,
    ModelRequest,
    SentFrames,
)
from capwatch.cluster.worker import CaptionerPlugin, caption_batch, plugin_state, worker_model
from capwatch.config import EmbedConfig, ModelConfig, OcrConfig
from capwatch.errors import CapwatchError, ImageError, ModelError
from capwatch.metadata.safeopen import open_binary
from capwatch.models.captioner import DescribeOptions

if TYPE_CHECKING:
    from capwatch.library.outcomes import FileOutcome
    from capwatch.library.process import Job, Processor
    from capwatch.models.captioner import Captioner
    from capwatch.models.frames import FrameCache, VideoFrames

log = logging.getLogger(__name__)

#: Attempts for a file that changed between its snapshot and the write (as Processor.process does locally).
ATTEMPTS = 3




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
                models: dict[str, str | None] = client.run(worker_model)
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
            answers: dict[str, object] = client.run(plugin_state, on_error="return")
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
    from capwatch.library.outcomes import FileOutcome

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
            # A video's frame travels with its other chosen frames (its keywords, text and moments come from all
            # of them); without them (the video changed between the two looks) it is read again, as any change.
            extra = _video_payload(job, processor.frames) if item is not None and item[0].endswith(FRAME_SUFFIX) \
                else None
            if item is None or (extra is None and item[0].endswith(FRAME_SUFFIX)):
                early.append(FileOutcome(Path(job.path), None, None, changed=True,
                                         skipped=f"{job.path}: changed while it was being read"))
            else:
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
                                              result.video_moments(), text_read=result.text_read or None,
                                              precision=result.precision or None)
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
