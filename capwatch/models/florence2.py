"""Florence-2 family (onnx-community/Florence-2-base-ft, -large-ft): four ONNX graphs on the shared engine.

Pipeline for a batch of images and one task prompt (the caption length):

1. ``vision_encoder``: ``pixel_values`` [b,3,H,W] -> ``image_features`` [b,N,d] (N = 577 for 768x768 input);
2. ``embed_tokens``: the prompt ids (``<s> What does the image describe? </s>``) -> ``inputs_embeds`` [1,L,d];
3. ``encoder_model``: ``inputs_embeds`` = concat(image features, prompt embeddings) [b,N+L,d] with an all-ones
   ``attention_mask`` -> ``last_hidden_state``. This is what transformers' native Florence2 does too: its processor
   puts N ``<image>`` placeholders before ``<s> prompt </s>`` and the model scatters the image features into them;
4. ``decoder_model_merged``, one token per step through :func:`capwatch.models.generate.generate`: the token is
   embedded with ``embed_tokens`` and fed as ``inputs_embeds``; the self-attention cache grows by one position per
   step; the cross-attention K/V come back only from the first (uncached) step -- on the cached branch the
   ``present.*.encoder.*`` outputs are empty -- so they are kept from step 0.

Decoded text is post-processed into a clean sentence: ``<s>``, ``</s>``, ``<pad>`` and ``<loc_N>`` removed,
whitespace collapsed, no space before punctuation, first letter capitalised.

:meth:`Florence2Captioner.describe_pixels` runs step 1 once per image and steps 2-4 once per task on those image
features: ``<CAPTION>`` (or the configured length), ``<OD>`` for keywords and ``<OCR>`` for text in the image. The
task outputs are parsed as transformers' ``post_process_generation`` does (:mod:`capwatch.models.florence_post`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capwatch.config import CaptionLength, ModelConfig
from capwatch.errors import ModelError
from capwatch.models import staticq
from capwatch.models.captioner import Captioner, CaptionResult, DescribeOptions, ImageDescription
from capwatch.models.derived import DerivedCache, static_graph
from capwatch.models.florence_post import clean_pure_text, parse_od
from capwatch.models.generate import GenerationSettings, generate
from capwatch.models.keywords import keywords_from_detections
from capwatch.models.layout import ModelDir, check_names, read_json
from capwatch.models.runtime import ort
from capwatch.models.seq2seq import DecoderShape, EncodedBatch, MergedDecoder

VISION = "vision_encoder"
EMBED = "embed_tokens"
ENCODER = "encoder_model"
DECODER = "decoder_model_merged"
#: How :attr:`Captioner.precision_used` names the image encoder quantised statically (``int8_image_encoder``).
STATIC_INT8 = "int8-static"

#: The task token for each caption length (ModelConfig.caption_length).
TASK_FOR_LENGTH: Mapping[CaptionLength, str] = {
    "short": "<CAPTION>",
    "detailed": "<DETAILED_CAPTION>",
    "paragraph": "<MORE_DETAILED_CAPTION>",
}

#: Florence2Processor.task_prompts_without_inputs for the captioning tasks, as in transformers 4.57
#: (models/florence2/processing_florence2.py) and in the remote-code processor the model repositories ship.
#: Used when the model directory's processor config does not carry the table itself.
DEFAULT_TASK_PROMPTS: Mapping[str, str] = {
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<OCR>": "What is the text in the image?",
}

#: The object detection task, whose labels become keywords.
OD_TASK = "<OD>"
#: The text reading task.
OCR_TASK = "<OCR>"

#: Config files that may carry the prompt table: transformers.js reads it from the image processor's config
#: (preprocessor_config.json); transformers' native processor saves its settings in processor_config.json.
_PROMPT_SOURCES = ("processor_config.json", "preprocessor_config.json")
#: Longest task prompt accepted from a processor config. Real ones are under 60 characters; the prompt's tokens join
#: the image's 577 in the text encoder, whose attention cost grows with the square of their sum.
MAX_PROMPT_CHARS = 1000

_REMOVE_RE = re.compile(r"</?s>|<pad>|<loc_\d+>")
_SPACE_RE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:!?])")


def task_prompt(model_dir: Path, caption_length: CaptionLength) -> str:
    """Return the prompt text for ``caption_length``, from the model's processor config when it has one.

    Raises ModelError (one line, naming the file) when a processor config exists but cannot be read, is too large
    or is not a JSON object (see :func:`~capwatch.models.layout.read_json`).
    """
    return prompt_for_task(model_dir, TASK_FOR_LENGTH[caption_length])


def prompt_for_task(model_dir: Path, task: str) -> str:
    """Return the prompt text of the task token ``task`` (a key of :data:`DEFAULT_TASK_PROMPTS`), from the model's
    processor config when it has one, else transformers' own. Raises ModelError as :func:`task_prompt` does.
    """
    for name in _PROMPT_SOURCES:
        path = model_dir / name
        if not path.is_file():
            continue
        data = read_json(path, required=False)
        table = data.get("task_prompts_without_inputs")
        if isinstance(table, dict) and isinstance(table.get(task), str) and table[task].strip():
            if len(table[task]) > MAX_PROMPT_CHARS:
                raise ModelError(f"{path}: task_prompts_without_inputs.{task}: expected at most {MAX_PROMPT_CHARS} "
                                 f"characters, got {len(table[task])}")
            return str(table[task])
    return DEFAULT_TASK_PROMPTS[task]


def clean_caption(text: str) -> str:
    """Return decoded Florence-2 output as a clean sentence.

    Removes ``<s>``, ``</s>``, ``<pad>`` and location tokens ``<loc_N>``, collapses whitespace, drops spaces
    before punctuation, trims, and capitalises the first letter. Returns "" when nothing is left.
    """
    text = _REMOVE_RE.sub(" ", text)
    text = _SPACE_RE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text).strip()
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text


# ------------------------------------------------------------------------------------------------------------
# Graph plumbing


class Florence2Decoder(MergedDecoder):
    """Florence-2's merged decoder: tokens embedded by the ``embed_tokens`` graph, fed as ``inputs_embeds``."""

    def __init__(self, decoder: Any, embed: Any, shape: DecoderShape) -> None:
        super().__init__(decoder, shape, embed)


def encode(vision: Any, embed: Any, encoder: Any, pixel_values: np.ndarray, prompt_ids: Sequence[int],
           shape: DecoderShape) -> EncodedBatch:
    """Run the vision encoder, embed the prompt, and run the text encoder over both, for a batch of images.

    Both encoders run one image at a time: their matrix products are already large for a single 768x768 image
    (36864 tokens in the first DaViT stage), so batching only adds memory traffic (measured slower), and with
    int8 graphs a per-image run keeps each image's dynamic-quantization scales independent of its batch mates.
    Batching pays in the decoder, where one step is a handful of rows.
    """
    return encode_features(embed, encoder, image_features(vision, pixel_values, shape), prompt_ids, shape)


def image_features(vision: Any, pixel_values: np.ndarray, shape: DecoderShape) -> list[np.ndarray]:
    """The vision encoder's ``image_features`` [1,N,d] of each image of the batch (one run per image, see
    :func:`encode`); every task prompt of the same images reuses them."""
    pixels = np.ascontiguousarray(pixel_values, dtype=shape.float_dtype)
    return [vision.run(["image_features"], {"pixel_values": pixels[i : i + 1]})[0] for i in range(pixels.shape[0])]


def encode_features(embed: Any, encoder: Any, features: Sequence[np.ndarray], prompt_ids: Sequence[int],
                    shape: DecoderShape) -> EncodedBatch:
    """Embed the prompt and run the text encoder over each image's features followed by it."""
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    prompt = embed.run(["inputs_embeds"], {"input_ids": ids})[0]
    hidden: list[np.ndarray] = []
    for item in features:
        joint = np.concatenate([item, prompt.astype(item.dtype, copy=False)], axis=1)
        mask = np.ones(joint.shape[:2], dtype=shape.mask_dtype)
        hidden.append(encoder.run(["last_hidden_state"], {"inputs_embeds": joint.astype(shape.float_dtype, copy=False),
                                                          "attention_mask": mask})[0])
    states = np.concatenate(hidden, axis=0)
    return EncodedBatch(hidden=states, mask=np.ones(states.shape[:2], dtype=shape.mask_dtype))


def generate_ids(vision: Any, embed: Any, encoder: Any, decoder: Any, pixel_values: np.ndarray,
                 prompt_ids: Sequence[int], settings: GenerationSettings, shape: DecoderShape) -> list[list[int]]:
    """Token ids (decoder start first, as transformers' generate() returns them) for each image of the batch."""
    encoded = encode(vision, embed, encoder, pixel_values, prompt_ids, shape)
    return generate(Florence2Decoder(decoder, embed, shape), encoded, pixel_values.shape[0], settings)


# ------------------------------------------------------------------------------------------------------------
# Captioner

#: Budget of the other tasks when the model's configs set no length: far above what they produce for a photo (an
#: object is 5-7 tokens: label and four locations); generation stops at </s>. The user's model.max_new_tokens is the
#: caption's budget only.
TASK_MAX_NEW_TOKENS: Mapping[str, int] = {OD_TASK: 256, OCR_TASK: 256}

#: Caption budget per length when neither the user nor the model's configs set one. transformers would fall back
#: to max_length 20 (which cuts detailed captions mid-sentence); Florence-2's authors caption with
#: max_new_tokens=1024. These bounds are far above what each task produces; generation stops at </s>.
DEFAULT_MAX_NEW_TOKENS: Mapping[CaptionLength, int] = {"short": 64, "detailed": 256, "paragraph": 512}

_TRANSFORMERS_DEFAULT_MAX_LENGTH = 20


def text_config_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json seen as the language model's config: top-level keys overlaid with ``text_config``.

    Florence-2 keeps its BART settings (and, in older exports, its generation keys) in ``text_config``.
    """
    view = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    text = config.get("text_config")
    if isinstance(text, Mapping):
        view.update({k: v for k, v in text.items() if v is not None})
    return view


def _states_length(generation_config: Mapping[str, Any], text_view: Mapping[str, Any]) -> bool:
    """True when the model's configs set a caption length other than transformers' implicit default."""
    source = generation_config if generation_config else text_view
    if source.get("max_new_tokens") is not None:
        return True
    max_length = source.get("max_length")
    # Remote-code Florence-2 configs serialise PretrainedConfig's default max_length of 20; that is not a choice.
    return max_length is not None and max_length != _TRANSFORMERS_DEFAULT_MAX_LENGTH


class Florence2Captioner(Captioner):
    """Florence-2 models: ``vision_encoder``, ``embed_tokens``, ``encoder_model``, ``decoder_model_merged``."""

    detects_objects = True

    _shape: DecoderShape

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
        """Read configs, tokenizer and task prompt; nothing is loaded yet. Raises ModelError (one line).

        ``derived``: where the static int8 image encoder is cached (``model.int8_image_encoder``). Florence-2's
        merged decoder already caches the cross-attention keys/values (its ``past_key_values.*.encoder.*``), so it
        has nothing to split.
        """
        text_view = text_config_view(model.config)
        # Adapter: the base class reads generation keys from config.json's top level (and a "decoder" sub-config);
        # Florence-2 keeps them, and max_position_embeddings, in "text_config". Expose the missing ones at the top.
        lifted = {**model.config, **{k: v for k, v in text_view.items() if k not in model.config}}
        model = dataclasses.replace(model, config=lifted)
        super().__init__(model, config, model_id=model_id, revision=revision, clock=clock, derived=derived)
        self.text_view = text_view
        self.task = TASK_FOR_LENGTH[config.caption_length]
        self.prompt = task_prompt(model.path, config.caption_length)
        bos = self.text_view.get("bos_token_id", 0)
        eos = self.text_view.get("eos_token_id", 2)
        if not isinstance(bos, int) or not isinstance(eos, int):
            raise ModelError(f"{model.path}: config.json: bos_token_id/eos_token_id must be integers")
        # As Florence2Processor builds it: "<s>" + prompt + "</s>", the prompt itself without special tokens.
        self.prompt_ids: tuple[int, ...] = (bos, *self.text.encode(self.prompt), eos)
        #: Prompt ids and generation settings of the keyword (<OD>) and text (<OCR>) tasks.
        self.task_prompt_ids: dict[str, tuple[int, ...]] = {
            task: (bos, *self.text.encode(prompt_for_task(model.path, task)), eos) for task in TASK_MAX_NEW_TOKENS}
        self.task_settings: dict[str, GenerationSettings] = {
            task: self._task_settings(model, config, task) for task in TASK_MAX_NEW_TOKENS}

    def _task_settings(self, model: ModelDir, config: ModelConfig, task: str) -> GenerationSettings:
        """The generation settings of ``task``: the model's configs with the user's beam and n-gram settings; the
        length the model's configs state, else :data:`TASK_MAX_NEW_TOKENS` (the caption's budget does not apply)."""
        text_view = text_config_view(model.config)
        stated = _states_length(model.generation_config, text_view)
        overrides = dataclasses.replace(config, min_length=None,
                                        max_new_tokens=None if stated else TASK_MAX_NEW_TOKENS[task])
        return self.generation_settings(model.generation_config, text_view, overrides)

    def initial_settings(self, model: ModelDir, config: ModelConfig) -> GenerationSettings:
        """Generation settings from text_config's view of config.json, with a caption budget per length.

        Generation keys of older exports and max_position_embeddings live in text_config; when no config sets a
        length, :data:`DEFAULT_MAX_NEW_TOKENS` for ``config.caption_length`` applies (in one go, so that the check
        of min_length against max_length sees the budget that applies). Raises ModelError (one line) when invalid.
        """
        text_view = text_config_view(model.config)
        overrides = config
        if config.max_new_tokens is None and not _states_length(model.generation_config, text_view):
            overrides = dataclasses.replace(config, max_new_tokens=DEFAULT_MAX_NEW_TOKENS[config.caption_length])
        return self.generation_settings(model.generation_config, text_view, overrides)

    def graph_stems(self) -> Sequence[str]:
        return (VISION, EMBED, ENCODER, DECODER)

    def _path(self, stem: str) -> Path:
        return self.model.onnx_file(stem, self.graph_precisions[stem])

    def prepare_graphs(self, paths: Mapping[str, Path]) -> Mapping[str, Path]:
        """The graphs of :meth:`Captioner.prepare_graphs`, with the int8 image encoder quantised statically when
        ``model.int8_image_encoder = "static"`` (made from the published graph, probed and cached: see
        :func:`capwatch.models.derived.static_graph`); the published encoder when that is refused."""
        prepared = dict(super().prepare_graphs(paths))
        self.graph_variants.pop(VISION, None)
        if (self.derived is not None and self.config.int8_image_encoder == "static"
                and self.graph_precisions[VISION] == "int8"
                and self.sessions.first_provider == "CPUExecutionProvider"):
            static = static_graph(paths[VISION], self.derived,
                                  lambda: staticq.calibration_pixels(self.preprocess_image))
            if static is not None:
                prepared[VISION] = static
                # Another graph than the published int8 one: recorded with every caption (precision_used).
                self.graph_variants[VISION] = STATIC_INT8
        return prepared

    def check_graphs(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        """Raise ModelError naming the graph and tensor when a graph lacks a Florence-2 tensor name."""
        expected = {
            VISION: (["pixel_values"], ["image_features"]),
            EMBED: (["input_ids"], ["inputs_embeds"]),
            ENCODER: (["inputs_embeds", "attention_mask"], ["last_hidden_state"]),
        }
        for stem, (inputs, outputs) in expected.items():
            session = sessions[stem]
            check_names(self._path(stem), "input", [i.name for i in session.get_inputs()], inputs)
            check_names(self._path(stem), "output", [o.name for o in session.get_outputs()], outputs)
        self._shape = DecoderShape.from_session(sessions[DECODER], self._path(DECODER), self.text_view)

    def generate_ids(
        self, sessions: Mapping[str, ort.InferenceSession], pixel_values: np.ndarray, settings: GenerationSettings
    ) -> list[list[int]]:
        """Token ids per image (decoder start first, as transformers' generate() returns them)."""
        return generate_ids(sessions[VISION], sessions[EMBED], sessions[ENCODER], sessions[DECODER], pixel_values,
                            self.prompt_ids, settings, self._shape)

    def postprocess(self, text: str) -> str:
        return clean_caption(text)

    def task_ids(self, pixel_values: np.ndarray, task: str) -> list[list[int]]:
        """Token ids per image of ``task`` (``<OD>`` or ``<OCR>``) alone, as transformers' generate() returns them
        for that task prompt (the parity tests use this). Raises ModelError when the model cannot be loaded."""
        settings = self.task_settings[task].fit_positions(self.max_positions)
        pixels = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        with self.sessions.use() as sessions:
            features = image_features(sessions[VISION], pixels, self._shape)
            return self._run_task(sessions, features, self.task_prompt_ids[task], settings)

    def _run_task(self, sessions: Mapping[str, ort.InferenceSession], features: Sequence[np.ndarray],
                  prompt_ids: Sequence[int], settings: GenerationSettings) -> list[list[int]]:
        """One task prompt over images already through the vision encoder: best sequence per image."""
        encoded = encode_features(sessions[EMBED], sessions[ENCODER], features, prompt_ids, self._shape)
        decoder = Florence2Decoder(sessions[DECODER], sessions[EMBED], self._shape)
        sequences = generate(decoder, encoded, len(features), settings)
        return sequences[:: settings.num_return_sequences]

    def describe_pixels(self, pixel_values: np.ndarray, options: DescribeOptions, *,
                        image_sizes: Sequence[tuple[int, int]] | None = None) -> list[ImageDescription]:
        """Caption, keywords (``<OD>``) and text (``<OCR>``) per image of the batch [b,3,H,W], as ``options`` asks.

        The vision encoder runs once per image; each task runs the text encoder and the decoder on its features.
        The caption equals :meth:`caption_pixels`'s. Keyword boxes are scaled to ``image_sizes`` (width, height per
        image; default the model's input size) before their areas rank the labels. Raises ModelError when the model
        cannot be loaded, ValueError for a batch of the wrong shape.
        """
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must be [b,3,H,W], got shape {pixels.shape}")
        count = pixels.shape[0]
        sizes = list(image_sizes) if image_sizes is not None else [(pixels.shape[3], pixels.shape[2])] * count
        if len(sizes) != count:
            raise ValueError(f"{len(sizes)} image sizes for {count} images")
        want_keywords = options.keywords and options.max_keywords > 0
        caption_settings = self.settings.fit_positions(self.max_positions)
        od_settings = self.task_settings[OD_TASK].fit_positions(self.max_positions)
        ocr_settings = self.task_settings[OCR_TASK].fit_positions(self.max_positions)
        chunk = max(1, self.config.batch_size)
        results: list[ImageDescription] = []
        with self.sessions.use() as sessions:
            for start in range(0, count, chunk):
                batch = np.ascontiguousarray(pixels[start : start + chunk])
                n = batch.shape[0]
                if not (options.caption or want_keywords or options.text):
                    results += [ImageDescription(caption=None)] * n
                    continue
                features = image_features(sessions[VISION], batch, self._shape)
                captions: list[CaptionResult | None] = [None] * n
                keywords: list[tuple[str, ...]] = [()] * n
                texts: list[str | None] = [None] * n
                if options.caption:
                    captions = [CaptionResult(text=self.postprocess(self.text.decode(ids)), token_ids=tuple(ids))
                                for ids in self._run_task(sessions, features, self.prompt_ids, caption_settings)]
                if want_keywords:
                    od = self._run_task(sessions, features, self.task_prompt_ids[OD_TASK], od_settings)
                    keywords = [keywords_from_detections(parse_od(self.text.decode_raw(ids), sizes[start + i]),
                                                         options.max_keywords) for i, ids in enumerate(od)]
                if options.text:
                    ocr = self._run_task(sessions, features, self.task_prompt_ids[OCR_TASK], ocr_settings)
                    texts = [clean_pure_text(self.text.decode_raw(ids)) for ids in ocr]
                results += [ImageDescription(caption=c, keywords=k, text=t)
                            for c, k, t in zip(captions, keywords, texts, strict=True)]
        return results
