"""Rewritten graphs (see :mod:`capwatch.models.rewrite`), made once per source graph and kept in the cache.

The recipes:

* ``split``: a merged ViT-GPT2-style decoder cut into a cross graph (once per image) and a step graph (once per
  token), see :func:`split_decoder`;
* ``s8``: a dynamically quantised graph whose uint8 MatMul weights are turned into int8 ones with the same real
  values (onnxruntime's u8s8 kernels are the fast ones on CPUs with VNNI), see :func:`signed_graph`;
* ``tidy``: a dynamically quantised graph with its attention splits moved before their transposes (exact; see
  :func:`capwatch.models.rewrite.split_before_transpose`) and its quantised convolutions run in fp32 over the same
  integers (exact; :func:`capwatch.models.rewrite.convs_in_float`), and on CPUs with VNNI its weights signed as
  for ``s8`` (``tidy-s8``), see :func:`tidy_graph`;
* ``static``: an image encoder (fp32, or dynamic int8 as published) quantised statically, its activations
  calibrated on photos (:mod:`capwatch.models.staticq`), see :func:`static_graph`;
* ``optimized-<runtime>``: a graph as onnxruntime optimises it when a session loads it, saved, so that a process
  that loads it once per run (``capwatch search``'s text model) skips that work, see :func:`optimized_graph`.

Layout under ``<cache dir>/derived/``::

    sources/<dev>-<ino>.json           the sha256 of a source graph, for the file facts it was computed on (HMAC'd)
    <source sha256>-<recipe>-v<version>/  the rewritten graph(s) and manifest.json (stamped like a pulled model)
    <source sha256>-<recipe>-v<version>.failed   why the rewrite was refused (not retried until the version changes)

A rewrite is used only after a probe showed that it computes what the published graph computes: the same next
tokens (and logits within float noise) for a split decoder, through row reordering and dropping as generation does;
bit-identical outputs for ``s8``, ``tidy`` and ``optimized``; for ``static``, features whose cosine with the
source graph's is at least :data:`STATIC_MIN_COSINE` on every calibration photo as shipped. The rewrite and its
probe run in a child process for graphs above :data:`IN_PROCESS_BYTES`: loading a 600 MB graph as ONNX protobufs
and two sessions at once peaks at several GB, which a long-running daemon should not keep.

The cache is untrusted (it may be shared or copied): a manifest counts only with a stamp made by this user's key
(:mod:`capwatch.models.stamp`), and the sha256 memo of a source is HMAC'd under the same key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import hmac
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capwatch import paths
from capwatch.errors import ModelError
from capwatch.metadata.fsops import sha256_regular
from capwatch.models import cache, probes, stamp
from capwatch.models.probes import ProbeSpec

log = logging.getLogger(__name__)

#: Bump when a rewrite or its probe changes: older results are then made again.
VERSION = 1
#: Recipes whose rewrite changed since VERSION 1 (only their results are made again): tidy 2 also runs the
#: quantised convolutions in fp32 (:func:`capwatch.models.rewrite.convs_in_float`).
RECIPE_VERSIONS = {"tidy": 2, "optimized": 2}
#: Source graphs up to this size are rewritten in the calling process; bigger ones in a child process.
IN_PROCESS_BYTES = 64 << 20
#: Graphs above this size are saved with their weights in a separate file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1536 << 20
_CHILD_TIMEOUT_SECONDS = 3600.0
#: Peak memory of a rewrite per byte of its source graph (measured: a 731 MB fp32 ViT-GPT2 decoder peaks at
#: 3.4 GB, its 185 MB int8 form at 0.93 GB: the protobufs, the rewritten copy, then both graphs' sessions).
PEAK_PER_SOURCE_BYTE = 5


def recipe_version(name: str) -> int:
    """The version of recipe ``name`` (a Job name: ``tidy-s8`` is ``tidy``'s, ``optimized-<runtime>`` is
    ``optimized``'s); :data:`VERSION` unless bumped alone."""
    return RECIPE_VERSIONS.get(name.partition("-")[0], VERSION)


def memory_available(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process could still allocate: the kernel's MemAvailable, lowered by a cgroup v2 memory limit
    (systemd's MemoryMax) when there is one. None when neither can be read (not Linux)."""
    available: int | None = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        relative = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        group = cgroup / relative.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int((group / "memory.current").read_text())
            available = room if available is None else min(available, room)
    except (OSError, ValueError, IndexError):
        pass
    return available
#: The lowest cosine, per photo, between a static int8 image encoder's features and its source graph's.
STATIC_MIN_COSINE = 0.995


#: x86 CPU flags with which onnxruntime's u8s8 kernels accumulate exactly (vpdpbusd into int32); without them its
#: AVX2 kernel pairs products in saturating int16 (vpmaddubsw), which can differ from the published uint8 graph.
_EXACT_U8S8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def signed_is_exact(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CPUs where int8 weights give exactly the uint8 weights' results (and run faster): x86-64 with VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_EXACT_U8S8_FLAGS.intersection(line.partition(":")[2].split()))
    return False


@dataclass(frozen=True)
class DerivedCache:
    """Where rewritten graphs live and the key that stamps them."""

    root: Path
    key: bytes

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DerivedCache | None:
        """The cache under ``paths.cache_dir(env)``, with this user's stamp key; None (after one warning line) when
        the key cannot be read or made, in which case the published graphs run."""
        try:
            return cls(paths.cache_dir(env) / "derived", stamp.local_key(env))
        except ModelError as exc:
            log.warning("running the published graphs: %s", exc)
            return None

    @classmethod
    def existing(cls, env: Mapping[str, str]) -> DerivedCache | None:
        """The cache with this user's stamp key when there is one (read-only commands do not create the key: see
        :func:`capwatch.models.stamp.existing_key`); None when there is none or it is unusable."""
        try:
            key = stamp.existing_key(env)
        except ModelError:
            return None
        return None if key is None else cls(paths.cache_dir(env) / "derived", key)


@dataclass(frozen=True)
class SplitDecoder:
    """A verified split of a merged decoder: ``cross`` runs once per image, ``step`` once per token."""

    cross: Path
    step: Path
    data_outputs: tuple[str, ...]
    shape_outputs: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """One rewrite: ``recipe`` (split | s8 | tidy | static | optimized) of ``source``; ``signed`` also turns uint8
    MatMul weights into int8 (split and tidy; s8 always does). ``probe`` drives a split's probe; ``shapes`` fixes
    input shapes for an s8, tidy or optimized probe (other dimensions: 1 for batch-like names, 3 for the rest);
    ``calibration`` is the .npy file of preprocessed calibration photos [n,3,H,W] of a static graph (every third one
    as shipped: the probe's)."""

    recipe: str
    source: Path
    signed: bool = False
    probe: ProbeSpec | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    calibration: Path | None = None

    @property
    def name(self) -> str:
        if self.recipe == "optimized":
            return f"optimized-{runtime_fingerprint()}"
        return self.recipe + ("-s8" if self.signed and self.recipe in ("split", "tidy") else "")

    def to_json(self) -> dict[str, Any]:
        probe = self.probe
        return {"recipe": self.recipe, "source": str(self.source), "signed": self.signed,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "calibration": None if self.calibration is None else str(self.calibration),
                "probe": None if probe is None else [str(probe.config_path), probe.hidden, probe.start_token]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        probe = data.get("probe")
        calibration = data.get("calibration")
        return cls(str(data["recipe"]), Path(data["source"]), bool(data["signed"]),
                   None if probe is None else ProbeSpec(Path(probe[0]), int(probe[1]), int(probe[2])),
                   {str(k): tuple(int(d) for d in v) for k, v in dict(data.get("shapes", {})).items()},
                   None if calibration is None else Path(calibration))


def split_decoder(source: Path, store: DerivedCache, probe: ProbeSpec, *, signed: bool = False) -> SplitDecoder | None:
    """The verified split pair of the merged decoder ``source``: from the cache, or made, probed and cached now.

    Returns None (after one warning line) when the graph cannot be split or the pair does not match the published
    graph on the probe; the caller then runs the published graph. Raises ModelError only when ``source`` cannot be
    read.
    """
    manifest = _derived(Job("split", source, signed, probe), store)
    if manifest is None:
        return None
    target = Path(manifest["_dir"])
    return SplitDecoder(target / "cross.onnx", target / "step.onnx", tuple(manifest["data_outputs"]),
                        tuple(manifest["shape_outputs"]))


def signed_graph(source: Path, store: DerivedCache, shapes: Mapping[str, tuple[int, ...]]) -> Path | None:
    """``source`` with its uint8 MatMul weights as int8 (same outputs, bit for bit, on the probe): from the cache,
    or made now. None when it has no such weights (quietly) or the probe differs (one warning line). Use only where
    :func:`signed_is_exact`. Raises ModelError only when ``source`` cannot be read."""
    manifest = _derived(Job("s8", source, True, None, dict(shapes)), store)
    return None if manifest is None else Path(manifest["_dir"]) / "graph.onnx"


def tidy_graph(source: Path, store: DerivedCache, shapes: Mapping[str, tuple[int, ...]], *,
               signed: bool) -> Path | None:
    """``source`` with its attention splits before their transposes, its quantised convolutions in fp32 over the
    same integers and, when ``signed`` (only where :func:`signed_is_exact`), its uint8 MatMul weights as int8: the
    same outputs, bit for bit, on the probe. From the cache, or made now. None when there is nothing to change
    (quietly) or the probe differs (one warning line). Raises ModelError only when ``source`` cannot be read."""
    manifest = _derived(Job("tidy", source, signed, None, dict(shapes)), store)
    return None if manifest is None else Path(manifest["_dir"]) / "graph.onnx"


def static_graph(source: Path, store: DerivedCache, pixels: Callable[[], np.ndarray]) -> Path | None:
    """The static int8 form of the image encoder ``source`` (see :mod:`capwatch.models.staticq`): from the cache,
    or made now with activations calibrated on ``pixels()`` (the calibration photos through the model's own
    preprocessing, [n,3,H,W]; called only when the graph is made) and probed (:data:`STATIC_MIN_COSINE`). None
    (after one warning line) when it cannot be made or its features stray. Raises ModelError only when ``source``
    cannot be read."""
    manifest = _derived(Job("static", source), store, calibrate=pixels)
    return None if manifest is None else Path(manifest["_dir"]) / "graph.onnx"


def optimized_graph(source: Path, store: DerivedCache, shapes: Mapping[str, tuple[int, ...]], *,
                    unpacked: bool = False) -> Path | None:
    """``source`` as onnxruntime's optimiser leaves it for this CPU (fused operators, constants folded), saved
    under :data:`capwatch.models.session.PREOPTIMIZED_NAME` (weights beside it, mapped at load) so that it loads
    with optimisation off: the same outputs, bit for bit, on the probe, in a fraction of the load time (see
    :func:`_make_optimized`). ``unpacked`` (a process that runs the graph once or twice): the path that also loads
    without prepacking weights, where the probe showed that this too gives the same bits; else the prepacked one.
    Such a graph may hold kernels only this CPU and this onnxruntime have, so the entry is named for both
    (:func:`runtime_fingerprint`): another machine sharing the cache, or an upgraded onnxruntime, makes its own.
    From the cache, or made now. None when the probe differs (one warning line). Raises ModelError only when
    ``source`` cannot be read."""
    manifest = _derived(Job("optimized", source, False, None, dict(shapes)), store)
    if manifest is None:
        return None
    from capwatch.models.session import PREOPTIMIZED_NAME, PREOPTIMIZED_UNPACKED_NAME

    # Only a file the stamp covers is loaded (the manifest's other fields are not sealed).
    stamped = {entry.get("path") for entry in manifest["files"]}
    name = PREOPTIMIZED_UNPACKED_NAME if unpacked and PREOPTIMIZED_UNPACKED_NAME in stamped else PREOPTIMIZED_NAME
    return Path(manifest["_dir"]) / name


@functools.cache
def runtime_fingerprint(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """12 hex digits naming this onnxruntime version, machine type and CPU feature flags (read once per process:
    every optimized job's name asks for it)."""
    from capwatch.models.runtime import ort

    flags = platform.processor()
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.partition(":")[2].split()))
                break
    facts = f"{ort.__version__}|{platform.machine()}|{flags}"
    return hashlib.sha256(facts.encode()).hexdigest()[:12]


_FALLBACK = {"split": "keeping the published decoder (cross-attention recomputed at every step)",
             "s8": "keeping the published uint8 weights",
             "tidy": "keeping the published graph",
             "static": "keeping the image encoder's dynamic quantisation",
             "optimized": "optimising the graph at every load"}


def _derived(job: Job, store: DerivedCache, *,
             calibrate: Callable[[], np.ndarray] | None = None) -> dict[str, Any] | None:
    """The stamped manifest of ``job``'s result (with ``_dir`` added), made first when missing; None when refused.
    ``calibrate`` gives the calibration pixels of a static graph (saved for the rewrite just before it runs)."""
    try:
        digest = source_digest(job.source, store)
    except OSError as exc:
        raise ModelError(f"{job.source}: cannot read: {exc.strerror or exc}") from None
    name = f"{digest}-{job.name}-v{recipe_version(job.name)}"
    target = store.root / name
    failed = store.root / f"{name}.failed"
    try:
        cache.refuse_links(store.root.parent, target)
        found = _load_manifest(target, store.key)
        if found is not None:
            return found
        if failed.is_file() and not failed.is_symlink():
            return None  # refused before (logged then): not probed again at every start
        store.root.mkdir(parents=True, exist_ok=True)
        with _exclusive(store.root / ".lock"):
            # another capwatch process may have made it while this one waited
            found = _load_manifest(target, store.key)
            if found is not None:
                return found
            # A new entry is the moment to drop those nothing can use any more (they can weigh as much as a model).
            prune(store.root)
            size = job.source.stat().st_size
            needed, available = PEAK_PER_SOURCE_BYTE * size, memory_available()
            if available is not None and needed > available:
                # Not marked as refused: with more memory free (another time, another machine) it is worth it.
                log.info("%s: %s: rewriting it needs about %d MB of memory, %d MB are available", job.source,
                         _FALLBACK[job.recipe], needed >> 20, available >> 20)
                return None
            with _calibration(job, store.root, calibrate) as job:
                if size <= IN_PROCESS_BYTES:
                    make(job, target, store.key)
                else:
                    _make_in_child(job, target, store.key)
            found = _load_manifest(target, store.key)
        if found is None:
            raise _Refused("the rewritten graphs did not verify after they were written")
        return found
    except _Refused as why:
        if isinstance(why, _NothingToDo):
            log.debug("%s: %s", job.source, why)
        else:
            log.warning("%s: %s: %s", job.source, _FALLBACK[job.recipe], why)
        with contextlib.suppress(OSError):
            cache.write_json_atomic(failed, {"format": cache.MARKER_FORMAT, "version": recipe_version(job.name),
                                               "reason": str(why)})
        return None
    except (OSError, ModelError) as exc:
        log.warning("%s: %s: cannot use the cache %s: %s", job.source, _FALLBACK[job.recipe], store.root,
                    getattr(exc, "strerror", None) or exc)
        return None


@contextlib.contextmanager
def _calibration(job: Job, folder: Path, calibrate: Callable[[], np.ndarray] | None) -> Iterator[Job]:
    """``job`` with its calibration pixels saved in a temporary .npy file in ``folder`` (removed after the block)
    when ``calibrate`` is given; else ``job`` as it is."""
    if calibrate is None:
        yield job
        return
    fd, name = tempfile.mkstemp(prefix=".calibration-", suffix=".npy", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.ascontiguousarray(calibrate(), dtype=np.float32))
        yield dataclasses.replace(job, calibration=Path(name))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed, never through a link) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _Refused(Exception):
    """The rewrite or its probe failed; the message says why in a few words."""


class _NothingToDo(_Refused):
    """The graph has nothing this recipe changes (not worth a warning)."""


def make(job: Job, target: Path, key: bytes) -> None:
    """Rewrite ``job.source``, probe the result against it, and publish it at ``target`` with a stamped manifest.

    Raises _Refused (the graph cannot be rewritten, or the probe differs) or OSError.
    """
    import onnx

    from capwatch.models.rewrite import (
        RewriteError,
        convs_in_float,
        signed_weights,
        split_before_transpose,
        split_invariant,
    )

    if job.recipe == "static":
        _make_static(job, target, key)
        return
    if job.recipe == "optimized":
        _make_optimized(job, target, key)
        return
    graphs: dict[str, onnx.ModelProto] = {}
    extra: dict[str, Any] = {}
    try:
        source = onnx.load(str(job.source))
        if job.recipe == "split":
            split = split_invariant(source)
            graphs = {"cross.onnx": split.cross, "step.onnx": split.step}
            extra = {"data_outputs": list(split.data_outputs), "shape_outputs": list(split.shape_outputs)}
            del split
        else:
            graphs = {"graph.onnx": source}
        del source
        if job.recipe == "tidy":
            extra["split_transposes"] = split_before_transpose(graphs["graph.onnx"])
            extra["float_convs"] = convs_in_float(graphs["graph.onnx"])
        if job.signed:
            extra["signed_matmuls"] = sum(signed_weights(g) for g in graphs.values())
    except RewriteError as exc:
        raise _Refused(str(exc)) from None
    except OSError:
        raise  # the cache or the disk, not the graph: tried again next time
    except Exception as exc:  # onnx's and protobuf's own error types, on a graph onnxruntime may still run as is
        raise _Refused(f"cannot rewrite the graph: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    if job.recipe == "s8" and not extra["signed_matmuls"]:
        raise _NothingToDo("no uint8 MatMul weights to sign")
    if job.recipe == "tidy" and not (extra["split_transposes"] or extra["float_convs"]
                                     or extra.get("signed_matmuls")):
        raise _NothingToDo("no split after a transpose, no quantised convolution"
                           + (" and no uint8 MatMul weights to sign" if job.signed else ""))
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        names: list[str] = []
        for name, graph in graphs.items():
            external = graph.ByteSize() > EXTERNAL_DATA_BYTES
            onnx.save_model(graph, str(work / name), save_as_external_data=external, location=f"{name}.data")
            names += [name, f"{name}.data"] if external else [name]
        graphs.clear()  # the protobufs: the probe's sessions need the memory
        if job.recipe == "split":
            assert job.probe is not None
            _probed(probes.split_steps, job.source, work / "cross.onnx", work / "step.onnx",
                    tuple(extra["data_outputs"]), tuple(extra["shape_outputs"]), job.probe)
        else:
            _probed(probes.same_outputs, job.source, work / "graph.onnx", job.shapes)
        files = _json_files(work, names)
        _move_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _write_manifest(job, target, key, files, extra)


def _make_static(job: Job, target: Path, key: bytes) -> None:
    """The ``static`` recipe of :func:`make`: quantise, probe, publish. Raises _Refused or OSError."""
    from capwatch.models import staticq

    if job.calibration is None:
        raise _Refused("no calibration photos")
    pixels = np.load(job.calibration)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            moved = staticq.static_graph(job.source, work / "graph.onnx", pixels, work=work)
        except OSError:
            raise
        except Exception as exc:  # onnx's, onnxruntime's and the dequantiser's own errors
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _Refused(f"cannot quantise the graph statically: {first}") from None
        try:
            cosine = staticq.lowest_cosine(job.source, work / "graph.onnx", pixels[::3], STATIC_MIN_COSINE)
        except staticq.Strayed as exc:
            raise _Refused(str(exc)) from None
        files = _json_files(work, ["graph.onnx"])
        _move_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _write_manifest(job, target, key, files, {"min_cosine": cosine, "split_transposes": moved})


def _make_optimized(job: Job, target: Path, key: bytes) -> None:
    """The ``optimized`` recipe of :func:`make`: let onnxruntime optimise and save, probe, publish. Raises _Refused
    or OSError.

    The weights go to a file of their own (:data:`~capwatch.models.session.PREOPTIMIZED_DATA`), the larger ones at
    page-aligned offsets, which onnxruntime maps into memory instead of parsing and copying them out of the graph:
    a CLIP B/32 int8 text graph (64 MB, a 25 MB token table among them) loaded in 63-91 ms against 131-313 ms
    saved whole (README "Models", the text model of a one-shot search). Where the graph also gives the same bits
    run without prepacked weights, a copy of the (small) graph file is kept under
    :data:`~capwatch.models.session.PREOPTIMIZED_UNPACKED_NAME` for one-shot processes."""
    from capwatch.models.runtime import ort
    from capwatch.models.session import (
        PREOPTIMIZED_DATA,
        PREOPTIMIZED_NAME,
        PREOPTIMIZED_UNPACKED_NAME,
        session_options,
    )

    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        options = session_options(1)
        options.optimized_model_filepath = str(work / PREOPTIMIZED_NAME)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         PREOPTIMIZED_DATA)
        # Small tensors (biases, scales) stay in the graph: one file read beats hundreds of tiny mapped reads.
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(job.source), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise _Refused(f"cannot optimise the graph: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        # The probe loads it as capwatch will: by its name, with optimisation off.
        _probed(probes.same_outputs, job.source, work / PREOPTIMIZED_NAME, job.shapes)
        names = [PREOPTIMIZED_NAME] + [PREOPTIMIZED_DATA] * (work / PREOPTIMIZED_DATA).exists()
        unpacked = work / PREOPTIMIZED_UNPACKED_NAME
        shutil.copyfile(work / PREOPTIMIZED_NAME, unpacked)
        try:
            # Against the prepacked graph just found equal to the source on the same probe (a cheaper load).
            probes.same_outputs(work / PREOPTIMIZED_NAME, unpacked, job.shapes)
            names.append(PREOPTIMIZED_UNPACKED_NAME)
        except (probes.Mismatch, ModelError):
            unpacked.unlink()  # prepacked only: fp32 products unpacked may round differently
        files = _json_files(work, names)
        _move_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _write_manifest(job, target, key, files, {"onnxruntime": ort.__version__})


def _probed(probe: Callable[..., None], *args: Any) -> None:
    """Run one of :mod:`capwatch.models.probes` on ``args``; raise _Refused with its reason when it finds a
    difference."""
    try:
        probe(*args)
    except probes.Mismatch as why:
        raise _Refused(str(why)) from None


def _move_in(work: Path, target: Path) -> None:
    """Put the finished folder ``work`` in place of ``target`` (an older one there is removed first; a link there
    is refused). Raises OSError, or ModelError for a link."""
    if target.exists():
        cache.refuse_links(target.parent, target)
        shutil.rmtree(target)
    os.rename(work, target)


def _write_manifest(job: Job, target: Path, key: bytes, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """Seal the derived folder ``target``: its manifest (recipe, source, files, ``extra``) with the stamp that
    proves it was made here from that source. Raises OSError."""
    manifest = {"format": cache.MARKER_FORMAT, "version": recipe_version(job.name), "recipe": job.name,
                "source": str(job.source), "files": files, **extra}
    manifest["stamp"] = stamp.compute(key, target, job.name, files)
    cache.write_json_atomic(target / "manifest.json", manifest)


def prune(root: Path) -> list[Path]:
    """Remove the entries under ``root`` that no capwatch will use again: made by another version of their recipe,
    optimised for another onnxruntime or CPU, or from a source graph that is gone or has changed since (a model
    updated to a new revision, a folder deleted), and the memo of a source that is gone. Entries whose manifest
    cannot be read are left alone (another process may be writing them). Returns what was removed; raises
    nothing."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    optimized_here = f"optimized-{runtime_fingerprint()}" if any(
        e.name.partition("-")[2].startswith("optimized-") for e in entries) else ""
    for entry in entries:
        path = Path(entry.path)
        name = entry.name
        if entry.is_symlink() or name.startswith("."):
            continue
        recipe, _, version = name.partition("-")[2].rpartition("-v")
        stale = "-v" in name and version.removesuffix(".failed") != str(recipe_version(recipe))
        # Optimised for another onnxruntime (an upgrade) or CPU: this one will not load it again.
        stale = stale or (recipe.startswith("optimized-") and recipe != optimized_here)
        if not stale and entry.is_dir() and name != "sources":
            manifest = cache.read_marker(path / "manifest.json")
            source = manifest.get("source") if manifest is not None else None
            if isinstance(source, str):
                digest = name.split("-", 1)[0]
                stale = not _still_source(Path(source), digest, root)
        if stale:
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    try:
        memos = list(os.scandir(root / "sources"))
    except OSError:
        memos = []
    for memo in memos:
        record = cache.read_marker(Path(memo.path)) if memo.is_file(follow_symlinks=False) else None
        facts = record.get("facts") if record is not None else None
        if isinstance(facts, list) and facts and isinstance(facts[0], str) and not os.path.exists(facts[0]):
            with contextlib.suppress(OSError):
                os.unlink(memo.path)
                removed.append(Path(memo.path))
    return removed


def _still_source(source: Path, digest: str, root: Path) -> bool:
    """True while ``source`` exists and its memo (when the file is unchanged since) still says ``digest``; a changed
    file counts as still the source until it is hashed again (no hashing here)."""
    try:
        st = os.stat(source)
    except OSError:
        return False
    memo = cache.read_marker(root / "sources" / f"{st.st_dev}-{st.st_ino}.json")
    if memo is None or not isinstance(memo.get("facts"), list) or len(memo["facts"]) != 6:
        return True
    if memo["facts"][1:] != [st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]:
        return True
    return memo.get("sha256") == digest


def _load_manifest(target: Path, key: bytes) -> dict[str, Any] | None:
    """The manifest at ``target`` (with ``_dir`` added) when stamped by ``key`` and every file is as stamped."""
    manifest = cache.read_marker(target / "manifest.json")
    recipe = manifest.get("recipe") if manifest is not None else None
    if manifest is None or not isinstance(recipe, str) or manifest.get("version") != recipe_version(recipe):
        return None
    if not stamp.is_valid(key, target, recipe, manifest):
        return None
    if recipe.startswith("split"):
        data, shapes = manifest.get("data_outputs"), manifest.get("shape_outputs")
        if not (isinstance(data, list) and isinstance(shapes, list) and all(isinstance(n, str) for n in data + shapes)):
            return None
    return {**manifest, "_dir": str(target)}


def source_digest(source: Path, store: DerivedCache) -> str:
    """The sha256 of ``source``, from the memo when the file is unchanged since it was hashed (no re-read of a
    600 MB graph at every start). Raises OSError when the file cannot be read."""
    st = os.stat(source)
    facts = [os.path.realpath(source), st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    memo = store.root / "sources" / f"{st.st_dev}-{st.st_ino}.json"
    recorded = cache.read_marker(memo)
    if (recorded is not None and recorded.get("facts") == facts and isinstance(recorded.get("sha256"), str)
            and hmac.compare_digest(str(recorded.get("mac", "")), _memo_mac(store.key, facts, recorded["sha256"]))):
        return str(recorded["sha256"])
    # Through symlinks on purpose: a Hugging Face cache's graphs are links into its blobs folder.
    with open(source, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256").hexdigest()
    with contextlib.suppress(OSError, ModelError):
        cache.refuse_links(store.root.parent, memo)
        mac = _memo_mac(store.key, facts, sha)
        cache.write_json_atomic(memo, {"format": cache.MARKER_FORMAT, "facts": facts, "sha256": sha, "mac": mac})
    return sha


def _memo_mac(key: bytes, facts: list[Any], sha: str) -> str:
    message = json.dumps({"facts": facts, "sha256": sha}, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _make_in_child(job: Job, target: Path, key: bytes) -> None:
    """Run :func:`make` in a child process; the job and the stamp key go through its stdin, never its argv."""
    request = json.dumps({"job": job.to_json(), "target": str(target), "key": key.hex()})
    try:
        done = subprocess.run([sys.executable, "-m", "capwatch.models.derived"], input=request, capture_output=True,
                              text=True, timeout=_CHILD_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _Refused(f"the rewrite process failed: {exc}") from None
    if done.returncode == 3:
        raise _NothingToDo(done.stderr.strip())
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise _Refused(lines[-1] if lines else f"the rewrite process exited with {done.returncode}")


def _main() -> int:
    """Child-process entry: one JSON request on stdin (job, target, key); exit 0 made, 3 nothing to do, 1 refused."""
    try:
        request = json.loads(sys.stdin.readline())
        make(Job.from_json(request["job"]), Path(request["target"]), bytes.fromhex(request["key"]))
    except _NothingToDo as exc:
        print(str(exc), file=sys.stderr)
        return 3
    except (_Refused, ModelError, OSError, ValueError, KeyError, TypeError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


def _json_files(directory: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """Manifest entries (path, size, sha256) of ``names``' files in ``directory``; raises OSError when one is
    unreadable."""
    entries = []
    for name in names:
        path = directory / name
        sha = sha256_regular(path)
        if sha is None:
            raise OSError(f"{path} is not a regular file")
        entries.append({"path": name, "size": path.stat().st_size, "sha256": sha})
    return entries


if __name__ == "__main__":
    sys.exit(_main())
