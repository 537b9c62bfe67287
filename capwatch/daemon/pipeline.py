"""The daemon's job pipeline: a bounded queue, a prepare stage and a model stage, all stoppable and joined.

``settled path ─► JobQueue (live before backfill, dedup) ─► prepare thread (stat, skip check by fingerprint,
read-ahead) ─► hand-off (one batch) ─► model thread (Processor.process_batch) ─► stats``

A path is *in flight* from the moment a batch is taken until the model thread is done with it; a path that
changes again meanwhile is parked and re-queued afterwards, so the skip check runs only after the previous
index upsert. That is how our own metadata writes are recognised: the processor records the fingerprint after
writing, the write's events settle into a new job, and the prepare stage finds the same fingerprint in the
index and drops the job without captioning again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from capwatch.library.index import Index
from capwatch.metadata.safeopen import open_file

log = logging.getLogger(__name__)

#: Rows in these states are finished: an unchanged file in one of them is never processed again by the daemon.
DONE_STATUSES = frozenset({"captioned", "described", "error"})


class Outcome(Protocol):
    """What the pipeline reads from one processed file (``capwatch.library.outcomes.FileOutcome`` fits)."""

    @property
    def path(self) -> Path: ...
    @property
    def error(self) -> str | None: ...
    @property
    def skipped(self) -> str | None: ...
    @property
    def changed(self) -> bool: ...


class BatchProcessor(Protocol):
    """Anything that processes a batch of files end to end (``capwatch.library.process.Processor`` fits)."""

    def process_batch(self, paths: Sequence[Path]) -> Sequence[Outcome]: ...


class JobQueue:
    """Bounded, de-duplicating queue of paths with two classes: live events are always taken before backfill.

    Thread-safe. ``capacity`` bounds live + backfill together; a put into a full queue waits (backfill) or is
    refused (live, the caller keeps the path and retries), which is the pipeline's backpressure.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        # Backfill may fill at most three quarters, so live events always find room and jump ahead.
        self._backfill_capacity = max(1, self._capacity - max(1, self._capacity // 4))
        self._live: collections.OrderedDict[Path, None] = collections.OrderedDict()
        self._backfill: collections.OrderedDict[Path, None] = collections.OrderedDict()
        self._in_flight: set[Path] = set()
        self._parked: set[Path] = set()
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._live) + len(self._backfill)

    def depth(self) -> tuple[int, int, int]:
        """Return ``(live, backfill, in flight)`` counts."""
        with self._cond:
            return len(self._live), len(self._backfill), len(self._in_flight)

    def free(self) -> int:
        """Return how many more paths fit right now."""
        with self._cond:
            return max(0, self._capacity - len(self._live) - len(self._backfill))

    def put_live(self, path: Path) -> bool:
        """Queue ``path`` ahead of all backfill. Returns False (not queued) only when the queue is full.

        A path already queued as backfill is promoted; one in flight is parked and re-queued when done.
        """
        with self._cond:
            if path in self._in_flight:
                self._parked.add(path)
                return True
            if path in self._live:
                return True
            if path in self._backfill:
                del self._backfill[path]
                self._live[path] = None
                return True
            if len(self._live) + len(self._backfill) >= self._capacity:
                return False
            self._live[path] = None
            self._cond.notify_all()
            return True

    def put_backfill(self, path: Path, stop: threading.Event) -> bool:
        """Queue ``path`` behind live events, waiting while the queue is full.

        Returns False when ``stop`` was set or the queue closed before there was room.
        """
        with self._cond:
            if path in self._live or path in self._backfill or path in self._in_flight:
                return True
            while (len(self._live) + len(self._backfill) >= self._capacity
                   or len(self._backfill) >= self._backfill_capacity):
                if stop.is_set() or self._closed:
                    return False
                self._cond.wait(0.2)
            if stop.is_set() or self._closed:
                return False
            self._backfill[path] = None
            self._cond.notify_all()
            return True

    def discard(self, path: Path) -> bool:
        """Drop ``path`` if it is waiting (deleted or changed again). Returns True when it was queued."""
        with self._cond:
            self._parked.discard(path)
            if self._live.pop(path, 0) is None or self._backfill.pop(path, 0) is None:
                self._cond.notify_all()
                return True
            return False

    def is_busy(self, path: Path) -> bool:
        """Return True when ``path`` is queued or in flight."""
        with self._cond:
            return path in self._in_flight or path in self._live or path in self._backfill

    def take_batch(self, max_items: int, wait_seconds: float, stop: threading.Event,
                   more_coming: Callable[[], bool] | None = None) -> list[Path]:
        """Take up to ``max_items`` paths (live first) and mark them in flight.

        Blocks until at least one path is queued, then waits up to ``wait_seconds`` for the batch to fill —
        but not when ``more_coming`` says nothing else is on its way (a lone photo is not kept waiting).
        Returns an empty list when ``stop`` is set or the queue is closed.
        """
        with self._cond:
            while not (self._live or self._backfill):
                if stop.is_set() or self._closed:
                    return []
                self._cond.wait(0.2)
            deadline = time.monotonic() + wait_seconds
            while len(self._live) + len(self._backfill) < max_items:
                if stop.is_set() or self._closed:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (more_coming is not None and not more_coming()):
                    break
                self._cond.wait(min(remaining, 0.05) if more_coming is not None else remaining)
            if stop.is_set() or self._closed:
                return []
            batch: list[Path] = []
            for source in (self._live, self._backfill):
                while source and len(batch) < max_items:
                    path, _ = source.popitem(last=False)
                    batch.append(path)
            self._in_flight.update(batch)
            self._cond.notify_all()
            return batch

    def done(self, paths: Sequence[Path]) -> None:
        """Mark ``paths`` finished; any of them changed while in flight go back to the live queue."""
        with self._cond:
            for path in paths:
                self._in_flight.discard(path)
                if path in self._parked:
                    self._parked.discard(path)
                    self._live[path] = None  # may exceed capacity by the parked few: never lose a change
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter; later takes return nothing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class PipelineStats:
    """A snapshot of what the pipeline did since it started."""

    processed: int
    captioned: int
    skipped_unchanged: int
    errors: int
    rate_per_minute: float
    backfill_total: int
    backfill_done: int
    last_error: str | None


class _Counters:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.processed = 0
        self.captioned = 0
        self.skipped_unchanged = 0
        self.errors = 0
        self.backfill_total = 0
        self.backfill_done = 0
        self.last_error: str | None = None
        # Completion times of recent files, for a rate over the last few minutes (bounded).
        self.recent: collections.deque[float] = collections.deque(maxlen=4096)


class Pipeline:
    """Runs the prepare and model threads over a :class:`JobQueue`.

    ``make_processor`` is called once, on the model thread (the index connection it uses is
    thread-affine); ``open_index`` opens the prepare thread's own connection. ``start`` starts both threads,
    ``stop`` stops and joins them; an in-flight batch is finished unless it takes longer than the join bound.
    """

    def __init__(
        self,
        queue: JobQueue,
        *,
        make_processor: Callable[[], BatchProcessor],
        open_index: Callable[[], Index],
        batch_size: int,
        batch_wait_seconds: float,
        idle: Callable[[], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
        requeue: Callable[[Path], None] | None = None,
        force: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self._make_processor = make_processor
        self._open_index = open_index
        self._batch_size = max(1, batch_size)
        self._batch_wait = max(0.0, batch_wait_seconds)
        self._idle = idle
        self._more_coming = more_coming
        self._requeue = requeue
        self._force = force
        self._stop = threading.Event()
        self._handoff: collections.deque[tuple[list[Path], list[Path]]] = collections.deque()
        self._handoff_cond = threading.Condition()
        #: The processor's decode_ahead, once the model thread has made it (None: the processor has none).
        self._decode_ahead: Callable[[Sequence[Path]], None] | None = None
        self._counters = _Counters(clock)
        self._backfill_paths: set[Path] = set()
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the prepare and model threads; returns once the model thread has its processor.

        Raises whatever ``make_processor`` raised (e.g. ModelError), after joining the threads.
        """
        self._threads = [
            threading.Thread(target=self._guarded(self._prepare_loop), name="capwatch-prepare", daemon=True),
            threading.Thread(target=self._guarded(self._model_loop), name="capwatch-model", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        if self._failure is not None:
            self.stop()
            raise self._failure

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking work, finish the in-flight batch and join both threads.

        Returns False when a thread was still busy after ``timeout`` seconds (its batch is abandoned; every
        write is atomic, so nothing is half-written).
        """
        self._stop.set()
        self.queue.close()
        with self._handoff_cond:
            self._handoff_cond.notify_all()
        deadline = time.monotonic() + timeout
        clean = True
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not finish within %.0f s; abandoning its batch", thread.name, timeout)
                clean = False
        return clean

    def alive(self) -> bool:
        """Return True while both threads run (False after a crash or stop)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def failure(self) -> BaseException | None:
        """The exception that ended a thread, if any."""
        return self._failure

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a crashed thread must stop the daemon, not hang it
                log.exception("pipeline thread failed")
                self._failure = exc
                self._stop.set()
                self.queue.close()
                self._ready.set()
                with self._handoff_cond:
                    self._handoff_cond.notify_all()

        return run

    # -- accounting --------------------------------------------------------------------------------

    def note_backfill(self, paths: Sequence[Path]) -> None:
        """Count ``paths`` as backfill work for progress reporting (before queueing them)."""
        with self._counters.lock:
            self._counters.backfill_total += len(paths)
            self._backfill_paths.update(paths)

    def stats(self) -> PipelineStats:
        """Return a consistent snapshot of the counters; the rate covers the last five minutes."""
        c = self._counters
        with c.lock:
            now = c.clock()
            window = [t for t in c.recent if now - t <= 300.0]
            # At least 10 s of span, so the first file of a quiet day does not read as thousands per minute.
            span = max(10.0, now - window[0]) if window else 60.0
            rate = len(window) * 60.0 / span if window else 0.0
            return PipelineStats(c.processed, c.captioned, c.skipped_unchanged, c.errors, rate,
                                 c.backfill_total, c.backfill_done, c.last_error)

    def _count(self, paths: Sequence[Path], outcomes: Sequence[Outcome], unchanged: Sequence[Path]) -> None:
        c = self._counters
        with c.lock:
            now = c.clock()
            for outcome in outcomes:
                if outcome.changed:
                    continue  # read again once it settles: counted when that pass is done
                c.processed += 1
                c.recent.append(now)
                if outcome.error:
                    c.errors += 1
                    c.last_error = outcome.error
                elif not outcome.skipped:
                    c.captioned += 1
            c.skipped_unchanged += len(unchanged)
            for path in paths:
                if path in self._backfill_paths:
                    self._backfill_paths.discard(path)
                    c.backfill_done += 1

    # -- threads -----------------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        index = self._open_index()
        try:
            while not self._stop.is_set():
                batch = self.queue.take_batch(self._batch_size, self._batch_wait, self._stop, self._more_coming)
                if not batch:
                    continue
                todo, unchanged = self._prepare(index, batch)
                with self._handoff_cond:
                    ahead = self._decode_ahead
                if ahead is not None and todo:
                    # Decoded on the processor's own thread while the model works on the batch before this one;
                    # asked before the hand-off, so the model thread never reaches a file before its decode is.
                    ahead(todo)
                with self._handoff_cond:
                    # One batch prepared ahead of the model hides the I/O; more would only hold memory.
                    while self._handoff and not self._stop.is_set():
                        self._handoff_cond.wait(0.2)
                    if self._stop.is_set():
                        self.queue.done(batch)
                        return
                    self._handoff.append((batch, todo))
                    self._handoff_cond.notify_all()
                if unchanged:
                    self._count(unchanged, [], unchanged)
        finally:
            index.close()

    def _prepare(self, index: Index, batch: list[Path]) -> tuple[list[Path], list[Path]]:
        """Split ``batch`` into files to process and files that are unchanged since the index saw them."""
        todo: list[Path] = []
        unchanged: list[Path] = []
        for path in batch:
            try:
                st = os.stat(path)
            except OSError:
                continue  # deleted since it settled: the delete event handles the row
            if not self._force and self._unchanged(index, path, st):
                unchanged.append(path)
                continue
            _read_ahead(path)
            todo.append(path)
        return todo, unchanged

    def _unchanged(self, index: Index, path: Path, st: os.stat_result) -> bool:
        from capwatch.library.index import IndexedState
        from capwatch.library.scan import sidecar_digest
        from capwatch.metadata import fingerprint_file

        record = index.get(path)
        if record is None or record.status not in DONE_STATUSES:
            return False
        sidecars = sidecar_digest(path)
        recorded = IndexedState(record.size, record.mtime_ns, record.ctime_ns, record.sidecars)
        if not recorded.differs(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sidecars):
            return True
        if not record.fingerprint or recorded.sidecars != sidecars:
            return False  # a sidecar changed: the description may have, even if the image did not
        try:
            fingerprint = fingerprint_file(path)
        except OSError:
            return False
        if fingerprint != record.fingerprint:
            return False
        # Same content, new stat (a touch, a chmod, a copy over itself): record the state so the next reconcile
        # does not open the file again.
        index.update_stat(record.path, IndexedState(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sidecars),
                          record.fingerprint)
        return True

    def _model_loop(self) -> None:
        try:
            processor = self._make_processor()
            ahead = getattr(processor, "decode_ahead", None)
            with self._handoff_cond:
                self._decode_ahead = ahead if callable(ahead) else None
        finally:
            self._ready.set()
        try:
            self._run_batches(processor)
        finally:
            # The processor's index connection belongs to this thread: close it here, where sqlite3 allows it
            # (and so that the index keeps the WAL files read-only readers need).
            close = getattr(processor, "close", None)
            if callable(close):
                close()

    def _run_batches(self, processor: BatchProcessor) -> None:
        while True:
            with self._handoff_cond:
                while not self._handoff and not self._stop.is_set():
                    if not self._handoff_cond.wait(1.0) and self._idle is not None:
                        self._idle()
                if not self._handoff:
                    return
                if self._stop.is_set():
                    # Stop requested: drop the queued batch; the in-flight one (below) is finished.
                    batch, _ = self._handoff.popleft()
                    self.queue.done(batch)
                    return
                batch, todo = self._handoff.popleft()
                self._handoff_cond.notify_all()
            try:
                started = time.monotonic()
                outcomes = processor.process_batch(todo) if todo else []
                seconds = time.monotonic() - started
                self._count(batch, outcomes, [])
                self._report(outcomes, seconds)
            finally:
                self.queue.done(batch)

    def _report(self, outcomes: Sequence[Outcome], seconds: float = 0.0) -> None:
        """Log one INFO line per file the model captioned (path, its share of the batch's ``seconds``, caption) and
        one WARNING per failure (nowhere else), and send files that changed while being captioned back to be read
        again. Skipped files are logged at DEBUG only."""
        from capwatch.library.outcomes import ALREADY_CAPTIONED

        captioned = {id(o) for o in outcomes if _model_captioned(o, ALREADY_CAPTIONED)}
        # The model runs a batch at once: each file's time is its share of the batch.
        each = seconds / len(captioned) if captioned else 0.0
        for outcome in outcomes:
            if outcome.error:
                log.warning("%s", outcome.error)
            elif outcome.changed:
                log.info("%s", outcome.skipped or f"{outcome.path}: changed while being captioned; queued again")
                if self._requeue is not None:
                    self._requeue(outcome.path)
            elif id(outcome) in captioned:
                note = f" ({outcome.skipped})" if outcome.skipped else ""
                log.info("captioned %s in %.1f s: %s%s", outcome.path, each, getattr(outcome, "caption", ""), note)
            elif outcome.skipped:
                log.debug("%s: %s", outcome.path, outcome.skipped)
        if outcomes:
            log.debug("batch of %d file(s) done in %.2f s", len(outcomes), seconds)


def _model_captioned(outcome: Outcome, already: str) -> bool:
    """True when the model made ``outcome``'s caption just now (``already``: the skip note of a file that carried
    one before)."""
    caption = getattr(outcome, "caption", None)  # index-only outcomes have none
    return bool(caption) and not outcome.error and not outcome.changed and outcome.skipped != already


def _read_ahead(path: Path) -> None:
    # Ask the kernel to start reading the file now, so the model thread's decode finds it in the page cache
    # (matters on spinning disks and network mounts). Purely advisory.
    with contextlib.suppress(OSError, AttributeError):
        fd = open_file(path)  # never blocks: a FIFO swapped in for the photo is refused here, not waited on
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
