"""One configuration's running parts: watcher, settler, pipeline, and the control and backfill threads.

The :class:`~capwatch.daemon.service.Daemon` builds an :class:`Engine` for its configuration and builds a new one on
a reload or when the model arrives; everything a run must keep across engines (locks, counters, the model source)
stays in the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch.config import Config, RootConfig
from capwatch.daemon.pipeline import BatchProcessor, JobQueue, Outcome, Pipeline, PipelineStats
from capwatch.daemon.settle import FileState, Settler
from capwatch.daemon.watcher import Watcher, WatchEvent
from capwatch.errors import ModelError
from capwatch.library.index import Index, normalise_path
from capwatch.metadata.mp4 import looks_complete

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        """Close the index (the pipeline calls this on the model thread when it ends)."""
        self._index.close()

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

    def decode_ahead(self, paths: Sequence[Path]) -> None:
        """Start decoding ``paths`` while the model works on the batch before them (see Processor.decode_ahead)."""
        ahead = getattr(self._processor, "decode_ahead", None)
        if callable(ahead):
            ahead(paths)

    def close(self) -> None:
        """Stop the processor's decode thread and close its index (the pipeline calls this on the model thread
        when it ends)."""
        close = getattr(self._processor, "close", None)
        if callable(close):
            close()
        index = getattr(self._processor, "index", None)
        if index is not None:
            index.close()


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


class Engine:
    """Everything that runs for one configuration: pipeline, watcher, control and backfill threads."""

    def __init__(self, config: Config, roots: tuple[RootConfig, ...], index_path: Path, captioner: Any) -> None:
        self.config = config
        self.roots = roots
        self.index_path = index_path
        self.captioner = captioner
        #: The image embedder (search by meaning), opened with the first processor; None when off/unavailable.
        self.embedder: Any = None
        #: The translation models of [language], opened with the processor (None: English alone).
        self.translations: Any = None
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
        from capwatch.models.languages import open_translations

        if self.embedder is None:
            from capwatch.library.embed import open_embedder_if_available

            # Never a download from the daemon's model thread: `capwatch models pull` or a scan fetches it.
            self.embedder = open_embedder_if_available(self.config, download=False)
        # The translation models of [language] (pulled here on first use unless offline): a missing one stops the
        # daemon with one line, as a missing captioning model does.
        self.translations = open_translations(self.config, os.environ, download=True)
        processor: BatchProcessor = Processor(self.config, index, self.captioner, journal=Journal.default(),
                                              hooks=hooks_from_env(os.environ), embedder=self.embedder,
                                              translations=self.translations)
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
        for model in (self.captioner, self.embedder, self.translations):
            unload = getattr(model, "unload_if_idle", None)
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
        settler = Settler(self.config.watch.settle_seconds, clock=time.monotonic, complete=looks_complete)
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
