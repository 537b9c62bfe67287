"""onnxruntime sessions that load lazily and can be unloaded when idle.

A daemon may sit idle for hours between photo imports; holding a ViT-GPT2 (or a Florence-2) in memory all that
time costs hundreds of MB. :class:`LazySession` creates its ``InferenceSession`` on first use and drops it on
:meth:`LazySession.unload`; :class:`SessionGroup` does this for all graphs of one model together.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnxruntime as ort

from capwatch.errors import ModelError


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup cpusets respected), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_options(threads: int) -> ort.SessionOptions:
    """Options for one inference session: ``threads`` intra-op threads (0 = all available cores).

    Graph optimisation is fully on; the graph runs sequentially (one inter-op thread): these models are chains of
    matmuls where intra-op parallelism is what pays.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
    return options


class LazySession:
    """One ONNX graph; the session is created on first :meth:`get` and released by :meth:`unload`."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self._threads = threads
        self._session: ort.InferenceSession | None = None

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def get(self) -> ort.InferenceSession:
        """Return the session, loading it if needed. Raises ModelError (one line) when the file cannot load."""
        if self._session is None:
            try:
                self._session = ort.InferenceSession(
                    str(self.path), sess_options=session_options(self._threads), providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelError(f"{self.path}: cannot load ONNX graph: {first}") from None
        return self._session

    def unload(self) -> None:
        self._session = None


class SessionGroup:
    """The graphs of one model, loaded together on first use and unloaded together after ``idle_seconds``.

    Thread-safe: ``unload_if_idle`` may be called from a housekeeping thread while another thread is inside
    :meth:`use` (the unload then waits for it).
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        threads: int,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_load: Callable[[Mapping[str, ort.InferenceSession]], None] | None = None,
    ) -> None:
        self._sessions = {name: LazySession(path, threads) for name, path in paths.items()}
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._last_used = clock()
        self._on_load = on_load

    @property
    def loaded(self) -> bool:
        return any(s.loaded for s in self._sessions.values())

    @contextmanager
    def use(self) -> Iterator[Mapping[str, ort.InferenceSession]]:
        """Yield every session by name (loading them if needed) and mark the group as used now.

        Raises ModelError when a graph cannot be loaded.
        """
        with self._lock:
            was_loaded = all(s.loaded for s in self._sessions.values())
            sessions = {name: s.get() for name, s in self._sessions.items()}
            if not was_loaded and self._on_load is not None:
                self._on_load(sessions)
            try:
                yield sessions
            finally:
                self._last_used = self._clock()

    def unload_if_idle(self, now: float | None = None) -> bool:
        """Unload when unused for ``idle_seconds`` (0 = never). Returns True if something was unloaded."""
        if self._idle_seconds <= 0:
            return False
        # A group that is captioning right now is not idle: do not wait for it.
        if not self._lock.acquire(blocking=False):
            return False
        try:
            current = self._clock() if now is None else now
            if not self.loaded or current - self._last_used < self._idle_seconds:
                return False
            self.unload()
            return True
        finally:
            self._lock.release()

    def unload(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.unload()

    def describe(self) -> dict[str, Any]:
        """Paths and load state, for ``capwatch status``."""
        return {name: {"path": str(s.path), "loaded": s.loaded} for name, s in self._sessions.items()}
