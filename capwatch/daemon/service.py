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
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from capwatch.config import Config, RootConfig, load_config
from capwatch.daemon.engine import Engine
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
from capwatch.daemon.pipeline import PipelineStats
from capwatch.daemon.sdnotify import SystemdNotifier
from capwatch.daemon.watcher import roots_for
from capwatch.errors import CapwatchError, ModelError
from capwatch.library.index import Index
from capwatch.paths import state_dir

log = logging.getLogger(__name__)

__all__ = ["DaemonAlreadyRunning", "SystemdNotifier", "live_state_path", "lock_path", "read_live_state",
           "run_daemon"]

#: Upper bound for finishing the in-flight batch after SIGTERM (systemd's default TimeoutStopSec is 90 s).
STOP_TIMEOUT_SECONDS = 30.0


# -- the daemon -----------------------------------------------------------------------------------------------


def default_captioner_factory(config: Config) -> Any:
    """Open the configured model (pulled into the cache on first use). Raises ModelError."""
    from capwatch.models.captioner import open_captioner
    from capwatch.models.derived import DerivedCache
    from capwatch.models.store import resolve_model

    resolved = resolve_model(config.model, os.environ, download=True)
    # A named model runs the precision that was resolved (and pulled) for it, not whatever else is cached.
    model = dataclasses.replace(config.model, precision=resolved.precision)  # type: ignore[arg-type]
    return open_captioner(resolved.dir, model, model_id=resolved.model_id, revision=resolved.revision,
                          derived=DerivedCache.from_env(os.environ))


def run_daemon(
    config: Config,
    roots: Sequence[RootConfig | Path] | None = None,
    *,
    stop_event: threading.Event | None = None,
    reload: Callable[[], Config] | None = None,
    caption: bool = True,
    captioner_factory: CaptionerFactory | None = None,
    model_override: str | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (main thread only) or ``stop_event``; return the exit code.

    ``roots`` default to ``config.library.roots``. ``reload`` builds the configuration again on SIGHUP (the CLI
    passes one that re-applies its flags; default: reload ``config.source``). ``caption=False`` keeps the index
    in step without loading a model. ``captioner_factory`` opens the model instead of the model store (no
    download then; it is called again with back-off while it raises ModelError). Returns 0 after a clean stop, 1
    when a worker thread crashed. Raises DaemonAlreadyRunning when another daemon holds the index (its subclass
    RootInUse when another daemon watches one of the roots), ModelError for a model name or precision that does
    not exist, IndexUnavailable / ConfigError when start-up fails (one-line messages for the CLI). A model that is
    missing or cannot be opened is no start-up failure: see the module docstring. ``model_override``: the model
    given on the command line or in ``$CAPWATCH_MODEL``, which ``reload`` applies again (published in the live state,
    so `status` does not tell anyone that a reload would switch models).
    """
    daemon = Daemon(config, roots, stop_event=stop_event or threading.Event(), reload=reload, caption=caption,
                    captioner_factory=captioner_factory, model_override=model_override)
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
        model_override: str | None = None,
    ) -> None:
        self.config = config
        self._model_override = model_override
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
        self._engine: Engine | None = None
        self._updates = 0
        # Counters of the engines that already stopped: a reload or the model's arrival restarts the engine, and
        # `capwatch status` counts since the process started.
        self._totals = _Totals()
        self._text_server: Any = None

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
            if not self.config.embed.off:
                from capwatch.daemon.textserver import TextEmbedServer

                # Searches ask this daemon for their query's text embedding instead of loading the model.
                self._text_server = TextEmbedServer(self.config, self.index_path)
                self._text_server.start()
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
            if self._text_server is not None:
                self._text_server.stop()
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
        engine = Engine(self.config, self._locked_roots(), self.index_path,
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

    def _counters(self, engine: Engine | None) -> dict[str, Any]:
        """What the daemon did since the process started: the stopped engines' totals plus the running one's."""
        totals = self._totals.plus(engine.pipeline.stats() if engine is not None else None)
        return {"processed": totals.processed, "captioned": totals.captioned, "unchanged": totals.unchanged,
                "errors": totals.errors, "last_error": totals.last_error}

    def _model_report(self, engine: Engine | None) -> dict[str, Any]:
        """The model's part of the live state: the model that runs (id, revision, precision, as the captioner says,
        whatever the configuration now says) and its state; ``model_status`` is the line STATUS and ``status``
        show."""
        report: dict[str, Any] = {"model_state": "off", "model_status": "captioning off (--no-caption)",
                                  "model_id": None, "model_revision": None, "model_precision": None,
                                  "model_provider": None, "model_progress": None, "model_error": None}
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
                          # As the graphs run (a static int8 image encoder named), once loaded.
                          model_precision=_text(getattr(captioner, "precision_used", None)
                                                or getattr(captioner, "precision", None)),
                          model_provider=_text(getattr(captioner, "provider", None)))
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
            "model_override": self._model_override,
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


