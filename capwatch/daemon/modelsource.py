"""The daemon's captioning model: found, downloaded and opened in the background, so the daemon never waits for it.

A :class:`ModelSource` stands for the configured model. At start the daemon asks it once, in its own thread and
without touching the network, whether the model is already there (the cache, or the ``--model`` folder) and opens it
at once when it is. Otherwise the daemon indexes without captioning and the source's thread, until it has the model:

* looks again every ``recheck`` seconds: a cache copied in, ``capwatch models pull`` in another shell, a model folder
  on a mount that comes up after the daemon;
* downloads a named model (never with ``$CAPWATCH_OFFLINE``), resuming what an earlier attempt or run left, with
  progress over the whole model;
* after a failure tries again with exponential back-off (30 s, doubling, at most 1 h); no network is a state to
  report, not a reason to exit;
* stops within a second of :meth:`ModelSource.stop` while it waits, and at the next MiB that arrives while it
  downloads (it is a daemon thread: a stalled connection never holds the process up).

The daemon takes the opened captioner with :meth:`ModelSource.take` and reports :meth:`ModelSource.snapshot`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capwatch.config import Config, ModelConfig
from capwatch.errors import ModelError, ModelUnreachable

if TYPE_CHECKING:
    from capwatch.models.registry import ModelSpec
    from capwatch.models.store import ResolvedModel

log = logging.getLogger(__name__)

#: First wait after a failed download or load, and the longest (it doubles in between).
BACKOFF_SECONDS = (30.0, 3600.0)

#: Opens the configured model; returns a captioner (``model_id``, ``revision``, ``loaded``, ``close()``).
CaptionerFactory = Callable[[Config], Any]


class _Cancelled(Exception):
    """Raised from the download's progress callback to end a pull when the source is stopped."""


@dataclass(frozen=True)
class ModelSnapshot:
    """Where the model is, for the live state, ``capwatch status`` and systemd's STATUS.

    ``state``: ``missing`` (not there yet: ``text`` says why and what happens next), ``downloading``, ``loading``
    (opening it), ``error`` (it cannot be downloaded or opened: ``error`` says why; tried again later) or
    ``ready`` (handed to the daemon). ``done``/``total``: bytes of the download (total 0 until the sizes are known).
    """

    state: str
    text: str
    done: int = 0
    total: int = 0
    error: str | None = None


def model_label(model: ModelConfig) -> str:
    """The name the configuration gives the model: its folder (``--model DIR``) or its name."""
    return str(model.dir) if model.dir is not None else model.name


def _identity(model: ModelConfig) -> tuple[object, ...]:
    # What decides which files are the model; the other [model] keys only change how it runs.
    return (model.dir, model.name if model.dir is None else None, model.precision,
            tuple(sorted(model.graph_precision.items())), model.repo, model.revision)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 10e6 else f"{size / 1e6:,.1f} MB"


def _wait_text(seconds: float) -> str:
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{max(0.0, seconds):.0f} s"


class ModelSource:
    """Finds, downloads and opens the model of one configuration; see the module docstring.

    ``factory`` replaces the store (find, pull, open) by one call that opens the model or raises ModelError (tests
    and embedding); it is then tried like a download, with back-off. ``backoff`` is (first, longest) wait in seconds;
    ``recheck`` how often a missing model is looked for again.
    """

    def __init__(
        self,
        config: Config,
        env: Mapping[str, str] = os.environ,
        *,
        factory: CaptionerFactory | None = None,
        backoff: tuple[float, float] = BACKOFF_SECONDS,
        recheck: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._env = env
        self._factory = factory
        self._backoff = (max(0.01, backoff[0]), max(backoff[0], backoff[1]))
        self._recheck = max(0.05, recheck if recheck is not None else config.watch.recheck_missing_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._captioner: Any = None
        self._state = "missing"
        self._reason = f"looking for model {self.label}"
        self._error: str | None = None
        self._retry_at: float | None = None
        self._delay = self._backoff[0]
        # After an error (not a missing network), nothing is tried again before its back-off is over.
        self._hold = False
        self._sizes: dict[str, int] = {}
        self._done: dict[str, int] = {}

    @property
    def label(self) -> str:
        """The model's name or folder, as the configuration gives it."""
        return model_label(self._config.model)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def try_now(self) -> Any:
        """Look for the model once in this thread, never touching the network, and open it when it is there.

        Returns the captioner (the source is then ``ready`` and needs no thread), or None: the model is missing or
        cannot be opened (the snapshot says which; :meth:`start` keeps trying). Raises nothing for the model.
        """
        # A factory is the caller's way of opening the model: call it now, as the daemon always did.
        captioner = self._try(download=self._factory is not None)
        if captioner is not None:
            with self._lock:
                self._state = "ready"
        return captioner

    def start(self) -> None:
        """Start the thread that looks for, downloads and opens the model until it has it (or is stopped)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="capwatch-model-source", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask the thread to stop (a wait ends at once, a download at its next MiB); returns at once."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop the thread and join it for at most ``timeout`` seconds.

        Returns True when it ended; False when it is still inside a network call (it ends on its own, and any model
        it opens then is closed, never handed over).
        """
        self.cancel()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def report_failure(self, message: str) -> None:
        """The captioner taken from this source failed when it ran (a graph onnxruntime cannot load): record
        ``message`` as the model's error and open it again after the back-off (which keeps growing), in the thread.
        """
        self._failed("error", message, message, hold=True, level=logging.ERROR)
        thread = self._thread
        if thread is not None:
            thread.join(1.0)  # it ends right after handing the captioner over
        self._thread = None
        self.start()

    def retry_now(self) -> None:
        """Try again at once rather than after the current back-off (the user fixed something and reloaded)."""
        with self._lock:
            self._retry_at = None
        self._wake.set()

    def same_model(self, model: ModelConfig) -> bool:
        """True when ``model`` names the same files as the source's (other [model] keys may differ)."""
        return _identity(model) == _identity(self._config.model)

    def reconfigure(self, config: Config) -> None:
        """Open the model with ``config``'s settings when it is there (same files: see :meth:`same_model`)."""
        with self._lock:
            self._config = config

    def take(self) -> Any:
        """Return the opened captioner once (the caller then owns it and closes it), else None."""
        with self._lock:
            captioner, self._captioner = self._captioner, None
            return captioner

    def snapshot(self) -> ModelSnapshot:
        """Return where the model is now (consistent; cheap: called every second)."""
        with self._lock:
            state, reason, error = self._state, self._reason, self._error
            done, total = sum(self._done.values()), sum(self._sizes.values())
            retry_at = self._retry_at
        text = reason
        if state == "downloading":
            if total:
                text = f"downloading model {self.label}: {min(100, int(100 * done / total))} % " \
                       f"({_megabytes(done)} of {_megabytes(total)})"
            else:
                text = f"downloading model {self.label}"
        if state in ("missing", "error") and retry_at is not None:
            text += f"; trying again in {_wait_text(retry_at - self._clock())}"
        return ModelSnapshot(state, text, done, total, error)

    # -- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with self._lock:
                retry_at, hold = self._retry_at, self._hold
            # Between network attempts the cache is still looked at (cheap), so a model copied in is found.
            due = retry_at is None or self._clock() >= retry_at
            if due or not hold:
                try:
                    captioner = self._try(download=due)
                except _Cancelled:
                    return
                if captioner is not None:
                    self._hand_over(captioner)
                    return
            with self._lock:
                retry_at = self._retry_at
            wait = self._recheck if retry_at is None else min(self._recheck, retry_at - self._clock())
            self._wake.wait(max(0.01, wait))

    def _try(self, *, download: bool) -> Any:
        """One :meth:`_attempt` whose failure is recorded (state, back-off, one log line). Returns the captioner
        or None. Raises _Cancelled when stopped mid-download."""
        try:
            return self._attempt(download=download)
        except ModelUnreachable as exc:
            self._failed("missing", f"model {self.label} is not downloaded: no network ({exc.problem or exc})",
                         str(exc), hold=False, level=logging.WARNING)
        except ModelError as exc:
            self._failed("error", f"model error: {exc}", f"model error: {exc}", hold=True, level=logging.ERROR)
        return None

    def _failed(self, state: str, text: str, message: str, *, hold: bool, level: int) -> None:
        with self._lock:
            delay = self._delay
            self._delay = min(2 * delay, self._backoff[1])
            self._state, self._reason, self._error, self._hold = state, text, message, hold
            self._retry_at = self._clock() + delay
        log.log(level, "%s; indexing without captions, trying again in %s", message, _wait_text(delay))

    def _hand_over(self, captioner: Any) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._captioner = captioner
                self._state = "ready"
                self._error = None
                return
        # Stopped meanwhile (shutdown, or a reload to another model): nobody will take it.
        with contextlib.suppress(Exception):
            captioner.close()

    def _set(self, state: str, reason: str, *, waiting: bool = False) -> None:
        with self._lock:
            news = waiting and reason != self._reason
            self._state, self._reason = state, reason
            if waiting:
                # Nothing to retry: the model is looked for again every `recheck` seconds.
                self._retry_at, self._hold, self._error = None, False, None
        if news:
            log.warning("%s; indexing without captions meanwhile", reason)

    def _attempt(self, *, download: bool) -> Any:
        """Find the model (and download it when ``download`` and allowed), then open it.

        Returns the captioner, or None when the model is not there yet (the state says why). Raises ModelError when
        it cannot be downloaded or opened (ModelUnreachable: no network), _Cancelled when stopped mid-download.
        """
        with self._lock:
            config = self._config
        if self._factory is not None:
            return self._open_with_factory(config) if download else None
        from capwatch.models.store import find_model, is_offline, model_spec, models_root

        resolved = find_model(config.model, self._env)
        if resolved is None:
            model = config.model
            if model.dir is not None:
                self._set("missing", f"model directory {model.dir} does not exist (yet); captioning starts when "
                                     "it does", waiting=True)
                return None
            if is_offline(self._env):
                name = model.name
                how = f"`capwatch models pull {name}` on a machine with network and copy {models_root(self._env)}" \
                    if model.repo is None else f"capwatch with network access once and copy {models_root(self._env)}"
                self._set("missing", f"model {name} is not downloaded and CAPWATCH_OFFLINE is set: run {how} here, "
                                     "or use --model DIR", waiting=True)
                return None
            if not download:
                return None
            resolved = self._pull(config, model_spec(config.model))
        self._set("loading", f"loading model {self.label}")
        from capwatch.models.captioner import open_captioner
        from capwatch.models.derived import DerivedCache

        # A named model runs the precision that was resolved (and pulled) for it, not whatever else is cached.
        model_config = dataclasses.replace(config.model, precision=resolved.precision)  # type: ignore[arg-type]
        return open_captioner(resolved.dir, model_config, model_id=resolved.model_id, revision=resolved.revision,
                              derived=DerivedCache.from_env(self._env))

    def _open_with_factory(self, config: Config) -> Any:
        assert self._factory is not None
        self._set("loading", f"loading model {self.label}")
        return self._factory(config)

    def _pull(self, config: Config, spec: ModelSpec) -> ResolvedModel:
        """Download ``spec`` (resuming), with progress into the snapshot. Returns where it is. Raises ModelError
        (ModelUnreachable: no network), _Cancelled when stopped."""
        from capwatch.models.registry import REGISTRY
        from capwatch.models.store import pull, wanted_precision

        precision = wanted_precision(spec, config.model)
        with self._lock:
            self._sizes, self._done = {}, {}
            self._state, self._retry_at = "downloading", None
        endpoint = self._env.get("HF_ENDPOINT") or "https://huggingface.co"
        log.info("downloading model %s (%s@%s) from %s; indexing without captions meanwhile", spec.name, spec.repo,
                 spec.revision[:12], endpoint)
        started = self._clock()

        def plan(files: Sequence[tuple[str, int]]) -> None:
            with self._lock:
                self._sizes = dict(files)
                self._done = dict.fromkeys(self._sizes, 0)

        def progress(path: str, done: int, total: int) -> None:
            if self._stop.is_set():
                raise _Cancelled()  # what arrived stays in the staging folder: the next start resumes it
            with self._lock:
                self._done[path] = done

        # The spec goes first: one built from model.repo wins over a registry entry of the same name.
        resolved = pull(spec.name, precision, self._env, progress=progress, on_plan=plan, registry=(spec, *REGISTRY))
        with self._lock:
            total = sum(self._sizes.values())
        log.info("model %s downloaded (%s in %.0f s)", spec.name, _megabytes(total), self._clock() - started)
        return resolved

