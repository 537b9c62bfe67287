"""Image–text embeddings (search by meaning): CLIP and SigLIP models in the transformers.js ONNX layout.

A model folder holds ``config.json`` (``model_type`` ``clip`` or ``siglip``; SigLIP 2's fixed-resolution
checkpoints are ``siglip`` too), ``preprocessor_config.json``, ``tokenizer.json`` (+ ``tokenizer_config.json``,
``special_tokens_map.json``) and two graphs, ``onnx/vision_model<suffix>.onnx`` and ``onnx/text_model<suffix>.onnx``
(suffix ``""`` fp32, ``_quantized`` int8, ``_fp16``), with the tensors transformers.js's conversion exports:

========  ======================================  ============================================
family    vision_model                             text_model
========  ======================================  ============================================
clip      ``pixel_values`` -> ``image_embeds``     ``input_ids``, ``attention_mask`` -> ``text_embeds``
siglip    ``pixel_values`` -> ``pooler_output``    ``input_ids`` -> ``pooler_output``
========  ======================================  ============================================

``image_embeds`` / ``text_embeds`` (CLIP) and SigLIP's ``pooler_output`` are what transformers'
``get_image_features`` / ``get_text_features`` return; the embedder L2-normalises them, so the dot product of two
vectors is their cosine. Images are preprocessed from ``preprocessor_config.json`` by
:class:`capwatch.models.preprocess.Preprocessor` (CLIPImageProcessor: shortest-edge resize + center crop;
SiglipImageProcessor: fixed-size resize; both rescale + normalise as transformers' slow processors), text by
:class:`capwatch.models.embedtext.EmbeddingTokenizer`.

:func:`open_embedder` turns ``[embed] model`` (a registry name, a directory, or "off") into an
:class:`ImageTextEmbedder`; sessions load on first use and unload when idle, like the captioner's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from capwatch.config import Config, EmbedConfig, ModelConfig, Precision
from capwatch.errors import ImageError, ModelError
from capwatch.models.derived import DerivedCache, optimized_graph, signed_graph, signed_is_exact, source_digest
from capwatch.models.embedtext import EmbeddingTokenizer
from capwatch.models.layout import check_names, find_onnx, read_json
from capwatch.models.preprocess import Preprocessor
from capwatch.models.runtime import ort
from capwatch.models.session import SessionGroup, SessionOwner

EmbedFamily = Literal["clip", "siglip"]
VISION = "vision_model"
TEXT = "text_model"
GRAPHS = (VISION, TEXT)

#: The output each family's graphs give the features in (transformers.js's export names).
_OUTPUTS: Mapping[EmbedFamily, tuple[str, str]] = {
    "clip": ("image_embeds", "text_embeds"),
    "siglip": ("pooler_output", "pooler_output"),
}
#: What the graphs may produce besides the features (the exports also give the last hidden state).
_OTHER_OUTPUTS = ("last_hidden_state", "pooler_output", "image_embeds", "text_embeds")


@dataclass(frozen=True)
class EmbedModelFiles:
    """Where an embedding model's files are and what identifies its vectors."""

    dir: Path
    #: The repository (registry models) or the folder name (a local directory).
    source: str
    #: The commit the files came from, None for a local directory not pulled by capwatch.
    revision: str | None
    #: The precision asked for ("auto" lets the folder decide, see :func:`available_precision`).
    precision: str
    #: The registry name, None for a local directory.
    name: str | None


def family_of(config: Mapping[str, Any], where: Path) -> EmbedFamily:
    """The embedding family of a config.json (``model_type`` clip or siglip). Raises ModelError otherwise."""
    model_type = config.get("model_type")
    if model_type in ("clip", "siglip"):
        return "clip" if model_type == "clip" else "siglip"
    raise ModelError(f"{where / 'config.json'}: model_type {model_type!r} is not an image–text embedding model "
                     "(supported: clip, siglip)")


def available_precision(directory: Path) -> Precision:
    """The best precision the folder has both graphs for: fp32 (the reference), then int8, then fp16. Raises
    ModelError (one line, naming what is there) when no precision is complete."""
    for precision in ("fp32", "int8", "fp16"):
        try:
            for stem in GRAPHS:
                find_onnx(directory, stem, precision)
        except ModelError:
            continue
        return precision
    find_onnx(directory, VISION, "fp32")  # raises the one-line "no such graph" error
    find_onnx(directory, TEXT, "fp32")
    raise ModelError(f"{directory}: no complete pair of vision_model / text_model graphs")  # pragma: no cover


class ImageTextEmbedder(SessionOwner):
    """One embedding model folder: images and texts -> L2-normalised float32 vectors in one space.

    Not thread-safe for concurrent embedding (one worker embeds at a time); ``unload_if_idle`` may be called from
    another thread.
    """

    def __init__(
        self,
        files: EmbedModelFiles,
        *,
        threads: int = 0,
        providers: Sequence[str] = ("cpu",),
        idle_unload_seconds: float = 300.0,
        batch_size: int = 8,
        clock: Callable[[], float] = time.monotonic,
        derived: DerivedCache | None = None,
        digests: DerivedCache | None = None,
        load_text: bool = False,
    ) -> None:
        """Read the folder's configs and tokenizer and locate its graphs (nothing is loaded yet, unless
        ``load_text``: the text graph then starts loading on another thread, so that a one-shot search opens its
        index and reads its codes meanwhile; onnxruntime's session setup holds the GIL for much of its time, so
        what overlaps it best is work that releases the GIL, as SQLite's page reads do; and it loads without
        prepacked weights where that gives the same bits, see :func:`capwatch.models.derived.optimized_graph`).

        ``derived``: where rewritten graphs are cached (:mod:`capwatch.models.derived`): int8 graphs then run with
        signed weights on CPUs where that is exact and faster (VNNI), as the captioner's do; None runs the
        published graphs as they are. ``digests``: where the sha256 of a directory model's graphs are memoised for
        :attr:`model_id` (default ``derived``; None hashes them on first access in every process).

        Raises ModelError (one line, naming the file) for a missing or invalid file, an unsupported model type or a
        precision the folder does not have.
        """
        directory = files.dir
        if not directory.is_dir():
            raise ModelError(f"embedding model directory {directory} does not exist")
        self.files = files
        self.dir = directory
        self.config = read_json(directory / "config.json")
        self.family: EmbedFamily = family_of(self.config, directory)
        try:
            self.preprocessor = Preprocessor.from_config(read_json(directory / "preprocessor_config.json"))
        except ValueError as exc:
            raise ModelError(f"{directory / 'preprocessor_config.json'}: {exc}") from None
        self.tokenizer = EmbeddingTokenizer.from_dir(directory, self.family, self.config)
        precision = files.precision
        if precision == "auto":
            precision = available_precision(directory)
        if precision not in ("fp32", "int8", "fp16"):
            raise ModelError(f"{directory}: unknown precision {precision!r} for an embedding model")
        self.precision: str = precision
        self.paths = {stem: find_onnx(directory, stem, precision) for stem in GRAPHS}  # type: ignore[arg-type]
        self.batch_size = max(1, batch_size)
        self.derived = derived
        self.digests = digests if digests is not None else derived
        self._one_shot = load_text
        # The text graph answers one query at a time, each followed at once by a search on the same cores: its
        # threads spin-waiting after the run (onnxruntime's default) took the core the Hamming scan's second
        # thread needs (2-core Zen 3: text run + scan 40-45 ms with spinning, 36 ms without; the run alike).
        self.sessions = SessionGroup(self.paths, threads, idle_unload_seconds, clock, self._check_graphs,
                                     self._prepare_graphs, providers, no_spin=(TEXT,))
        self._dim = self._configured_dim()
        if load_text:
            threading.Thread(target=self._load_text, name="capwatch-text-model", daemon=True).start()

    def prepare_for_queries(self) -> None:
        """Make now what the text graph will load from (its rewrites in the derived cache, see
        :meth:`_prepare_graphs`), without loading it: a scan calls this at its end, so that the first search
        after it does not spend ~2 s making them. Failures are logged by the derived cache and leave the published
        graph in use; raises ModelError only when the graph cannot be read."""
        self.sessions.prepare([TEXT])

    def _load_text(self) -> None:
        """Load the text graph (see ``load_text``); a failure is left for the first :meth:`embed_texts` to raise."""
        try:
            with self.sessions.use([TEXT]):
                pass
        except Exception:  # the first query loads it again and reports what is wrong in one line
            pass

    # -- identity ----------------------------------------------------------------------------------------------

    @cached_property
    def model_id(self) -> str:
        """The identifier stored beside every vector: vectors of different ids are never compared.

        Files capwatch pulled (by registry name, or that cache folder named as a directory):
        ``REPO@COMMIT12/PRECISION``, e.g. ``Xenova/clip-vit-base-patch32@4c1807b705b1/int8``, the same whichever
        way they are named. Any other directory: ``dir:FOLDER@SHA12/PRECISION`` where SHA is the sha256 over its
        configs, tokenizer and the two graphs in use (a folder whose weights change gets a new id; computed once,
        on first access; the graphs' sha256 come from the ``digests`` memo while the files
        are unchanged (same size, inode, mtime and ctime), so a search process does not read 150 MB of graphs).
        """
        if self.files.revision:
            return f"{self.files.source}@{self.files.revision[:12]}/{self.precision}"
        digest = hashlib.sha256()
        for path in (self.dir / "config.json", self.dir / "preprocessor_config.json", self.dir / "tokenizer.json",
                     self.dir / "tokenizer_config.json", self.paths[VISION], self.paths[TEXT]):
            digest.update(path.name.encode() + b"\0" + _file_digest(path, self.digests).encode() + b"\0")
        return f"dir:{self.dir.resolve().name}@{digest.hexdigest()[:12]}/{self.precision}"

    @property
    def dim(self) -> int:
        """The width of the vectors."""
        return self._dim

    def _configured_dim(self) -> int:
        if self.family == "clip":
            width = self.config.get("projection_dim", 512)
        else:
            text = self.config.get("text_config")
            width = None
            if isinstance(text, Mapping):
                width = text.get("projection_size", text.get("hidden_size"))
            width = 768 if width is None else width
        if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= 1 << 16:
            raise ModelError(f"{self.dir / 'config.json'}: embedding width: expected an integer from 1 to 65536, "
                             f"got {width!r}")
        return width

    # -- graphs ------------------------------------------------------------------------------------------------

    def _prepare_graphs(self, paths: Mapping[str, Path]) -> Mapping[str, Path]:
        """The graphs to load: int8 ones with signed weights where the CPU accumulates those exactly, and the text
        graph as onnxruntime optimises it, saved (it loads in every one-shot search, there without prepacked
        weights where that is exact too); each gives the published graph's outputs, checked bit for bit on a probe.
        Without a derived cache, or off the CPU, the published graphs."""
        on_cpu = self.sessions.first_provider == "CPUExecutionProvider"
        if self.derived is None or not on_cpu:
            return paths
        shapes: dict[str, tuple[int, ...]] = {}
        if (size := self.preprocessor.output_size) is not None:
            shapes["pixel_values"] = (1, 3, *size)
        prepared = dict(paths)
        if self.precision == "int8" and signed_is_exact():
            prepared = {stem: signed_graph(path, self.derived, shapes) or path for stem, path in paths.items()}
        if TEXT in prepared:
            prepared[TEXT] = (optimized_graph(prepared[TEXT], self.derived, {}, unpacked=self._one_shot)
                              or prepared[TEXT])
        return prepared

    def _check_graphs(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        """Check the inputs, outputs and width of the graphs in ``sessions`` (one or both: a search query loads
        only the text graph)."""
        vision_out, text_out = _OUTPUTS[self.family]
        if (vision := sessions.get(VISION)) is not None:
            check_names(self.paths[VISION], "input", [i.name for i in vision.get_inputs()], ["pixel_values"])
            check_names(self.paths[VISION], "output", [o.name for o in vision.get_outputs()], [vision_out],
                        optional=_OTHER_OUTPUTS)
        if (text := sessions.get(TEXT)) is not None:
            check_names(self.paths[TEXT], "input", [i.name for i in text.get_inputs()], ["input_ids"],
                        optional=["attention_mask", "position_ids"])
            check_names(self.paths[TEXT], "output", [o.name for o in text.get_outputs()], [text_out],
                        optional=_OTHER_OUTPUTS)
        for stem, name in ((VISION, vision_out), (TEXT, text_out)):
            if (session := sessions.get(stem)) is None:
                continue
            shape = next(o.shape for o in session.get_outputs() if o.name == name)
            width = shape[-1] if shape else None
            if isinstance(width, int) and width != self._dim:
                raise ModelError(f"{self.paths[stem]}: {name} is {width} wide but config.json says {self._dim}")

    # -- public API --------------------------------------------------------------------------------------------

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """The (3,H,W) float32 input for a decoded image, as transformers' image processor makes it. Raises
        ImageError (one line) when the image cannot be preprocessed."""
        try:
            return self.preprocessor(image)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot preprocess image: {exc}") from None

    def embed_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """(n, dim) float32 L2-normalised vectors of a preprocessed batch [n,3,H,W], in chunks of ``batch_size``.
        Raises ModelError when the model cannot be loaded or run."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must be [n,3,H,W], got shape {pixels.shape}")
        if pixels.shape[0] == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        name = _OUTPUTS[self.family][0]
        out = []
        with self.sessions.use([VISION]) as sessions:
            session = sessions[VISION]
            dtype = _input_dtype(session, "pixel_values")
            for start in range(0, pixels.shape[0], self.batch_size):
                chunk = np.ascontiguousarray(pixels[start : start + self.batch_size], dtype=dtype)
                out.append(_run(session, name, {"pixel_values": chunk}, self.paths[VISION]))
        return normalise(np.concatenate(out))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, dim) float32 L2-normalised vectors of decoded images (EXIF-oriented RGB, as
        :func:`capwatch.models.preprocess.load_image` gives them). Raises ImageError for an image that cannot be
        preprocessed, ModelError when the model cannot be loaded or run."""
        if not images:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self.embed_pixels(np.stack([self.preprocess_image(img) for img in images]))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 L2-normalised vectors of texts (any language the model knows; longer texts are cut to
        the model's text window, as transformers does). Raises ModelError when the model cannot be loaded or run."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        name = _OUTPUTS[self.family][1]
        out = []
        with self.sessions.use([TEXT]) as sessions:
            session = sessions[TEXT]
            inputs = {i.name for i in session.get_inputs()}
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer.encode(list(texts[start : start + self.batch_size]))
                feeds = {"input_ids": batch.input_ids}
                if "attention_mask" in inputs:
                    feeds["attention_mask"] = batch.attention_mask
                if "position_ids" in inputs:
                    feeds["position_ids"] = np.broadcast_to(
                        np.arange(batch.input_ids.shape[1], dtype=np.int64), batch.input_ids.shape).copy()
                out.append(_run(session, name, feeds, self.paths[TEXT]))
        return normalise(np.concatenate(out))


def _file_digest(path: Path, memo: DerivedCache | None) -> str:
    """The sha256 (hex) of ``path``, "-" when it is missing; large files from ``memo`` while unchanged. Raises
    ModelError when it cannot be read."""
    try:
        if memo is not None and path.stat().st_size > 1 << 20:
            return source_digest(path, memo)
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return "-"
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length, as float32 (a zero row stays zero)."""
    data = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(data, axis=1, keepdims=True)
    out = np.zeros_like(data)
    np.divide(data, norms, out=out, where=norms > 0)
    return out


def _input_dtype(session: ort.InferenceSession, name: str) -> type[np.floating[Any]]:
    kind = next((i.type for i in session.get_inputs() if i.name == name), "tensor(float)")
    return np.float16 if kind == "tensor(float16)" else np.float32


def _run(session: ort.InferenceSession, output: str, feeds: Mapping[str, np.ndarray], path: Path) -> np.ndarray:
    try:
        result = session.run([output], dict(feeds))[0]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/... types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: {first}") from None
    return np.asarray(result, dtype=np.float32).reshape(result.shape[0], -1)


# --------------------------------------------------------------------------------------------------------------
# From the configuration


def embed_model_config(config: Config) -> ModelConfig:
    """The ``[model]``-shaped settings the model store resolves ``[embed] model`` with: the name or directory and
    precision from ``[embed]``; threads, providers and idle unload from ``[model]``."""
    embed = config.embed
    directory = embed.dir
    return dataclasses.replace(
        config.model, name=embed.model if directory is None else "embed-dir", dir=directory, repo=None,
        revision=None, precision=embed.precision, graph_precision={},
    )


def resolve_embed_files(config: Config, env: Mapping[str, str] = os.environ, *,
                        download: bool = True) -> EmbedModelFiles | None:
    """Where the configured embedding model is: None for ``[embed] model = "off"``; a directory as it is; a
    registry name from the model cache, pulled first when ``download`` (and ``$CAPWATCH_OFFLINE`` is not set).

    Raises ModelError (one line, saying how to fix it) for an unknown name, a name that is a captioning model, a
    missing directory, or a model that is not cached and cannot be pulled.
    """
    embed: EmbedConfig = config.embed
    if embed.off:
        return None
    from capwatch.models.store import resolve_model

    resolved = resolve_model(embed_model_config(config), env, download=download, kind="embed")
    return EmbedModelFiles(dir=resolved.dir, source=resolved.model_id, revision=resolved.revision,
                           precision=resolved.precision, name=resolved.name)


def open_embedder(config: Config, env: Mapping[str, str] = os.environ, *, download: bool = True,
                  clock: Callable[[], float] = time.monotonic,
                  derived: DerivedCache | None = None, load_text: bool = False) -> ImageTextEmbedder | None:
    """The embedder ``[embed]`` asks for (``$CAPWATCH_EMBED_MODEL`` already applied by ``load_config``), or None
    when it is "off".

    Nothing heavy happens here: configs, tokenizer and graph files are checked, the sessions load on first use.
    ``derived`` as for the captioner (``DerivedCache.from_env(os.environ)``; used only when ``[model]
    rewrite_graphs`` is on). ``load_text``: start loading the text graph now, on another thread (a search query).
    Raises ModelError (one line) when the configured model cannot be had (see :func:`resolve_embed_files`) or its
    folder is not a usable CLIP / SigLIP model.
    """
    files = resolve_embed_files(config, env, download=download)
    if files is None:
        return None
    # A directory's id hashes its graphs: memoised where this user's stamp key exists (never created here).
    digests = derived if derived is not None or files.revision else DerivedCache.existing(env)
    return ImageTextEmbedder(files, threads=config.model.threads, providers=config.model.providers,
                             idle_unload_seconds=config.model.idle_unload_seconds,
                             batch_size=config.embed.batch_size, clock=clock,
                             derived=derived if config.model.rewrite_graphs else None, digests=digests,
                             load_text=load_text)
