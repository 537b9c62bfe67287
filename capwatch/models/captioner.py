"""Captioner: one model directory -> captions, with lazy sessions, batching and idle unload.

:func:`open_captioner` reads ``config.json``'s ``model_type`` and builds the family's captioner:

* ``vision-encoder-decoder`` -> :class:`VisionEncoderDecoderCaptioner` (ViT-GPT2 and similar);
* ``florence2`` -> ``capwatch.models.florence2.Florence2Captioner`` (imported only when needed).

Every family shares this base: preprocessing from ``preprocessor_config.json``, generation settings from the
configs plus the user's overrides, the tokenizer, and a :class:`~capwatch.models.session.SessionGroup`. A family
implements :meth:`Captioner.graph_stems`, :meth:`Captioner.check_graphs` and :meth:`Captioner.generate_ids`.

Two entry points: :meth:`Captioner.caption_batch` (captions) and :meth:`Captioner.describe_batch`, which gives an
:class:`ImageDescription` per image -- caption, keywords, text in the image -- as :class:`DescribeOptions` asks
(``DescribeOptions.from_config(config)``). Florence-2 produces all three from one vision-encoder pass per image;
other families give the caption alone.
"""

from __future__ import annotations

import abc
import importlib
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from capwatch.config import Config, ModelConfig, Precision
from capwatch.errors import ImageError, ModelError
from capwatch.models import vision_encoder_decoder as ved
from capwatch.models.derived import (
    DerivedCache,
    SplitDecoder,
    signed_is_exact,
    split_decoder,
    tidy_graph,
)
from capwatch.models.generate import GenerationSettings, generate
from capwatch.models.layout import ModelDir, decoder_positions, open_model_dir
from capwatch.models.preprocess import Preprocessor, load_image
from capwatch.models.probes import ProbeSpec
from capwatch.models.registry import precision_key, split_precision_key
from capwatch.models.runtime import ort
from capwatch.models.session import SessionGroup, SessionOwner
from capwatch.models.tokenizer import TextDecoder

#: config.json model_type -> "module:class" of the family's captioner (imported lazily).
FAMILIES: Mapping[str, str] = {
    "vision-encoder-decoder": "capwatch.models.captioner:VisionEncoderDecoderCaptioner",
    "florence2": "capwatch.models.florence2:Florence2Captioner",
}


@dataclass(frozen=True)
class CaptionResult:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class DescribeOptions:
    """What :meth:`Captioner.describe_batch` produces besides (or instead of) the caption.

    ``keywords``: labels of the model's object detection as keywords, at most ``max_keywords`` (Florence-2's
    ``<OD>``; a model without a detector gives none). ``text``: text in the image read by the model itself
    (Florence-2's ``<OCR>``; other models give None). Both reuse the caption's image features.
    """

    caption: bool = True
    keywords: bool = True
    max_keywords: int = 10
    text: bool = False

    @classmethod
    def from_config(cls, config: Config) -> DescribeOptions:
        """The options a configuration asks for: ``[model] keywords``, ``[metadata] max_keywords``, and the text
        only when ``[ocr] engine = "florence"`` (rapidocr reads text outside the captioning model)."""
        return cls(keywords=config.model.keywords, max_keywords=config.metadata.max_keywords,
                   text=config.ocr.engine == "florence")


@dataclass(frozen=True)
class ImageDescription:
    """Everything the model says about one image.

    ``caption``: None only when not asked for. ``keywords``: lower-case, singular, de-duplicated, largest objects
    first (empty when not asked for or the model has no detector). ``text``: the text read in the image ("" when
    there is none), None when not asked for or the model cannot read text.
    """

    caption: CaptionResult | None
    keywords: tuple[str, ...] = ()
    text: str | None = None


class Captioner(SessionOwner, abc.ABC):
    """Base class of every model family's captioner (one instance per model directory).

    Not thread-safe for concurrent captioning (one worker thread captions); ``unload_if_idle`` may be called from
    another thread.
    """

    #: True for families whose :meth:`describe_pixels` gives keywords from an object detector: only their empty
    #: keyword list means "no objects" (and removes capwatch's earlier keywords from a file).
    detects_objects: bool = False

    def __init__(
        self,
        model: ModelDir,
        config: ModelConfig,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        derived: DerivedCache | None = None,
    ) -> None:
        """Read the model's configs and locate its graphs (nothing is loaded yet).

        ``derived``: where rewritten graphs are cached (:mod:`capwatch.models.derived`); None runs the published
        graphs as they are.

        Raises ModelError (one line) when a file is missing or a config value is invalid.
        """
        self.model_dir = model.path
        self.model = model
        # config.precision may be a resolved key with per-graph exceptions (registry.precision_key); the
        # configured graph_precision adds to them.
        base, graphs = split_precision_key(config.precision)
        graphs.update(config.graph_precision)
        unknown = sorted(set(graphs) - set(self.graph_stems()))
        if unknown:
            raise ModelError(f"model.graph_precision: {model.path} has no graph {unknown[0]!r} (its graphs: "
                             f"{', '.join(self.graph_stems())})")
        if base == "auto":
            base = self._available_precision(model)
        #: The precision each graph runs at.
        self.graph_precisions: dict[str, Precision] = {
            stem: graphs.get(stem, typing.cast(Precision, base)) for stem in self.graph_stems()}
        #: The precision key the model runs at (``int8``, ``int8+vision_encoder=fp32``; see registry.precision_key).
        self.precision = precision_key(base, graphs)
        self._precision_parts = (base, dict(graphs))
        #: Graphs that run in another quantisation than their published file (stem -> what runs, e.g.
        #: ``int8-static``): set by :meth:`prepare_graphs` each time the graphs load; see :attr:`precision_used`.
        self.graph_variants: dict[str, str] = {}
        self.config = config
        self.model_id = model_id or model.path.name
        self.revision = revision
        #: Positions of the text decoder (config.json), None when unstated: generation never runs past them.
        self.max_positions = decoder_positions(model.config)
        try:
            self.preprocessor = Preprocessor.from_config(model.preprocessor_config)
        except ValueError as exc:
            raise ModelError(f"{model.path / 'preprocessor_config.json'}: {exc}") from None
        self.settings = self.initial_settings(model, config)
        paths = {stem: model.onnx_file(stem, self.graph_precisions[stem]) for stem in self.graph_stems()}
        self.derived = derived if config.rewrite_graphs else None
        self.sessions = SessionGroup(paths, config.threads, config.idle_unload_seconds, clock, self._on_load,
                                     self.prepare_graphs, config.providers)
        self.text = TextDecoder.from_dir(model.path, self.special_token_ids())
        self._clock = clock

    def initial_settings(self, model: ModelDir, config: ModelConfig) -> GenerationSettings:
        """The generation settings this captioner uses by default (families override where their configs differ).

        Raises ModelError (one line) when they are invalid; see :meth:`generation_settings`.
        """
        return self.generation_settings(model.generation_config, model.config, config)

    def generation_settings(
        self, generation_config: Mapping[str, Any], model_config: Mapping[str, Any], overrides: ModelConfig
    ) -> GenerationSettings:
        """Return the merged generation settings (see GenerationSettings.from_configs).

        Raises ModelError (one line, naming the model directory) when the merged settings are invalid, e.g. a
        ``model.min_length`` from capwatch's config above the model's max_length.
        """
        try:
            return GenerationSettings.from_configs(generation_config, model_config, overrides)
        except ValueError as exc:
            raise ModelError(f"{self.model.path}: generation settings: {exc}") from None

    def _available_precision(self, model: ModelDir) -> Precision:
        """The best precision this directory has every graph for: fp32 (the reference), then int8, then fp16."""
        for precision in ("fp32", "int8", "fp16"):
            try:
                for stem in self.graph_stems():
                    model.onnx_file(stem, precision)
            except ModelError:
                continue
            return precision
        model.onnx_file(self.graph_stems()[0], "fp32")  # raises the one-line "no such graph" error
        raise ModelError(f"{model.path}: no complete set of ONNX graphs")  # pragma: no cover

    # -- family hooks ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def graph_stems(self) -> Sequence[str]:
        """ONNX file stems this family needs (precision suffix added by the layout)."""

    @abc.abstractmethod
    def check_graphs(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        """Raise ModelError when the loaded graphs do not have the tensor names this family uses."""

    @abc.abstractmethod
    def generate_ids(
        self, sessions: Mapping[str, ort.InferenceSession], pixel_values: np.ndarray, settings: GenerationSettings
    ) -> list[list[int]]:
        """Token ids per image (decoder start first, as transformers' generate() returns them)."""

    @property
    def precision_used(self) -> str:
        """What the captions are made with, as recorded with them (XMP capwatch:ModelPrecision) and shown by
        `status`: :attr:`precision`, with each graph that runs in another quantisation than its published file
        named as such, e.g. ``int8+vision_encoder=int8-static`` (``[model] int8_image_encoder = "static"`` whose
        static graph passed its probe). Known once the graphs are loaded; before, :attr:`precision`. The
        rewrites that keep every value (int8 weights with the same real values, the split decoder) are not named:
        they give the same captions."""
        if not self.graph_variants:
            return self.precision
        base, graphs = self._precision_parts
        return precision_key(base, {**graphs, **self.graph_variants})

    def prepare_graphs(self, paths: Mapping[str, Path]) -> Mapping[str, Path]:
        """The graphs to load instead of the published ``paths`` (by stem); called once, before the first load.

        Rewrites are made and verified on first use, then cached (:mod:`capwatch.models.derived`). Here, on the
        CPU, int8 graphs get their attention splits before their transposes (onnxruntime leaves slow 5-d
        transposes in dynamic int8 graphs) and, on CPUs where that is exact (and faster), int8 MatMul weights
        with the same real values as the published uint8 ones: the same outputs, bit for bit. Families add their
        own (ViT-GPT2: the split decoder).
        """
        if self.derived is None or self.sessions.first_provider != "CPUExecutionProvider":
            return paths
        shapes = {}
        if (size := self.preprocessor.output_size) is not None:
            shapes["pixel_values"] = (1, 3, *size)
        signed = self._signs_int8()
        return {stem: tidy_graph(path, self.derived, shapes, signed=signed) or path
                if self.graph_precisions[stem] == "int8" else path for stem, path in paths.items()}

    def _signs_int8(self) -> bool:
        """True when int8 graphs get signed weights here: rewrites are on, the model runs on the CPU, and the CPU
        accumulates them exactly (see derived.signed_is_exact)."""
        on_cpu = self.sessions.first_provider == "CPUExecutionProvider"
        return self.derived is not None and on_cpu and signed_is_exact()

    def postprocess(self, text: str) -> str:
        """Turn decoded text into the caption (families override to strip task artefacts)."""
        return text

    def special_token_ids(self) -> set[int]:
        """Ids never shown in captions: decoder start, BOS, EOS, pad, forced BOS/EOS."""
        s = self.settings
        ids = {s.decoder_start_token_id, s.pad_token_id, *s.eos_token_id}
        ids.update(i for i in (s.bos_token_id, s.forced_bos_token_id, s.forced_eos_token_id) if i is not None)
        return ids

    # -- public API --------------------------------------------------------------------------------------------

    def preprocess_file(self, path: Path) -> np.ndarray:
        """Return the (3,H,W) float32 input for the image file ``path`` (EXIF-oriented, first frame).

        Raises ImageError (one line) when the file cannot be decoded.
        """
        return self.preprocess_image(load_image(path, target_size=self.preprocessor.output_size))

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """Return the (3,H,W) float32 input for an already decoded image (orientation is not applied here)."""
        try:
            return self.preprocessor(image)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot preprocess image: {exc}") from None

    def caption_pixels(
        self, pixel_values: np.ndarray, *, settings: GenerationSettings | None = None
    ) -> list[CaptionResult]:
        """Caption a batch [b,3,H,W]; returns b results in order.

        Runs in chunks of ``config.batch_size`` images. With fp32 graphs the result is identical to captioning one
        image at a time. int8 graphs (onnxruntime dynamic quantisation) pick one activation scale per tensor, i.e.
        per call, so an image's int8 caption can depend slightly on its batch-mates (measured in bench/caption.py).
        ``settings`` replaces the configured generation settings for this call. A length budget beyond the decoder's
        positions (``model.max_new_tokens`` or a built-in default meant for a bigger model) is cut to them: the model
        cannot produce more, and its graph would fail on the first position past its table. Raises ModelError when
        the model cannot be loaded.
        """
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must be [b,3,H,W], got shape {pixels.shape}")
        use = (settings or self.settings).fit_positions(self.max_positions)
        chunk = max(1, self.config.batch_size)
        results: list[CaptionResult] = []
        with self.sessions.use() as sessions:
            for start in range(0, pixels.shape[0], chunk):
                batch = np.ascontiguousarray(pixels[start : start + chunk])
                sequences = self.generate_ids(sessions, batch, use)
                step = use.num_return_sequences
                for ids in sequences[::step]:
                    text = self.postprocess(self.text.decode(ids))
                    results.append(CaptionResult(text=text, token_ids=tuple(ids)))
        return results

    def caption_batch(self, images: Sequence[Image.Image]) -> list[CaptionResult]:
        """Caption decoded images (each preprocessed here); returns one result per image, in order."""
        if not images:
            return []
        return self.caption_pixels(np.stack([self.preprocess_image(img) for img in images]))

    def describe_batch(self, images: Sequence[Image.Image], options: DescribeOptions) -> list[ImageDescription]:
        """Caption, keywords and text of decoded images, as ``options`` asks; one description per image, in order.

        The caption is the one :meth:`caption_batch` gives. Keyword boxes are scaled to each image's own size (their
        areas rank the keywords). Raises ModelError when the model cannot be loaded, ImageError when an image cannot
        be preprocessed.
        """
        if not images:
            return []
        pixels = np.stack([self.preprocess_image(img) for img in images])
        return self.describe_pixels(pixels, options, image_sizes=[img.size for img in images])

    def describe_pixels(self, pixel_values: np.ndarray, options: DescribeOptions, *,
                        image_sizes: Sequence[tuple[int, int]] | None = None) -> list[ImageDescription]:
        """As :meth:`describe_batch` for a preprocessed batch [b,3,H,W]; ``image_sizes`` are the (width, height) of
        the images behind it (default: the model's input size).

        This base version captions only: a family without a detector or text reader gives no keywords and no text.
        """
        if not options.caption:
            return [ImageDescription(caption=None) for _ in range(len(pixel_values))]
        return [ImageDescription(caption=c) for c in self.caption_pixels(pixel_values)]

    def _on_load(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        self.check_graphs(sessions)


class VisionEncoderDecoderCaptioner(Captioner):
    """ViT-GPT2-style models: ``encoder_model`` + ``decoder_model_merged``."""

    _layout: ved.DecoderLayout
    _broadcast: bool
    #: The verified split of the merged decoder in use, None while the published graph runs.
    split: SplitDecoder | None = None

    def graph_stems(self) -> Sequence[str]:
        return ved.graph_stems()

    def prepare_graphs(self, paths: Mapping[str, Path]) -> Mapping[str, Path]:
        """The encoder plus the split decoder pair (cross-attention keys/values computed once per image) when it can
        be made and verified; else the published graphs."""
        if self.derived is None:
            return paths
        hidden = self._encoder_width()
        if hidden is not None:
            signed = self.graph_precisions[ved.DECODER] == "int8" and self._signs_int8()
            probe = ProbeSpec(self.model.path / "config.json", hidden, self.settings.decoder_start_token_id)
            self.split = split_decoder(paths[ved.DECODER], self.derived, probe, signed=signed)
        if self.split is None:
            return super().prepare_graphs(paths)  # int8 weights where they apply, on the published graphs
        encoder = super().prepare_graphs({ved.ENCODER: paths[ved.ENCODER]})[ved.ENCODER]
        return {ved.ENCODER: encoder, ved.CROSS: self.split.cross, ved.STEP: self.split.step}

    def _encoder_width(self) -> int | None:
        """The encoder's hidden size from config.json (the width of encoder_hidden_states), None when unstated."""
        encoder = self.model.config.get("encoder")
        width = encoder.get("hidden_size") if isinstance(encoder, Mapping) else None
        return width if isinstance(width, int) and not isinstance(width, bool) and 0 < width <= 1 << 16 else None

    def check_graphs(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        ved.check_encoder(sessions[ved.ENCODER], self.sessions_path(ved.ENCODER))
        if ved.STEP in sessions and self.split is not None:
            names = (*self.split.data_outputs, *self.split.shape_outputs)
            decoder = sessions[ved.STEP]
            self._layout = ved.DecoderLayout.from_session(decoder, self.split.step, self.model.config, names)
        else:
            decoder = sessions[ved.DECODER]
            self._layout = ved.DecoderLayout.from_session(decoder, self.sessions_path(ved.DECODER), self.model.config)
        hidden = self._encoder_width() or self._layout.heads * self._layout.head_dim
        self._broadcast = ved.encoder_broadcasts(
            decoder, self._layout, hidden, self.settings.decoder_start_token_id, self._item_inputs(sessions)
        )

    def _item_inputs(self, sessions: Mapping[str, ort.InferenceSession]) -> Callable[[np.ndarray], ved.ItemInputs]:
        """How the decoder gets its per-image inputs from these sessions (built per call: nothing may keep a
        session alive after an idle unload)."""
        if ved.STEP in sessions and self.split is not None:
            return ved.SplitInputs(sessions[ved.CROSS], self.split.data_outputs, self.split.shape_outputs)
        return ved.published_inputs

    def sessions_path(self, stem: str) -> Path:
        return self.model.onnx_file(stem, self.graph_precisions[stem])

    def generate_ids(
        self, sessions: Mapping[str, ort.InferenceSession], pixel_values: np.ndarray, settings: GenerationSettings
    ) -> list[list[int]]:
        hidden = ved.encode(sessions[ved.ENCODER], pixel_values)
        graph = sessions[ved.STEP] if ved.STEP in sessions else sessions[ved.DECODER]
        decoder = ved.VitGpt2Decoder(graph, self._layout, broadcast_encoder=self._broadcast,
                                     item_inputs=self._item_inputs(sessions))
        return generate(decoder, hidden, pixel_values.shape[0], settings)


def open_captioner(
    model_dir: Path,
    config: ModelConfig,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    derived: DerivedCache | None = None,
) -> Captioner:
    """Return the captioner for the model directory ``model_dir``, chosen by ``config.json``'s ``model_type``.

    Nothing heavy happens here: configs, tokenizer and file locations are checked; the ONNX sessions load on
    the first caption. Raises ModelError (one line) for a missing/invalid directory or an unsupported model type.
    """
    model = open_model_dir(Path(model_dir))
    target = FAMILIES.get(model.model_type)
    if target is None:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(f"{model.path}: unsupported model_type {model.model_type!r} (supported: {known})")
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ModelError(f"{model.path}: model_type {model.model_type!r} is not available in this build") from None
    captioner: Captioner = cls(model, config, model_id=model_id, revision=revision, derived=derived)
    return captioner
