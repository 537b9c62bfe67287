"""onnxruntime sessions that load lazily and can be unloaded when idle.

A daemon may sit idle for hours between photo imports; holding a ViT-GPT2 (or a Florence-2) in memory all that
time costs hundreds of MB. :class:`LazySession` creates its ``InferenceSession`` on first use and drops it on
:meth:`LazySession.unload`; :class:`SessionGroup` does this for all graphs of one model together.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from capwatch.errors import ModelError
from capwatch.models.runtime import ort

log = logging.getLogger(__name__)


#: capwatch's provider names (config ``model.providers``) -> onnxruntime's.
ORT_PROVIDERS: Mapping[str, str] = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider", "openvino": "OpenVINOExecutionProvider",
    "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider", "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider", "cann": "CANNExecutionProvider", "dnnl": "DnnlExecutionProvider",
    "acl": "ACLExecutionProvider", "armnn": "ArmNNExecutionProvider",
}


def short_provider(name: str) -> str:
    """capwatch's short name for an onnxruntime provider name (the name itself when capwatch has none)."""
    return next((short for short, full in ORT_PROVIDERS.items() if full == name), name)


def resolve_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The onnxruntime providers to ask for, and the requested ones this onnxruntime lacks (short names).

    Requested order is kept; the CPU provider is always last (the fallback for any node another provider cannot run,
    and for everything when none of the others is there). ``available`` defaults to onnxruntime's own list.
    """
    have = set(ort.get_available_providers() if available is None else available)
    chosen = [ORT_PROVIDERS[name] for name in requested if ORT_PROVIDERS.get(name) in have]
    missing = [name for name in requested if ORT_PROVIDERS.get(name) not in have]
    chosen = [name for name in dict.fromkeys(chosen) if name != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    return chosen, missing


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core count once), at least 1.

    Matrix kernels gain little from a core's second hardware thread and lose when two sessions' threads share
    cores, so this is the default thread count. Falls back to :func:`available_cores` where the topology is not in
    sysfs.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return available_cores()
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return available_cores()
    return max(1, len(cores))


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cgroup cpusets respected), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: The file name of a graph onnxruntime has already optimised (the derived recipe ``optimized``, see
#: :func:`capwatch.models.derived.optimized_graph`): it loads with graph optimisation off, the work being done.
PREOPTIMIZED_NAME = "graph.ort-optimized.onnx"
#: Its weights, beside it (onnxruntime maps the larger ones into memory in place of copying them).
PREOPTIMIZED_DATA = "graph.ort-optimized.data"
#: The same graph (same weights file) for a process that runs it once or twice: it loads with optimisation off and
#: without onnxruntime's prepacking of weights, which costs more at load than it saves on one query. Present only
#: where the probe showed that unpacked kernels give the same bits (int8 products do; fp32 ones may not).
PREOPTIMIZED_UNPACKED_NAME = "graph.ort-optimized.unpacked.onnx"


def session_options(threads: int, *, spin: bool = True) -> ort.SessionOptions:
    """Options for one inference session: ``threads`` intra-op threads (0 = one per physical core, see
    :func:`physical_cores`).

    Graph optimisation is fully on; the graph runs sequentially (one inter-op thread): these models are chains of
    matmuls where intra-op parallelism is what pays. ``spin=False`` lets the threads sleep as soon as their work
    is done (onnxruntime's ``session.intra_op.allow_spinning`` off): by default they spin-wait for more, which
    keeps the other cores busy for a while after every run.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _return_memory() -> None:
    """Ask glibc to give freed heap memory back to the system.

    A released ViT-GPT2 int8 model leaves its ~300 MB in malloc's free lists (measured: 658 MB while captioning,
    371 MB after the sessions are gone, 97 MB after this), which an idle daemon must not keep. No-op where the C
    library has no ``malloc_trim`` (musl, macOS).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc by its soname: no ldconfig lookup
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class LazySession:
    """One ONNX graph; the session is created on first :meth:`get` and released by :meth:`unload`."""

    def __init__(self, path: Path, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",), *,
                 spin: bool = True) -> None:
        """``providers``: onnxruntime provider names, most wanted first (see :func:`resolve_providers`); ``spin``
        as for :func:`session_options`."""
        self.path = path
        self._threads = threads
        self._providers = list(providers)
        self._spin = spin
        self._session: ort.InferenceSession | None = None

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def get(self) -> ort.InferenceSession:
        """Return the session, loading it if needed. Raises ModelError (one line) when the file cannot load."""
        if self._session is None:
            options = session_options(self._threads, spin=self._spin)
            if self.path.name in (PREOPTIMIZED_NAME, PREOPTIMIZED_UNPACKED_NAME):
                # Optimising again would find nothing left to do, after ~100 ms of looking (a 64 MB text graph).
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if self.path.name == PREOPTIMIZED_UNPACKED_NAME:
                options.add_session_config_entry("session.disable_prepacking", "1")
            try:
                self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=self._providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelError(f"{self.path}: cannot load ONNX graph: {first}") from None
        return self._session

    def unload(self) -> None:
        self._session = None

    @property
    def providers(self) -> list[str]:
        """The providers the loaded session runs on (onnxruntime names), [] when not loaded."""
        return list(self._session.get_providers()) if self._session is not None else []


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
        prepare: Callable[[Mapping[str, Path]], Mapping[str, Path]] | None = None,
        providers: Sequence[str] = ("cpu",),
        no_spin: Collection[str] = (),
    ) -> None:
        """``prepare``, when given, is called once per graph before its first load with those of ``paths`` being
        loaded and returns the graphs to load instead (rewritten ones, see :mod:`capwatch.models.derived`).
        ``on_load`` is called with the sessions of a :meth:`use` that loaded any of them. ``providers``:
        capwatch's short names (config ``model.providers``); those onnxruntime lacks are skipped with one warning at
        the first load. ``no_spin``: the graphs whose threads sleep as soon as a run ends (see
        :func:`session_options`)."""
        self._threads = threads
        self._providers, self._missing = resolve_providers(providers)
        self._no_spin = frozenset(no_spin)
        self._sessions = {name: self._session(name, path) for name, path in paths.items()}
        self._prepare = prepare
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._last_used = clock()
        self._on_load = on_load
        #: The graphs ``prepare`` has been called for (each once, when first used).
        self._prepared: set[str] = set()

    def _session(self, name: str, path: Path) -> LazySession:
        return LazySession(path, self._threads, self._providers, spin=name not in self._no_spin)

    @property
    def loaded(self) -> bool:
        return any(s.loaded for s in self._sessions.values())

    @contextmanager
    def use(self, names: Sequence[str] | None = None) -> Iterator[Mapping[str, ort.InferenceSession]]:
        """Yield the sessions of ``names`` (default: every graph) by name, loading them if needed, and mark the
        group as used now. Graphs not named stay as they are: a model whose text graph answers search queries
        does not load (nor prepare) its vision graph for them.

        Raises ModelError when a graph cannot be loaded, KeyError for a name the group does not have.
        """
        with self._lock:
            wanted = self._prepare_fresh(names)
            if self._missing:
                available = ", ".join(short_provider(p) for p in ort.get_available_providers())
                log.warning("model: %s not available in this onnxruntime (it has: %s); running on %s",
                            ", ".join(self._missing), available, short_provider(self._providers[0]))
                self._missing = []
            was_loaded = all(self._sessions[name].loaded for name in wanted)
            sessions = {name: self._sessions[name].get() for name in wanted}
            if not was_loaded and self._on_load is not None:
                self._on_load(sessions)
            try:
                yield sessions
            finally:
                self._last_used = self._clock()

    def prepare(self, names: Sequence[str]) -> None:
        """Make what the graphs ``names`` will load (the ``prepare`` callable's rewrites) without loading them, so
        that a later process finds it made. Raises what ``prepare`` raises, KeyError for an unknown name."""
        with self._lock:
            self._prepare_fresh(names)

    def _prepare_fresh(self, names: Sequence[str] | None) -> list[str]:
        """Run ``prepare`` once for those of ``names`` (default: every graph) not prepared yet, and give the names
        to use (with every graph at once, the prepared set may name other graphs: a decoder split in two). Call
        with the lock held."""
        wanted = list(self._sessions) if names is None else list(names)
        fresh = [name for name in wanted if name not in self._prepared]
        if self._prepare is not None and fresh:
            prepared = self._prepare({name: self._sessions[name].path for name in fresh})
            made = {name: self._session(name, path) for name, path in prepared.items()}
            if len(fresh) == len(self._sessions):
                self._sessions = made
                fresh = list(made)
                wanted = list(made) if names is None else wanted
            else:
                self._sessions.update(made)
        self._prepared.update(fresh)
        return wanted

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
        """Release every session, and hand the memory back to the system (see :func:`_return_memory`)."""
        with self._lock:
            for session in self._sessions.values():
                session.unload()
            _return_memory()

    @property
    def provider(self) -> str | None:
        """The provider the first graph runs on (capwatch's short name), None when nothing is loaded."""
        for session in self._sessions.values():
            if session.providers:
                return short_provider(session.providers[0])
        return None

    @property
    def first_provider(self) -> str:
        """The provider the sessions will ask for first (onnxruntime's name), loaded or not."""
        return self._providers[0]

    def describe(self) -> dict[str, Any]:
        """Paths, load state and providers in use, for ``capwatch status``."""
        return {name: {"path": str(s.path), "loaded": s.loaded, "providers": [short_provider(p) for p in s.providers]}
                for name, s in self._sessions.items()}


class SessionOwner:
    """What every model object (captioner, embedder, translator) does with its :class:`SessionGroup`
    ``sessions``: release it when idle, say whether and where it runs, close it, and work as a context manager."""

    sessions: SessionGroup

    def unload_if_idle(self, now: float | None = None) -> bool:
        """Release the ONNX sessions when unused for the idle time; True if they were released. ``now`` is a value
        of the owner's clock (time.monotonic by default)."""
        return self.sessions.unload_if_idle(now)

    @property
    def loaded(self) -> bool:
        """True while the ONNX sessions are in memory."""
        return self.sessions.loaded

    @property
    def provider(self) -> str | None:
        """The execution provider the model runs on (cpu, cuda, ...), None while it is not loaded."""
        return self.sessions.provider

    def close(self) -> None:
        """Release the sessions (they load again on the next use)."""
        self.sessions.unload()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
