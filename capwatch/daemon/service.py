"""The daemon: start-up, the event loop that ties watcher, settler and pipeline together, signals, systemd.

``run_daemon`` takes the lock next to the index and one per root in the state directory (a second daemon on the
same index, or on another index but one of the same folders, refuses with one line), starts the pipeline (model
thread + prepare thread), watches every root, reconciles each root in the background (backfill: queued behind live
events), tells systemd it is ready, and then keeps a few promises until told to stop:

* The model never delays READY. When it is not there yet (first start: not downloaded; ``--model DIR`` on a mount
  not up yet) the daemon indexes without captioning (like ``watch --no-caption``: new files indexed, descriptions
  imported, all searchable) while :class:`~capwatch.daemon.modelsource.ModelSource` downloads it in the background
  (progress in STATUS), retrying with back-off when there is no network. Once it is there the engine restarts with
  it and captions every file that waited. A model that cannot be opened is reported (log, STATUS, ``status``) and
  tried again later; only a model name or precision that does not exist stops the start (exit 2).

* SIGTERM / SIGINT: stop intake, finish (or, past a bound, abandon) the in-flight batch, flush, exit 0.
* SIGHUP: reload the configuration and restart the components with it (the lock and model stay when possible).
* ``sd_notify`` over ``$NOTIFY_SOCKET`` (a datagram; no libsystemd): READY=1, STATUS=..., WATCHDOG=1 at half of
  ``$WATCHDOG_USEC``, STOPPING=1.
* A live-state JSON file next to the index (written atomically) that :func:`read_live_state` returns to
  ``capwatch status`` while the daemon runs.
* Roots that are missing, unmounted, replaced or suddenly empty never lose their index rows; they are checked
  again every ``watch.recheck_missing_seconds`` and picked up when they are back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from capwatch.config import Config, RootConfig, load_config
from capwatch.daemon.instance import (
    DaemonAlreadyRunning,
    InstanceLock,
    RootLocks,
    live_state_path,
    lock_path,
    read_live_state,
    write_json_atomic,
)
from capwatch.daemon.modelsource import CaptionerFactory, ModelSource, model_label
from capwatch.daemon.pipeline import BatchProcessor, JobQueue, Outcome, Pipeline, PipelineStats
from capwatch.daemon.sdnotify import SystemdNotifier
from capwatch.daemon.settle import FileState, Settler
from capwatch.daemon.watcher import Watcher, WatchEvent, roots_for
from capwatch.errors import CapwatchError, ModelError
from capwatch.library.index import Index, normalise_path
from capwatch.paths import state_dir

log = logging.getLogger(__name__)

__all__ = ["DaemonAlreadyRunning", "SystemdNotifier", "live_state_path", "lock_path", "read_live_state",
           "run_daemon"]

#: Upper bound for finishing the in-flight batch after SIGTERM (systemd's default TimeoutStopSec is 90 s).
STOP_TIMEOUT_SECONDS = 30.0


# -- the daemon -----------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside a reconcile's progress callback to abandon it when the daemon stops."""


@dataclass(frozen=True)
class IndexOutcome:
    """What :class:`IndexOnlyProcessor` did with one file."""

    path: Path
    skipped: str | None = None
    error: str | None = None
    changed: bool = False


class IndexOnlyProcessor:
    """Keeps the index in step with the files without captioning (``caption=False``): reads each file's
    metadata and fingerprint, imports any description, and upserts the row."""

    def __init__(self, config: Config, index: Index) -> None:
        self._config = config
        self._index = index

    def process_batch(self, paths: Sequence[Path]) -> list[IndexOutcome]:
        """Return one outcome per path (``error`` set for unreadable files); never raises for one file."""
        from capwatch.library.scan import read_record

        outcomes: list[IndexOutcome] = []
        records = []
        for path in paths:
            spath = normalise_path(path)
            try:
                st = os.stat(spath)
            except OSError as exc:
                outcomes.append(IndexOutcome(Path(spath), error=f"{spath}: {exc.strerror or exc}"))
                continue
            record = read_record(spath, st, self._index.get(spath), self._config)
            records.append(record)
            error = record.error if record.status == "error" else None
            outcomes.append(IndexOutcome(Path(spath), skipped="index only", error=error))
        self._index.upsert_many(records)  # one transaction per batch
        return outcomes


class _ModelGuard:
    """A processor whose model failing (ModelError: a graph that does not load) does not end the model thread.

    The batch then did nothing: its files keep their rows (pending), and ``on_failure`` tells the engine, whose
    daemon goes back to indexing without the model.
    """

    def __init__(self, processor: BatchProcessor, on_failure: Callable[[ModelError], None]) -> None:
        self._processor = processor
        self._on_failure = on_failure

    def process_batch(self, paths: Sequence[Path]) -> Sequence[Outcome]:
        """Return the processor's outcomes, or none when the model failed. Raises what else the processor raises
        (IndexUnavailable: the daemon stops)."""
        try:
            return self._processor.process_batch(paths)
        except ModelError as exc:
            self._on_failure(exc)
            return []


def default_captioner_factory(config: Config) -> Any:
    """Open the configured model (pulled into the cache on first use). Raises ModelError."""
    from capwatch.models.captioner import open_captioner
    from capwatch.models.store import resolve_model

    resolved = resolve_model(config.model, os.environ, download=True)
    # A named model runs the precision that was resolved (and pulled) for it, not whatever else is cached.
    model = dataclasses.replace(config.model, precision=resolved.precision)  # type: ignore[arg-type]
    return open_captioner(resolved.dir, model, model_id=resolved.model_id, revision=resolved.revision)


def run_daemon(
    config: Config,
    roots: Sequence[RootConfig | Path] | None = None,
    *,
    stop_event: threading.Event | None = None,
    reload: Callable[[], Config] | None = None,
    caption: bool = True,
    captioner_factory: CaptionerFactory | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (main thread only) or ``stop_event``; return the exit code.

    ``roots`` default to ``config.library.roots``. ``reload`` builds the configuration again on SIGHUP (the CLI
    passes one that re-applies its flags; default: reload ``config.source``). ``caption=False`` keeps the index
    in step without loading a model. ``captioner_factory`` opens the model instead of the model store (no
    download then; it is called again with back-off while it raises ModelError). Returns 0 after a clean stop, 1
    when a worker thread crashed. Raises DaemonAlreadyRunning when another daemon holds the index (its subclass
    RootInUse when another daemon watches one of the roots), ModelError for a model name or precision that does
    not exist, IndexUnavailable / ConfigError when start-up fails (one-line messages for the CLI). A model that is
    missing or cannot be opened is no start-up failure: see the module docstring.
    """
    daemon = Daemon(config, roots, stop_event=stop_event or threading.Event(), reload=reload, caption=caption,
                    captioner_factory=captioner_factory)
    return daemon.run()


class Daemon:
    """One daemon run; see :func:`run_daemon`."""

    def __init__(
        self,
        config: Config,
        roots: Sequence[RootConfig | Path] | None,
        *,
        stop_event: threading.Event,
        reload: Callable[[], Config] | None,
        caption: bool,
        captioner_factory: CaptionerFactory | None,
    ) -> None:
        self.config = config
        self._explicit_roots = tuple(roots) if roots else None
        self.stop_event = stop_event
        self._reload_fn = reload
        self._caption = caption
        self._captioner_factory = captioner_factory
        self._reload_requested = threading.Event()
        self.index_path = config.index_path()
        self._lock = InstanceLock(self.index_path)
        self._root_locks = RootLocks(self.index_path, state_dir(os.environ))
        self._notifier = SystemdNotifier()
        self._started = _utc_now()
        self._state = "starting"
        self._captioner: Any = None
        self._model_source: ModelSource | None = None
        self._engine: _Engine | None = None
        self._updates = 0
        # Counters of the engines that already stopped: a reload or the model's arrival restarts the engine, and
        # `capwatch status` counts since the process started.
        self._totals = _Totals()

    # -- public lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        self._lock.acquire()
        self._acquire_roots()
        previous_handlers = self._install_signals()
        code = 0
        try:
            Index.open(self.index_path, busy_timeout=self.config.index.busy_timeout_seconds).close()
            if self._caption:
                from capwatch.library.process import recover_writes

                recover_writes(log)
                self._model_source, self._captioner = self._find_model(self.config)
            self._start_engine()
            self._notifier.notify("READY=1", f"STATUS={self._status_line()}", f"MAINPID={os.getpid()}")
            log.info("capwatch daemon ready (pid %d, index %s)", os.getpid(), self.index_path)
            code = self._loop()
        finally:
            self._state = "stopping"
            self._notifier.notify("STOPPING=1", "STATUS=stopping")
            source = self._model_source
            if source is not None:
                source.cancel()  # a download ends at its next MiB while the batch in hand is finished
            clean = self._stop_engine()
            if source is not None and not source.stop(1.0):
                log.debug("model download still in a network call; leaving it (its bytes are kept for next time)")
            if self._captioner is not None:
                with contextlib.suppress(Exception):
                    self._captioner.close()
            with contextlib.suppress(OSError):
                live_state_path(self.index_path).unlink()
            self._restore_signals(previous_handlers)
            self._lock.release()
            self._root_locks.release()
            log.info("capwatch daemon stopped%s", "" if clean else " (in-flight batch abandoned)")
        return code

    def _roots(self) -> tuple[RootConfig, ...]:
        chosen = self._explicit_roots if self._explicit_roots else self.config.library.roots
        return roots_for(list(chosen), self.config.library)

    def _acquire_roots(self) -> None:
        """Lock every root before anything starts. Raises RootInUse (one line naming the other daemon's pid and
        index) when another daemon watches one of them, after releasing the index lock: a second daemon on the
        same folder is refused, as one on the same index is."""
        busy = self._root_locks.hold([Path(r.path) for r in self._roots()])
        if busy:
            self._root_locks.release()
            self._lock.release()
            raise busy[0]

    def _locked_roots(self) -> tuple[RootConfig, ...]:
        """The roots to watch now, each locked for this daemon; locks of roots no longer watched are released.

        After a reload (or a restart of the engine), a root that another daemon took meanwhile is left out with an
        error in the log, so this daemon keeps serving the others.
        """
        roots = self._roots()
        busy = self._root_locks.hold([Path(r.path) for r in roots])
        for error in busy:
            log.error("%s; not watching it", error)
        taken = {error.root for error in busy}
        return tuple(r for r in roots if Path(r.path) not in taken)

    # -- signals ------------------------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # run in a thread (tests, embedding): the owner stops us through stop_event
        handlers: dict[int, Any] = {}

        def stop(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()

        def hup(signum: int, frame: FrameType | None) -> None:
            self._reload_requested.set()  # the loop notices within a tick

        for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, hup)):
            handlers[sig] = signal.signal(sig, handler)
        return handlers

    @staticmethod
    def _restore_signals(handlers: dict[int, Any]) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    def request_reload(self) -> None:
        """Ask the loop to reload the configuration (what SIGHUP does)."""
        self._reload_requested.set()

    # -- main loop ----------------------------------------------------------------------------------------

    def _loop(self) -> int:
        interval = self._notifier.watchdog_interval
        tick = min(1.0, interval) if interval else 1.0
        next_ping = 0.0
        next_state = 0.0
        next_recheck = time.monotonic() + self.config.watch.recheck_missing_seconds
        while True:
            self.stop_event.wait(tick)
            if self.stop_event.is_set():
                return 0
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._reload()
                continue
            if self._captioner is None and self._model_source is not None:
                captioner = self._model_source.take()
                if captioner is not None:
                    self._use_model(captioner)
                    continue
            engine = self._engine
            if engine is not None and engine.model_failure is not None and self._captioner is not None:
                self._drop_model(engine.model_failure)
                continue
            if engine is not None and not engine.healthy():
                log.error("a daemon thread stopped unexpectedly; exiting so the service manager restarts us")
                return 1
            now = time.monotonic()
            if interval and now >= next_ping:
                self._notifier.notify("WATCHDOG=1")
                next_ping = now + interval
            if now >= next_recheck and engine is not None:
                engine.recheck_roots()
                next_recheck = now + max(0.5, self.config.watch.recheck_missing_seconds)
            if now >= next_state:
                self._publish()
                next_state = now + 1.0

    def _reload(self) -> None:
        log.info("SIGHUP: reloading configuration")
        try:
            new = self._reload_fn() if self._reload_fn is not None else _reload_from_source(self.config)
        except CapwatchError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        # The lock belongs to this index; a different one needs a restart.
        new = dataclasses.replace(new, index=dataclasses.replace(new.index, path=self.index_path))
        if self._caption and new.model != self.config.model:
            try:
                self._check_model(new)
            except CapwatchError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                return
        self._state = "reloading"
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
        self._stop_engine()
        if self._caption:
            self._reload_model(new)
        self.config = new
        self._start_engine()
        self._notifier.notify("READY=1", f"STATUS={self._status_line()}")
        log.info("configuration reloaded")

    def _reload_model(self, new: Config) -> None:
        """Carry the model over to ``new``: keep what still fits, look for what changed (no network here)."""
        source = self._model_source
        if source is not None and self._captioner is None and source.same_model(new.model):
            # Still looking for (or downloading) the same files: keep at it, and open them with the new settings.
            source.reconfigure(new)
            source.retry_now()  # whatever was wrong (network, a folder) may be fixed: no need to wait the back-off
            return
        if new.model == self.config.model and self._captioner is not None:
            return
        if source is not None and not source.stop(1.0):
            log.debug("the previous model's download is still in a network call; it ends on its own")
        if self._captioner is not None:
            with contextlib.suppress(Exception):
                self._captioner.close()
            self._captioner = None
        self._model_source, self._captioner = self._find_model(new)

    # -- model ----------------------------------------------------------------------------------------------

    def _check_model(self, config: Config) -> None:
        """Raise ModelError (one line) when ``config`` names a model that does not exist: an unknown name or
        precision, an unusable model.repo. No waiting fixes those, so they stop a start (exit 2) or a reload."""
        if self._captioner_factory is None and config.model.dir is None:
            from capwatch.models.store import model_spec

            model_spec(config.model)

    def _find_model(self, config: Config) -> tuple[ModelSource, Any]:
        """Check ``config``'s model (see :meth:`_check_model`, which may raise) and take it if it is there already,
        without touching the network.

        Returns its source and the opened captioner, or None for the captioner: the source's thread then looks for,
        downloads and opens it while the daemon indexes, and the loop switches to captioning once it has it.
        """
        self._check_model(config)
        source = ModelSource(config, os.environ, factory=self._captioner_factory)
        captioner = source.try_now()
        if captioner is None:
            source.start()
        return source, captioner

    def _use_model(self, captioner: Any) -> None:
        """Switch from indexing to captioning: restart the engine with the model; its reconcile queues every file
        that waited for a caption meanwhile (they are pending in the index)."""
        log.info("model %s is ready (%s%s); captioning the files that wait for one", model_label(self.config.model),
                 getattr(captioner, "model_id", "?"), _at_revision(getattr(captioner, "revision", None)))
        self._stop_engine()
        self._captioner = captioner
        self._start_engine()

    def _drop_model(self, failure: ModelError) -> None:
        """The model failed when it ran (its graphs do not load): back to indexing without it, the error in the
        live state and STATUS, and the source opens it again after a growing back-off. The files of the failed
        batch stay pending and are captioned once it works."""
        self._stop_engine()
        with contextlib.suppress(Exception):
            self._captioner.close()
        self._captioner = None
        if self._model_source is None:
            self._model_source = ModelSource(self.config, os.environ, factory=self._captioner_factory)
        self._model_source.report_failure(f"model error: {failure}")
        self._start_engine()

    # -- engine -------------------------------------------------------------------------------------------

    def _start_engine(self) -> None:
        engine = _Engine(self.config, self._locked_roots(), self.index_path,
                         self._captioner if self._caption else None)
        engine.start()
        self._engine = engine
        self._state = "running"
        self._publish()

    def _stop_engine(self) -> bool:
        engine, self._engine = self._engine, None
        if engine is None:
            return True
        clean = engine.stop(STOP_TIMEOUT_SECONDS)
        self._totals.add(engine.pipeline.stats())
        return clean

    # -- reporting ----------------------------------------------------------------------------------------

    def _status_line(self) -> str:
        engine = self._engine
        if engine is None:
            return self._state
        counts = self._counters(engine)
        text = engine.status_line(counts["processed"], counts["captioned"], counts["errors"])
        if self._caption and self._captioner is None:
            # Indexing while the model is missing: say why there are no captions (and how far the download is).
            text = f"{self._model_report(engine)['model_status']}; {text}"
        return text

    def _counters(self, engine: _Engine | None) -> dict[str, Any]:
        """What the daemon did since the process started: the stopped engines' totals plus the running one's."""
        totals = self._totals.plus(engine.pipeline.stats() if engine is not None else None)
        return {"processed": totals.processed, "captioned": totals.captioned, "unchanged": totals.unchanged,
                "errors": totals.errors, "last_error": totals.last_error}

    def _model_report(self, engine: _Engine | None) -> dict[str, Any]:
        """The model's part of the live state: the model that runs (id, revision, precision, as the captioner says,
        whatever the configuration now says) and its state; ``model_status`` is the line STATUS and ``status``
        show."""
        report: dict[str, Any] = {"model_state": "off", "model_status": "captioning off (--no-caption)",
                                  "model_id": None, "model_revision": None, "model_precision": None,
                                  "model_progress": None, "model_error": None}
        captioner, source = self._captioner, self._model_source
        if not self._caption:
            return report
        if captioner is not None:
            if _model_loaded(captioner):
                state, text = "loaded", "loaded"
            elif engine is not None and engine.busy():
                # Sessions load on the first batch (and again after an idle unload): files wait for it meanwhile.
                state, text = "loading", "loading (files are waiting for it)"
            else:
                state, text = "unloaded", "unloaded while idle (loads again with the next file)"
            report.update(model_state=state, model_status=text, model_id=_text(getattr(captioner, "model_id", None)),
                          model_revision=_text(getattr(captioner, "revision", None)),
                          model_precision=_text(getattr(getattr(captioner, "config", None), "precision", None)))
        elif source is not None:
            snap = source.snapshot()
            report.update(model_state="loading" if snap.state == "ready" else snap.state, model_status=snap.text,
                          model_error=snap.error)
            if snap.state == "downloading":
                report["model_progress"] = {"done": snap.done, "total": snap.total}
        return report

    def _publish(self) -> None:
        engine = self._engine
        self._updates += 1
        data: dict[str, Any] = {
            "pid": os.getpid(),
            # Increases with every write, so a reader can wait for a snapshot taken after something it did.
            "updates": self._updates,
            # The process's start: the counters below count from here, across reloads.
            "started": self._started,
            "updated": _utc_now(),
            "state": self._state,
            "model": model_label(self.config.model),
            "model_loaded": _model_loaded(self._captioner),
        }
        if engine is not None:
            data.update(engine.live_state())
        data.update(self._counters(engine))
        data.update(self._model_report(engine))
        try:
            write_json_atomic(live_state_path(self.index_path), data)
        except OSError as exc:
            log.debug("cannot write live state: %s", exc)
        self._notifier.notify(f"STATUS={self._status_line()}")


@dataclass
class _Totals:
    """Counters summed over engines (each :class:`PipelineStats` counts from its engine's start)."""

    processed: int = 0
    captioned: int = 0
    unchanged: int = 0
    errors: int = 0
    last_error: str | None = None

    def add(self, stats: PipelineStats) -> None:
        """Add a stopped engine's final counters."""
        self.processed += stats.processed
        self.captioned += stats.captioned
        self.unchanged += stats.skipped_unchanged
        self.errors += stats.errors
        self.last_error = stats.last_error or self.last_error

    def plus(self, stats: PipelineStats | None) -> _Totals:
        """Return these totals with a running engine's counters added (self is unchanged)."""
        out = dataclasses.replace(self)
        if stats is not None:
            out.add(stats)
        return out


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _at_revision(revision: object) -> str:
    return f" @ {revision[:12]}" if isinstance(revision, str) and revision else ""


def _reload_from_source(config: Config) -> Config:
    return load_config(config.source) if config.source is not None else config


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _model_loaded(captioner: Any) -> bool:
    if captioner is None:
        return False
    for name in ("loaded", "is_loaded"):
        value = getattr(captioner, name, None)
        if callable(value):
            value = value()
        if isinstance(value, bool):
            return value
    return True


def _group(number: int) -> str:
    return f"{number:,}".replace(",", " ")


def _stat(path: Path) -> FileState | None:
    from capwatch.library.scan import sidecar_digest

    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileState(st.st_size, st.st_mtime_ns, sidecar_digest(path))


def _root_trustworthy(root: Path) -> bool:
    """True when ``root`` is a non-empty directory: only then may deletions below it remove index rows."""
    try:
        with os.scandir(root) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


class _Engine:
    """Everything that runs for one configuration: pipeline, watcher, control and backfill threads."""

    def __init__(self, config: Config, roots: tuple[RootConfig, ...], index_path: Path, captioner: Any) -> None:
        self.config = config
        self.roots = roots
        self.index_path = index_path
        self.captioner = captioner
        self.stop_event = threading.Event()
        self.queue = JobQueue(config.watch.queue_size)
        self.inbox: queue.SimpleQueue[WatchEvent] = queue.SimpleQueue()
        self.watcher = Watcher(config.library, config.watch, self.inbox.put, on_overflow=self._overflowed)
        self._last_overflow = 0.0
        self.pipeline = Pipeline(
            self.queue,
            make_processor=self._make_processor,
            open_index=self._open_index,
            batch_size=config.model.batch_size,
            batch_wait_seconds=config.watch.batch_wait_ms / 1000.0,
            idle=self._idle,
            more_coming=self._more_coming,
            requeue=self._requeue,
        )
        self.reconcile_requests: queue.SimpleQueue[RootConfig] = queue.SimpleQueue()
        self.missing: dict[Path, str] = {}
        self.modes: dict[Path, str] = {}
        self.settling = 0
        self.backfill_active = False
        #: Set (once) when the model raised ModelError while captioning: the daemon then drops it.
        self.model_failure: ModelError | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _overflowed(self) -> None:
        # Events were lost: only a reconcile knows what changed. Several warnings arrive per overflow.
        now = time.monotonic()
        if now - self._last_overflow < 5.0:
            return
        self._last_overflow = now
        log.warning("file events were lost (inotify queue overflow); reconciling every root")
        for root in self.roots:
            self.reconcile_requests.put(root)

    def _open_index(self) -> Index:
        return Index.open(self.index_path, busy_timeout=self.config.index.busy_timeout_seconds)

    def _make_processor(self) -> BatchProcessor:
        index = self._open_index()
        if self.captioner is None:
            return IndexOnlyProcessor(self.config, index)
        from capwatch.library.process import Processor, hooks_from_env
        from capwatch.metadata import Journal

        processor: BatchProcessor = Processor(self.config, index, self.captioner, journal=Journal.default(),
                                              hooks=hooks_from_env(os.environ))
        return _ModelGuard(processor, self._model_failed)

    def _model_failed(self, exc: ModelError) -> None:
        if self.model_failure is None:
            log.debug("model failed while captioning: %s", exc)
            self.model_failure = exc

    def _requeue(self, path: Path) -> None:
        # Changed while it was being captioned: through the settler again, so it is read once it is stable.
        root = next((Path(r.path) for r in self.roots if path.is_relative_to(r.path)), path.parent)
        self.inbox.put(WatchEvent("changed", root, path))

    def _more_coming(self) -> bool:
        # Files still settling (a copy in progress) or events not yet looked at: worth waiting for a fuller batch.
        return self.settling > 0 or self.backfill_active or not self.inbox.empty()

    def _idle(self) -> None:
        unload = getattr(self.captioner, "unload_if_idle", None)
        if callable(unload):
            with contextlib.suppress(Exception):
                unload()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.pipeline.start()
        for target, name in ((self._control_loop, "capwatch-control"), (self._backfill_loop, "capwatch-backfill")):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        for root in self.roots:
            self._start_root(root)

    def _start_root(self, root: RootConfig) -> None:
        path = Path(root.path)
        try:
            self.modes[path] = self.watcher.start_root(root)
        except OSError as exc:
            with self._lock:
                if path not in self.missing:
                    log.warning("root %s is not available (%s); will check again every %.0f s", path,
                                exc.strerror or exc, self.config.watch.recheck_missing_seconds)
                self.missing[path] = "missing"
            self.modes.pop(path, None)
            return
        with self._lock:
            self.missing.pop(path, None)
        # Reconcile after the watch is in place, so nothing that changes in between is missed.
        self.reconcile_requests.put(root)

    def recheck_roots(self) -> None:
        """Restart watching (and reconcile) roots that went missing, were replaced, or came back."""
        for root in self.roots:
            path = Path(root.path)
            if self.watcher.healthy(path):
                with self._lock:
                    back = path in self.missing and _root_trustworthy(path)
                    if back:
                        del self.missing[path]
                if back:
                    # Files appeared in a folder that was empty (a mount came back): reconcile it now.
                    log.info("root %s has files again; reconciling", path)
                    self.reconcile_requests.put(root)
                continue
            self.watcher.stop_root(path)
            if os.path.isdir(path):
                if path in self.missing:
                    log.info("root %s is back", path)
                else:
                    log.warning("root %s was replaced or its watch stopped; watching it again", path)
                self._start_root(root)
            else:
                with self._lock:
                    if path not in self.missing:
                        log.warning("root %s disappeared; keeping its index entries until it is back", path)
                    self.missing[path] = "missing"
                self.modes.pop(path, None)

    def stop(self, timeout: float) -> bool:
        self.stop_event.set()
        self.watcher.stop()
        clean = self.pipeline.stop(timeout)
        for thread in self._threads:
            thread.join(timeout)
            clean = clean and not thread.is_alive()
        return clean

    def healthy(self) -> bool:
        return self.pipeline.alive() and all(t.is_alive() for t in self._threads)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("daemon thread failed")

        return run

    # -- control: events -> settler -> queue; moves and deletions ------------------------------------------

    def _control_loop(self) -> None:
        settler = Settler(self.config.watch.settle_seconds, clock=time.monotonic)
        deletions: dict[Path, tuple[float, Path, bool]] = {}  # path -> (due, root, is_dir)
        delay = max(1.0, self.config.watch.settle_seconds)
        index = self._open_index()
        last_delete = 0.0
        try:
            while not self.stop_event.is_set():
                wake = settler.next_check()
                if wake is None:
                    timeout = 0.25
                elif self.queue.free() == 0:
                    # Settled files wait for room in the queue: polling again at once would spin over every
                    # tracked file and starve the model thread of the GIL (10 000 dropped files: 13 s -> 370 s).
                    timeout = 0.05
                else:
                    timeout = min(0.25, max(0.0, wake - time.monotonic()))
                try:
                    first = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    first = None
                events = [first] if first is not None else []
                while len(events) < 10_000:
                    try:
                        events.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                for event in events:
                    if event.kind in ("deleted", "dir_gone"):
                        last_delete = time.monotonic()
                    self._apply(event, settler, deletions, index, delay)
                # Deletions wait until a burst of them is over: `rm -rf root` removes the files before the
                # folder, and only the folder's absence says "the root went away, keep the rows".
                if deletions and time.monotonic() - last_delete >= delay:
                    self._flush_deletions(deletions, index)
                decision = settler.poll(_stat, limit=max(0, self.queue.free()))
                for path in decision.ready:
                    if not self.queue.put_live(path):
                        settler.changed(path, _stat(path), closed=True)  # full after all: try again soon
                self.settling = len(settler)
        finally:
            index.close()

    def _apply(self, event: WatchEvent, settler: Settler, deletions: dict[Path, tuple[float, Path, bool]],
               index: Index, delay: float) -> None:
        if event.kind in ("changed", "closed"):
            deletions.pop(event.path, None)
            # Changed again while waiting in the queue: take it out, it is queued again once settled.
            self.queue.discard(event.path)
            settler.changed(event.path, _stat(event.path), closed=event.kind == "closed")
        elif event.kind == "moved" and event.dest is not None:
            deletions.pop(event.dest, None)
            self.queue.discard(event.path)
            self.queue.discard(event.dest)
            if index.get(event.path) is not None:
                # The caption moves with the file; the settled job then finds the same fingerprint and skips.
                index.move(event.path, event.dest)
            settler.moved(event.path, event.dest, _stat(event.dest))
        elif event.kind == "deleted" and os.path.lexists(event.path):
            # Renamed away and another file put in its place at once: an editor's (or our own) atomic exchange.
            deletions.pop(event.path, None)
            self.queue.discard(event.path)
            settler.changed(event.path, _stat(event.path), closed=True)
        elif event.kind == "deleted":
            settler.forget(event.path)
            self.queue.discard(event.path)
            deletions[event.path] = (time.monotonic() + delay, event.root, False)
        elif event.kind == "dir_gone":
            settler.forget_under(event.path)
            deletions[event.path] = (time.monotonic() + delay, event.root, True)

    def _flush_deletions(self, deletions: dict[Path, tuple[float, Path, bool]], index: Index) -> None:
        now = time.monotonic()
        due = [(p, root, is_dir) for p, (t, root, is_dir) in deletions.items() if t <= now]
        for path, root, is_dir in due:
            del deletions[path]
            if not _root_trustworthy(root):
                # The whole root went (unmounted, removed, emptied): that is not the user deleting photos.
                with self._lock:
                    if root not in self.missing:
                        log.warning("root %s is missing or empty; keeping its index entries", root)
                        self.missing[root] = "missing"
                continue
            if self.queue.is_busy(path):
                deletions[path] = (now + 1.0, root, is_dir)  # recreated and queued: decide later
                continue
            if is_dir:
                doomed = [p for p in index.stat_map(path) if not os.path.lexists(p)]
                if doomed:
                    index.remove_many(doomed)
            elif not os.path.lexists(path):
                index.remove(path)

    # -- backfill: reconcile roots and queue what needs a caption ------------------------------------------

    def _backfill_loop(self) -> None:
        from capwatch.library.scan import reconcile

        index = self._open_index()
        try:
            while not self.stop_event.is_set():
                try:
                    root = self.reconcile_requests.get(timeout=0.25)
                except queue.Empty:
                    continue
                self.backfill_active = True
                try:
                    self._backfill_root(root, index, reconcile)
                finally:
                    self.backfill_active = False
        finally:
            index.close()

    def _backfill_root(self, root: RootConfig, index: Index, reconcile: Callable[..., Any]) -> None:
        def progress(count: int) -> None:
            if self.stop_event.is_set():
                raise _Stop()

        started = time.monotonic()
        try:
            result = reconcile(root, self.config, index, progress=progress)
        except _Stop:
            return
        if result.root_missing:
            with self._lock:
                if Path(root.path) not in self.missing:  # reconcile leaves the telling to us: once per absence
                    log.warning("root %s is %s; keeping its %d indexed images until it is back", root.path,
                                result.root_problem or "missing", result.kept)
                self.missing[Path(root.path)] = "missing or empty"
            return
        log.info("reconciled %s in %.1f s: %d images, %d new, %d changed, %d moved, %d removed; %d to caption",
                 root.path, time.monotonic() - started, result.seen, len(result.new), len(result.changed),
                 len(result.moved), len(result.removed), len(result.to_caption))
        for _path, message in result.errors:
            log.warning("%s", message)
        # Settle writes left unsettled by a killed `capwatch caption`/`scan` (or by this daemon, after an error
        # that had to leave its backup): live writers' entries are locked and left alone.
        from capwatch.library.process import recover_writes

        recover_writes(log)
        todo = list(result.to_caption)
        self.pipeline.note_backfill(todo)
        for path in todo:
            if self.stop_event.is_set() or not self.queue.put_backfill(path, self.stop_event):
                return

    # -- reporting ----------------------------------------------------------------------------------------

    def live_state(self) -> dict[str, Any]:
        stats: PipelineStats = self.pipeline.stats()
        live, backfill, in_flight = self.queue.depth()
        with self._lock:
            missing = sorted(str(p) for p in self.missing)
        return {
            "queue": live + backfill,
            "queue_live": live,
            "queue_backfill": backfill,
            "in_flight": in_flight,
            "settling": self.settling,
            "processed": stats.processed,
            "captioned": stats.captioned,
            "unchanged": stats.skipped_unchanged,
            "errors": stats.errors,
            "last_error": stats.last_error,
            "rate_per_minute": round(stats.rate_per_minute, 2),
            "backfill_done": stats.backfill_done,
            "backfill_total": stats.backfill_total,
            "roots": {str(p): m for p, m in self.watcher.watched().items()},
            "missing_roots": missing,
        }

    def busy(self) -> bool:
        """True while files are queued or in flight."""
        live, backfill, in_flight = self.queue.depth()
        return live + backfill + in_flight > 0

    def status_line(self, processed: int, captioned: int, errors: int) -> str:
        """The STATUS line; the counts are the daemon's since it started (this engine may be younger)."""
        stats = self.pipeline.stats()
        live, backfill, _ = self.queue.depth()
        rate = f"{stats.rate_per_minute:.1f} img/min"
        if stats.backfill_done < stats.backfill_total:
            return f"backfill {_group(stats.backfill_done)} / {_group(stats.backfill_total)}, {rate}"
        watched = len(self.watcher.watched())
        done = f"{_group(captioned)} captioned" if self.captioner is not None else f"{_group(processed)} indexed"
        text = f"watching {watched} root{'s' if watched != 1 else ''}, queue {live + backfill}, {done}, {rate}"
        if errors:
            text += f", {errors} errors"
        if self.missing:
            text += f", {len(self.missing)} root(s) missing"
        return text
