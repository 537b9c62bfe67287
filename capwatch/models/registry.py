"""Known captioning models: hub repository, pinned revision, files per precision, defaults.

Every entry names files exactly as the ONNX repositories publish them and as transformers.js loads them:
``config.json``, ``generation_config.json``, ``preprocessor_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` and ``onnx/<graph><suffix>.onnx`` with suffix ``""`` (fp32), ``_quantized`` (int8) or
``_fp16`` (fp16).

Provenance of the pins (no hub is reachable from the build machine, so they come from public code that pins the
same repositories; see the store engineer's report):

* ``onnx-community/Florence-2-base-ft`` @ ``e88a44ea…``: the commit, and the size + sha256 of every int8 and shared
  file, agree across several independent projects that download this revision and check it byte for byte
  (their totals add up to the same 277,470,179 bytes).
* ``onnx-community/Florence-2-large-ft`` @ ``04ace749…`` and ``Xenova/vit-gpt2-image-captioning`` @ ``215b4edc…``:
  commits pinned by public projects; no per-file sha256 was found recorded at these commits, so those files are
  verified against the LFS sha256 the hub reports (``X-Linked-Etag``) and, for small non-LFS files, the git blob
  sha1 the hub reports as ``ETag``.

A revision is either a full 40-hex commit (reproducible) or a branch name such as ``"main"`` (then the commit that
was actually downloaded is recorded next to the files).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from capwatch.config import Precision
from capwatch.errors import ModelError

Family = Literal["florence2", "vision-encoder-decoder", "clip", "siglip", "marian"]
#: What a model is for: captioning ([model]), image–text embeddings for search by meaning ([embed]), or
#: translating captions ([language] models).
Kind = Literal["caption", "embed", "translate"]
#: Families of image–text embedding models; every other family captions.
EMBED_FAMILIES: tuple[Family, ...] = ("clip", "siglip")

#: File-name suffix of each precision, as Optimum / transformers.js name the variants.
PRECISION_SUFFIX: Mapping[Precision, str] = {"fp32": "", "int8": "_quantized", "fp16": "_fp16"}

#: Graphs each family needs, in the ``onnx/`` folder.
FAMILY_GRAPHS: Mapping[Family, tuple[str, ...]] = {
    "florence2": ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged"),
    "vision-encoder-decoder": ("encoder_model", "decoder_model_merged"),
    "clip": ("vision_model", "text_model"),
    "siglip": ("vision_model", "text_model"),
    "marian": ("encoder_model", "decoder_model_merged"),
}

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

#: Graphs whose precision differs from the model's, as (graph stem, precision) pairs sorted by stem.
GraphPrecision = tuple[tuple[str, Precision], ...]
_GRAPH_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def precision_key(base: str, graphs: Mapping[str, str] | GraphPrecision = ()) -> str:
    """One name for a precision with per-graph exceptions, used for cache markers and shown in ``status``:
    ``int8``, or ``int8+vision_encoder=fp32`` (graphs sorted; those equal to ``base`` left out)."""
    items = sorted(dict(graphs).items())
    parts = [f"{stem}={precision}" for stem, precision in items if precision != base]
    return base if not parts else f"{base}+{','.join(parts)}"


def split_precision_key(key: str) -> tuple[str, dict[str, Precision]]:
    """The base precision and the per-graph exceptions of a :func:`precision_key`. Raises ModelError (one line)
    for a malformed key or an unknown precision."""
    base, _, rest = key.partition("+")
    graphs: dict[str, Precision] = {}
    for item in filter(None, rest.split(",")):
        stem, _, precision = item.partition("=")
        if not _GRAPH_RE.match(stem) or precision not in PRECISION_SUFFIX:
            raise ModelError(f"precision {key!r}: expected graph=fp32|int8|fp16 after '+', got {item!r}")
        graphs[stem] = typing.cast(Precision, precision)
    return base, graphs


def is_commit(revision: str) -> bool:
    """True when ``revision`` is a full commit hash (immutable), False for a branch or tag name."""
    return bool(_COMMIT_RE.match(revision))


@dataclass(frozen=True)
class FileSpec:
    """One file of a model repository.

    ``sha256``/``size`` are pins: when set, the download must match them in addition to what the hub reports.
    An ``optional`` file may be missing from the repository (HTTP 404) without failing the pull.
    """

    path: str
    sha256: str | None = None
    size: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class PrecisionSpec:
    """The ONNX graphs of one precision and the approximate total download (graphs + shared files)."""

    #: A plain precision, or a :func:`precision_key` with per-graph exceptions.
    precision: str
    files: tuple[FileSpec, ...]
    approx_bytes: int


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where it lives on the hub, which revision, and which files make each precision."""

    name: str
    repo: str
    #: A full commit hash, or a branch name (documented as unpinned) when no commit could be pinned.
    revision: str
    family: Family
    description: str
    licence: str
    shared_files: tuple[FileSpec, ...]
    precisions: tuple[PrecisionSpec, ...]
    default_precision: Precision
    #: Graphs that run at another precision than ``default_precision`` by default (measured faster; see
    #: bench/caption_florence.py), used when the configuration says precision "auto" and no graph_precision.
    default_graph_precision: GraphPrecision = ()
    #: True for the model capwatch uses when the configuration names none.
    default: bool = False
    #: caption_length -> task prompt (Florence-2); empty for models that take no prompt.
    task_prompts: tuple[tuple[str, str], ...] = ()
    notes: str = ""
    #: True for a spec built from the configuration's ``model.repo`` (see :func:`custom_spec`), which
    #: ``capwatch models pull NAME`` does not know.
    from_config: bool = False

    @property
    def kind(self) -> Kind:
        """``embed`` for image–text embedding models (CLIP, SigLIP), ``translate`` for translation models
        (Marian), ``caption`` for captioners."""
        if self.family in EMBED_FAMILIES:
            return "embed"
        return "translate" if self.family == "marian" else "caption"

    @property
    def precision_names(self) -> tuple[str, ...]:
        """The precisions this repository publishes, in registry order."""
        return tuple(p.precision for p in self.precisions)

    @property
    def default_key(self) -> str:
        """The precision key of the default precision with the default per-graph exceptions."""
        return precision_key(self.default_precision, self.default_graph_precision)

    def precision(self, precision: str) -> PrecisionSpec:
        """The files of one precision, or of a :func:`precision_key` mix (each excepted graph's file taken from its
        own precision). Raises ModelError (one line) when the repository does not publish a precision or a graph
        named."""
        base, graphs = split_precision_key(precision)
        found = self._plain(base)
        files = list(found.files)
        approx = found.approx_bytes
        for stem, other in graphs.items():
            ours = f"onnx/{stem}{PRECISION_SUFFIX[typing.cast(Precision, base)]}.onnx"
            where = next((i for i, f in enumerate(files) if f.path == ours), None)
            if where is None:
                known = ", ".join(f.path.removeprefix("onnx/").split(".")[0] for f in found.files)
                raise ModelError(f"model {self.name} has no graph {stem!r} (its graphs: {known})")
            theirs = f"onnx/{stem}{PRECISION_SUFFIX[other]}.onnx"
            source = self._plain(other)
            files[where] = next((f for f in source.files if f.path == theirs), FileSpec(theirs))
            approx += source.approx_bytes // max(1, len(source.files))
        return PrecisionSpec(precision_key(base, graphs), tuple(files), approx)

    def _plain(self, precision: str) -> PrecisionSpec:
        for spec in self.precisions:
            if spec.precision == precision:
                return spec
        available = ", ".join(self.precision_names)
        raise ModelError(f"model {self.name} has no {precision} variant; available: {available}")

    def files(self, precision: str) -> tuple[FileSpec, ...]:
        """Shared files followed by the ONNX graphs of ``precision``. Raises ModelError for an unknown precision."""
        return self.shared_files + self.precision(precision).files

    @property
    def pinned(self) -> bool:
        """True when the revision is an immutable commit."""
        return is_commit(self.revision)


def graph_files(
    family: Family, precision: Precision, pins: Mapping[str, tuple[int, str]] | None = None
) -> tuple[FileSpec, ...]:
    """``onnx/<graph><suffix>.onnx`` for every graph of ``family``; ``pins`` maps a path to (size, sha256)."""
    pins = pins or {}
    out = []
    for graph in FAMILY_GRAPHS[family]:
        path = f"onnx/{graph}{PRECISION_SUFFIX[precision]}.onnx"
        size, sha = pins.get(path, (None, None))
        out.append(FileSpec(path, sha256=sha, size=size))
    return tuple(out)


def _shared(pins: Mapping[str, tuple[int, str]] | None = None, *, text_only: bool = False) -> tuple[FileSpec, ...]:
    pins = pins or {}
    names: tuple[str, ...] = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json")
    if text_only:  # a translation model has no image preprocessor
        names = tuple(n for n in names if n != "preprocessor_config.json")
    required = tuple(FileSpec(n, size=pins.get(n, (None, None))[0], sha256=pins.get(n, (None, None))[1])
                     for n in names)
    # tokenizer_config.json carries nothing the engine needs (special ids come from the model configs), so a
    # repository without it must not make the pull fail.
    size, sha = pins.get("tokenizer_config.json", (None, None))
    extra: tuple[FileSpec, ...] = ()
    if text_only:
        # Marian's own SentencePiece source model and joint vocabulary: with them the source text is encoded exactly
        # as transformers' MarianTokenizer does (capwatch.models.marian); without them tokenizer.json is used.
        extra = (FileSpec("source.spm", optional=True), FileSpec("vocab.json", optional=True))
    return (*required, FileSpec("tokenizer_config.json", sha256=sha, size=size, optional=True), *extra)


# Sizes and sha256 recorded at onnx-community/Florence-2-base-ft@e88a44eaf3791a35eae0c5a47b3dbcd36e67eb6f.
_FLORENCE_BASE_SHARED_PINS: Mapping[str, tuple[int, str]] = {
    "config.json": (5432, "d90c22ed72eb55291f183fcd9b98ebd3bd3d92bfcffb6c7f6e1606085e793525"),
    "generation_config.json": (292, "7b8eb17bbd6cf8a07f619ad83ae03881eff05b6b9237bab89005b40e77783c29"),
    "preprocessor_config.json": (2673, "c892857e34a7082284983a7717717d39c9bf7e574f1f41d80d4c918c97502efa"),
    "tokenizer.json": (2297961, "d69dcdb2323e124ac4f800cb9863ddccea0d7bb11e16125e8df3bd60f2f8aeac"),
    "tokenizer_config.json": (197658, "d8e64607233cb53b619fb46664f6cad08176c26e0e8735b2d30d888364f19600"),
}
_FLORENCE_BASE_INT8_PINS: Mapping[str, tuple[int, str]] = {
    "onnx/vision_encoder_quantized.onnx":
        (93746540, "3b79d54f23f666f731549db23cb070c35a979ce19cbd9720e90e67a78dc9768c"),
    "onnx/embed_tokens_quantized.onnx":
        (39390433, "6b2258db1c8ee9b160576ccde3cd3814d83a2edaed0dd1c6ca9ff3c38fa62214"),
    "onnx/encoder_model_quantized.onnx":
        (43651493, "f4ad7a68f1fb875d3bcf735ea14a7021b7ba7e83baf7cf10289881b4ed6d9b85"),
    "onnx/decoder_model_merged_quantized.onnx":
        (98177697, "f22f52f980c33df0efa15932c2f3db6d9d3595ce6387eca938b8cfe23dc4c641"),
}

_FLORENCE_PROMPTS: tuple[tuple[str, str], ...] = (
    ("short", "<CAPTION>"),
    ("detailed", "<DETAILED_CAPTION>"),
    ("paragraph", "<MORE_DETAILED_CAPTION>"),
)
_FLORENCE_NOTES = (
    "task prompt from model.caption_length (short <CAPTION>, detailed <DETAILED_CAPTION>, paragraph "
    "<MORE_DETAILED_CAPTION>); generation: decoder start 2, forced BOS 0 / EOS 2, num_beams 3, "
    "no_repeat_ngram_size 3"
)

def _embed_shared() -> tuple[FileSpec, ...]:
    """The small files of an image–text embedding model (no generation_config.json: nothing is generated)."""
    return (FileSpec("config.json"), FileSpec("preprocessor_config.json"), FileSpec("tokenizer.json"),
            FileSpec("tokenizer_config.json", optional=True), FileSpec("special_tokens_map.json", optional=True))


_EMBED_NOTES = ("search by meaning ([embed] model); vectors are L2-normalised get_image_features / "
                "get_text_features, compared by cosine")

#: The models capwatch knows by name. The first entry flagged ``default`` is the default model.
CAPTION_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="florence-2-base-ft",
        repo="onnx-community/Florence-2-base-ft",
        revision="e88a44eaf3791a35eae0c5a47b3dbcd36e67eb6f",
        family="florence2",
        description="Florence-2 base, fine-tuned (0.23 B; COCO CIDEr 140.0): best small captioner",
        licence="MIT",
        shared_files=_shared(_FLORENCE_BASE_SHARED_PINS),
        precisions=(
            PrecisionSpec("int8", graph_files("florence2", "int8", _FLORENCE_BASE_INT8_PINS), 277_470_179),
            PrecisionSpec("fp32", graph_files("florence2", "fp32"), 1_088_000_000),
            PrecisionSpec("fp16", graph_files("florence2", "fp16"), 547_000_000),
        ),
        default_precision="int8",
        default=True,
        task_prompts=_FLORENCE_PROMPTS,
        notes=_FLORENCE_NOTES,
    ),
    ModelSpec(
        name="florence-2-large-ft",
        repo="onnx-community/Florence-2-large-ft",
        revision="04ace74913c28d7ec94af32cee5c111a10126b6f",
        family="florence2",
        description="Florence-2 large, fine-tuned (0.77 B; COCO CIDEr 143.3): slower, slightly better",
        licence="MIT",
        shared_files=_shared(),
        precisions=(
            PrecisionSpec("int8", graph_files("florence2", "int8"), 920_000_000),
            PrecisionSpec("fp32", graph_files("florence2", "fp32"), 3_600_000_000),
            PrecisionSpec("fp16", graph_files("florence2", "fp16"), 1_800_000_000),
        ),
        default_precision="int8",
        task_prompts=_FLORENCE_PROMPTS,
        notes=_FLORENCE_NOTES,
    ),
    ModelSpec(
        name="vit-gpt2",
        repo="Xenova/vit-gpt2-image-captioning",
        revision="215b4edcb7ec1fad5905a18a03f7b2007f6fabd0",
        family="vision-encoder-decoder",
        description="ViT-GPT2 (nlpconnect, COCO): light and fast, short generic captions",
        licence="Apache-2.0",
        shared_files=_shared(),
        precisions=(
            PrecisionSpec("int8", graph_files("vision-encoder-decoder", "int8"), 248_000_000),
            PrecisionSpec("fp32", graph_files("vision-encoder-decoder", "fp32"), 961_000_000),
        ),
        default_precision="int8",
        notes="no prompt; generation_config.json: num_beams 4, max_length 16 (nlpconnect's card)",
    ),
    # Image–text embedding models (kind "embed"). Commits are those public projects pin; no per-file sha256 was
    # found recorded at them, so files are verified against the sums the hub reports (as florence-2-large-ft).
    ModelSpec(
        name="siglip2-base",
        repo="onnx-community/siglip2-base-patch16-224-ONNX",
        revision="ba1f3b0843f24bc5417d38e19c37b287d719b2f4",
        family="siglip",
        description="SigLIP 2 base/16 at 224 px (multilingual, Gemma tokenizer; 0.37 B): search by meaning in "
                    "the user's language",
        licence="Apache-2.0",
        shared_files=_embed_shared(),
        precisions=(
            PrecisionSpec("int8", graph_files("siglip", "int8"), 420_000_000),
            PrecisionSpec("fp32", graph_files("siglip", "fp32"), 1_540_000_000),
            PrecisionSpec("fp16", graph_files("siglip", "fp16"), 790_000_000),
        ),
        default_precision="int8",
        default=True,
        notes=_EMBED_NOTES,
    ),
    ModelSpec(
        name="clip-vit-b32",
        repo="Xenova/clip-vit-base-patch32",
        revision="4c1807b705b1d015fb032789cc4d221b23025a6f",
        family="clip",
        description="OpenAI CLIP ViT-B/32 at 224 px (English only; 0.15 B): the light alternative, about a "
                    "quarter of SigLIP 2's image cost",
        licence="MIT",
        shared_files=_embed_shared(),
        precisions=(
            PrecisionSpec("int8", graph_files("clip", "int8"), 156_000_000),
            PrecisionSpec("fp32", graph_files("clip", "fp32"), 608_000_000),
            PrecisionSpec("fp16", graph_files("clip", "fp16"), 305_000_000),
        ),
        default_precision="int8",
        notes=_EMBED_NOTES,
    ),
    ModelSpec(
        name="siglip-base",
        repo="Xenova/siglip-base-patch16-224",
        revision="294847d6b5fe86c91330269da98ce112d6c75e7e",
        family="siglip",
        description="SigLIP base/16 at 224 px (English only; 0.20 B)",
        licence="Apache-2.0",
        shared_files=_embed_shared(),
        precisions=(
            PrecisionSpec("int8", graph_files("siglip", "int8"), 212_000_000),
            PrecisionSpec("fp32", graph_files("siglip", "fp32"), 815_000_000),
            PrecisionSpec("fp16", graph_files("siglip", "fp16"), 409_000_000),
        ),
        default_precision="int8",
        notes=_EMBED_NOTES,
    ),
)


#: The English -> language translation models published in the transformers.js layout (Xenova/opus-mt-en-XX:
#: config.json, generation_config.json, tokenizer.json, onnx/encoder_model*.onnx, onnx/decoder_model_merged*.onnx),
#: by the language they translate into (ISO 639-1), with the language's English name. Helsinki-NLP names Japanese
#: "jap". No public source records a commit or per-file sha256 for these repositories, so they follow the registry's
#: unpinned handling: revision "main", every file checked against the sha256 (LFS) or git blob sha1 the hub reports,
#: and the commit actually downloaded recorded next to the files.
TRANSLATION_LANGUAGES: Mapping[str, tuple[str, str]] = {
    "de": ("German", "de"), "fr": ("French", "fr"), "es": ("Spanish", "es"), "it": ("Italian", "it"),
    "nl": ("Dutch", "nl"), "sv": ("Swedish", "sv"), "da": ("Danish", "da"), "fi": ("Finnish", "fi"),
    "cs": ("Czech", "cs"), "hu": ("Hungarian", "hu"), "ro": ("Romanian", "ro"), "ru": ("Russian", "ru"),
    "uk": ("Ukrainian", "uk"), "ar": ("Arabic", "ar"), "hi": ("Hindi", "hi"), "zh": ("Chinese", "zh"),
    "ja": ("Japanese", "jap"), "vi": ("Vietnamese", "vi"), "id": ("Indonesian", "id"), "af": ("Afrikaans", "af"),
}


def translation_model_name(language: str) -> str:
    """The registry name of the English -> ``language`` translation model (``opus-mt-en-de``)."""
    return f"opus-mt-en-{TRANSLATION_LANGUAGES[language][1]}" if language in TRANSLATION_LANGUAGES else ""


def _translation_spec(language: str) -> ModelSpec:
    english, code = TRANSLATION_LANGUAGES[language]
    return ModelSpec(
        name=f"opus-mt-en-{code}",
        repo=f"Xenova/opus-mt-en-{code}",
        revision="main",
        family="marian",
        description=f"Marian opus-mt English -> {english} ({language}): translates captions and keywords",
        licence="CC-BY-4.0",
        shared_files=_shared(text_only=True),
        precisions=(
            PrecisionSpec("int8", graph_files("marian", "int8"), 106_000_000),
            PrecisionSpec("fp32", graph_files("marian", "fp32"), 420_000_000),
        ),
        default_precision="int8",
        notes="translation model ([language] models); generation_config.json: num_beams 4, bad_words_ids [[pad]]",
    )


TRANSLATION_REGISTRY: tuple[ModelSpec, ...] = tuple(_translation_spec(lang) for lang in TRANSLATION_LANGUAGES)
#: Every model the store knows by name: captioners first, then the translation models.
REGISTRY: tuple[ModelSpec, ...] = CAPTION_MODELS + TRANSLATION_REGISTRY


def all_specs(registry: Sequence[ModelSpec] = REGISTRY) -> tuple[ModelSpec, ...]:
    """Every registry entry, in display order."""
    return tuple(registry)


def default_spec(registry: Sequence[ModelSpec] = REGISTRY, kind: Kind = "caption") -> ModelSpec:
    """The default model of ``kind`` (its entry flagged ``default``, else its first). Raises ModelError when the
    registry has none of that kind."""
    entries = [spec for spec in registry if spec.kind == kind]
    for spec in entries:
        if spec.default:
            return spec
    if not entries:
        what = {"embed": "embedding", "translate": "translation"}.get(kind, "captioning")
        raise ModelError(f"the model registry has no {what} model")
    return entries[0]


def get_spec(name: str, registry: Sequence[ModelSpec] = REGISTRY) -> ModelSpec:
    """The entry called ``name``. Raises ModelError (one line, listing the known names) when there is none."""
    for spec in registry:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in registry)
    raise ModelError(f"unknown model {name!r}; known models: {known} (or use --model DIR for a local directory)")


#: What a model named only by its hub repository (``[model] repo``) is assumed to weigh at most: the store refuses
#: any of its files announced at more than twice this (no registry pin bounds them).
CUSTOM_MODEL_BYTES = 2 << 30

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# The name becomes a folder in the cache: no separators, no dot-only names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def custom_spec(name: str, repo: str, revision: str | None = None) -> ModelSpec:
    """The spec of a model named by its hub repository (``[model] repo`` + ``revision``) rather than the registry.

    ``name`` is its folder in the cache; ``revision`` a commit (reproducible) or a branch (default ``main``). No
    file is pinned: each is checked against the sha256 (LFS) or git blob sha1 the hub reports. Each precision asks
    for the graphs every family needs (``encoder_model``, ``decoder_model_merged``) and Florence-2's other two as
    optional files, so one spec fits both families; which family it is, config.json says when the captioner opens
    (``family`` is set to the family whose graphs are the required ones). Returns the spec; raises ModelError (one
    line) for a name, repository or revision capwatch cannot use safely.
    """
    if not _NAME_RE.match(name):
        raise ModelError(f"model name {name!r} cannot name a model folder (letters, digits, '.', '_', '-')")
    if not _REPO_RE.match(repo) or ".." in repo:
        raise ModelError(f"model repo {repo!r} is not a hub repository name like 'owner/model'")
    revision = revision or "main"
    if len(revision) > 200 or not revision.isprintable() or any(ch.isspace() for ch in revision):
        raise ModelError(f"model revision {revision!r} is not a commit, branch or tag name")

    def graphs(precision: Precision) -> tuple[FileSpec, ...]:
        suffix = PRECISION_SUFFIX[precision]
        required = set(FAMILY_GRAPHS["vision-encoder-decoder"])
        return tuple(FileSpec(f"onnx/{graph}{suffix}.onnx", optional=graph not in required)
                     for graph in FAMILY_GRAPHS["florence2"])

    return ModelSpec(
        name=name, repo=repo, revision=revision, family="vision-encoder-decoder",
        description=f"{repo}@{revision} (from the configuration's model.repo)", licence="see the repository",
        shared_files=_shared(),
        precisions=tuple(PrecisionSpec(p, graphs(p), CUSTOM_MODEL_BYTES) for p in ("int8", "fp32", "fp16")),
        default_precision="int8",
        from_config=True,
    )
