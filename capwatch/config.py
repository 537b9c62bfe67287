"""Configuration: frozen dataclasses, loaded from TOML and validated field by field.

Load order (first found wins, nothing is merged across files): ``--config PATH``, ``$CAPWATCH_CONFIG``,
``<XDG config dir>/capwatch/config.toml``, built-in defaults. Then ``$CAPWATCH_DB`` / ``$CAPWATCH_MODEL`` and the
CLI's ``--db`` / ``--model`` override single fields.

Every error names the file, the dotted key and what is allowed, on one line, e.g.
``config.toml: model.precision: expected one of 'auto', 'fp32', 'int8', 'fp16', got 'int4'``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import platformdirs

from capwatch import paths
from capwatch.errors import ConfigError

Precision = Literal["auto", "fp32", "int8", "fp16"]
#: A precision a single graph may have (``model.graph_precision``).
GraphPrecisionName = Literal["fp32", "int8", "fp16"]
#: onnxruntime execution providers by short name (capwatch.models.session.ORT_PROVIDERS has the full names).
Provider = Literal["cpu", "cuda", "tensorrt", "rocm", "migraphx", "openvino", "directml", "coreml", "qnn", "xnnpack",
                   "cann", "dnnl", "acl", "armnn"]
CaptionLength = Literal["short", "detailed", "paragraph"]
WriteMode = Literal["embedded", "sidecar", "both", "none"]
ExistingPolicy = Literal["keep", "overwrite"]
#: Where a video's caption goes when metadata.write embeds: into the file's XMP box, or a NAME.EXT.xmp sidecar.
VideoWriteMode = Literal["embedded", "sidecar"]
LogLevel = Literal["debug", "info", "warning", "error"]
#: Where text in images comes from: nowhere, the rapidocr package (extra ``capwatch[ocr]``), or Florence-2's <OCR>.
OcrEngine = Literal["off", "rapidocr", "florence"]
ServeAuth = Literal["token", "none"]
#: How an int8 image encoder is quantised: as published (dynamic: activation ranges measured at run time), or
#: statically (ranges calibrated once on photos; capwatch.models.staticq).
Int8ImageEncoder = Literal["dynamic", "static"]

#: Extensions (lower case, no dot) capwatch looks after by default (images and videos).
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    "jpg", "jpeg", "jpe", "png", "webp", "tif", "tiff", "heic", "heif", "avif", "gif", "bmp",
    "dng", "cr2", "cr3", "nef", "nrw", "arw", "srf", "sr2", "orf", "rw2", "raf", "pef", "srw", "x3f", "3fr", "iiq",
    # videos (decoded with PyAV: pip install 'capwatch[video]')
    "mp4", "m4v", "mov",
)

#: Folders that NAS systems and desktop tools fill with thumbnails, never photos of the user.
DEFAULT_EXCLUDE: tuple[str, ...] = ("**/@eaDir/**", "**/#recycle/**", "**/.thumbnails/**", "**/.Trash-*/**")


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a numeric setting, in capwatch's config or in a model's JSON files.

    Every int and float field of the config dataclasses carries one (``Annotated[float, Range(0, 86400)]``): the
    loader refuses a field without one, so a new numeric key cannot be added unbounded.
    """

    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{_number(self.lo)} to {_number(self.hi)}"

    def problem(self, value: object, *, integer: bool) -> str | None:
        """Return why ``value`` is not allowed (one line, naming the range), or None when it is allowed.

        ``integer`` asks for an int (bool and float are refused, even 3.0); otherwise an int or a float that is
        finite. Huge ints are compared exactly, never converted to float (which could overflow).
        """
        kind = "an integer" if integer else "a number"
        wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
        if wrong_type:
            return f"expected {kind}, got {short_repr(value)} (allowed: {self})"
        assert isinstance(value, int | float)
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number from {self}, got {value}"
        if value < self.lo or value > self.hi:
            if self.lo == 0:
                kind = "a non-negative integer" if integer else "a non-negative number"
            return f"expected {kind} from {self}, got {short_repr(value)}"
        return None


def short_repr(value: object, limit: int = 80) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, so a message about a huge value stays one short line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of more than {limit} digits"  # repr() of a huge int is slow, or refused past 4300
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


#: Generation limits shared by the [model] overrides below and the check of a model's own generation settings
#: (capwatch.models.generate). Every real model of the supported families is far inside them: ViT-GPT2 uses
#: num_beams 4 and a max_length of 16, Florence-2 num_beams 3, no_repeat_ngram_size 3 and max_length 1025.
#: Beam search keeps num_beams decoder rows per image, so the beam count multiplies memory and time.
NUM_BEAMS = Range(1, 32)
#: Tokens generated after the decoder start token: 4x the 1024 Florence-2's authors allow; buffers grow with it.
NEW_TOKENS = Range(1, 4096)
#: min_length counts the whole decoder sequence, start token included, so it may be one more than NEW_TOKENS.
MIN_LENGTH = Range(0, NEW_TOKENS.hi + 1)
#: Larger n-grams ban nothing a caption would repeat, and the ban's work grows with n.
NO_REPEAT_NGRAM = Range(0, 16)
#: Beam scores are divided by length ** length_penalty; within +-10 that stays finite in float32 for any allowed
#: length (4097 ** 10 < 2 ** 128).
LENGTH_PENALTY = Range(-10, 10)


#: Largest config file read: the commented example is 6 KB; a long list of roots and globs still fits easily.
MAX_CONFIG_FILE_BYTES = 1 << 20

_DAY = 86_400
#: Any duration in seconds: up to a day. Longer waits, timeouts or idle times are mistakes, and values like inf or
#: 1e300 overflow where they are turned into milliseconds or deadlines.
_SECONDS = Range(0, _DAY)


@dataclass(frozen=True)
class RootConfig:
    """One library folder. ``include``/``exclude`` are globs relative to the root (``**`` spans folders)."""

    path: Path
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def default_roots() -> tuple[RootConfig, ...]:
    """The roots used when the configuration names none: the user's pictures folder, when it exists.

    That folder is ``XDG_PICTURES_DIR`` (the environment, then ``user-dirs.dirs``), else ``~/Pictures``, as
    platformdirs reads it from the process environment. Returns an empty tuple when the folder does not exist (a
    service user's home has none), so ``scan`` and ``watch`` without folders ask for them. Never raises.
    """
    try:
        pictures = Path(platformdirs.user_pictures_dir())
    except (OSError, RuntimeError, KeyError):  # no home directory to expand ~ into
        return ()
    return (RootConfig(pictures),) if pictures.is_absolute() and os.path.isdir(pictures) else ()


@dataclass(frozen=True)
class LibraryConfig:
    #: Default: the user's pictures folder when it exists (see :func:`default_roots`), else none.
    roots: tuple[RootConfig, ...] = field(default_factory=default_roots)
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    include_hidden: bool = False
    follow_symlinks: bool = False


@dataclass(frozen=True)
class IndexConfig:
    #: None means ``<XDG state dir>/capwatch/index.db``.
    path: Path | None = None
    #: Seconds to wait for another process's write lock before giving up with a clear message.
    busy_timeout_seconds: Annotated[float, _SECONDS] = 30.0


@dataclass(frozen=True)
class ModelConfig:
    #: Registry name (``capwatch models list``); ignored when ``dir`` is set.
    name: str = "florence-2-base-ft"
    #: A local model directory in the Hugging Face / transformers.js ONNX layout.
    dir: Path | None = None
    #: A hub repository ("owner/model") in that layout, for a model the registry does not know; ``name`` is then
    #: its folder in the cache. Its files are checked against the sums the hub reports (nothing is pinned).
    repo: str | None = None
    #: With ``repo``: a commit (reproducible) or a branch/tag; None means "main".
    revision: str | None = None
    #: auto: a named model's recommended precision (int8); for a model directory, fp32 when it has it (the
    #: reference output), else int8, else fp16.
    precision: Precision = "auto"
    #: Precision per graph (ONNX file stem), overriding ``precision`` for the graphs named, e.g.
    #: {vision_encoder = "fp32"} runs Florence-2's image encoder in fp32 and the rest as ``precision`` says (as
    #: transformers.js's per-graph dtype). Empty with precision "auto": the registry model's measured best mix.
    graph_precision: dict[str, GraphPrecisionName] = field(default_factory=dict)
    #: onnxruntime intra-op threads; 0 = one per physical core this process may run on.
    threads: Annotated[int, Range(0, 1024)] = 0
    #: onnxruntime execution providers, most wanted first (e.g. ["cuda", "cpu"]); those the installed onnxruntime
    #: lacks are skipped with one log line, and the CPU is always the last resort.
    providers: tuple[Provider, ...] = ("cpu",)
    #: Unload the model after this many idle seconds (0 = never) so an idle daemon stays small.
    idle_unload_seconds: Annotated[float, _SECONDS] = 300.0
    #: Run equivalent rewrites of the published graphs where capwatch has one (ViT-GPT2: cross-attention keys and
    #: values computed once per image instead of at every token), made and verified against the published graph
    #: on first use and cached; false runs the published graphs as they are.
    rewrite_graphs: bool = True
    #: "static": an int8 image encoder (Florence-2's vision_encoder) is quantised again statically, its activation
    #: ranges calibrated once on photos, made and checked (features' cosine >= 0.995 with the published graph's)
    #: on first use and cached like the rewrites (needs rewrite_graphs); "dynamic" runs it as published.
    int8_image_encoder: Int8ImageEncoder = "dynamic"
    #: Images per model call; memory grows with it (and with num_beams).
    batch_size: Annotated[int, Range(1, 256)] = 8
    #: Florence-2 task: short (<CAPTION>), detailed (<DETAILED_CAPTION>), paragraph (<MORE_DETAILED_CAPTION>).
    caption_length: CaptionLength = "short"
    # Generation overrides; unset means "as the model's generation_config.json says".
    num_beams: Annotated[int, NUM_BEAMS] | None = None
    max_new_tokens: Annotated[int, NEW_TOKENS] | None = None
    min_length: Annotated[int, MIN_LENGTH] | None = None
    length_penalty: Annotated[float, LENGTH_PENALTY] | None = None
    no_repeat_ngram_size: Annotated[int, NO_REPEAT_NGRAM] | None = None
    early_stopping: bool | None = None
    #: Keywords from the model's object detection (Florence-2 <OD>, on the caption's image features); models
    #: without a detector (ViT-GPT2) produce none.
    keywords: bool = True


#: The embedding model used when the configuration names none (``capwatch models list`` shows it).
DEFAULT_EMBED_MODEL = "siglip2-base"


@dataclass(frozen=True)
class EmbedConfig:
    """Search by meaning: the image–text embedding model (CLIP or SigLIP family).

    Threads, execution providers and the idle unload are those of ``[model]``.
    """

    #: A registry name (``capwatch models list``), a local model directory in the transformers.js layout
    #: (``onnx/vision_model.onnx`` + ``onnx/text_model.onnx``; relative to the config file), or "off".
    model: str = DEFAULT_EMBED_MODEL
    #: auto: a named model's recommended precision; for a directory, fp32 when it has it, else int8, else fp16.
    precision: Precision = "auto"
    #: Images per call of the image encoder.
    batch_size: Annotated[int, Range(1, 256)] = 8

    @property
    def off(self) -> bool:
        """True when search by meaning is switched off."""
        return self.model.strip().lower() == "off"

    @property
    def dir(self) -> Path | None:
        """The model directory when ``model`` names one (an existing directory, or text that looks like a path:
        it contains a path separator or starts with '.' or '~'), else None (a registry name, or "off")."""
        if self.off:
            return None
        return _as_dir(self.model)


def _as_dir(text: str) -> Path | None:
    candidate = Path(text).expanduser()
    if candidate.is_dir() or os.sep in text or text.startswith((".", "~")):
        return candidate
    return None


@dataclass(frozen=True)
class MetadataConfig:
    write: WriteMode = "embedded"
    existing: ExistingPolicy = "keep"
    #: With existing = "keep": still caption a described image, into the index only (never into the file).
    index_only_when_described: bool = False
    keep_mtime: bool = True
    windows_xp_tags: bool = False
    #: Write text found in the image (OCR) into the file's XMP, in capwatch's namespace (never the description).
    write_text: bool = False
    #: Most keywords the model adds per image (largest objects first).
    max_keywords: Annotated[int, Range(0, 200)] = 10
    #: Videos (MP4/MOV): "embedded" writes the XMP where exiftool puts it (media data byte-identical), "sidecar"
    #: always writes NAME.EXT.xmp instead.
    video: VideoWriteMode = "embedded"
    #: Also write capwatch's keywords into the hierarchical lists (Lightroom lr:hierarchicalSubject, digiKam
    #: TagsList) under this parent ("capwatch" gives "capwatch|dog"; "Places|Auto" nests deeper); None: not written.
    keyword_parent: str | None = None


@dataclass(frozen=True)
class LanguageConfig:
    """Captions in other languages: translations of the English caption by Marian models (capwatch.models.marian)."""

    #: Languages (ISO 639-1 codes such as "de", "fr"; a region may follow: "pt-BR") the caption is translated into;
    #: each becomes an xml:lang item of dc:description beside the English one.
    captions: tuple[str, ...] = ()
    #: The language of x-default, EXIF ImageDescription, the IPTC caption and the keywords.
    default: str = "en"
    #: A translation model per language: a registry name (``capwatch models list``) or a model directory in the
    #: transformers.js layout. Languages not named here use the registry's opus-mt-en-XX model.
    models: dict[str, str] = field(default_factory=dict)

    @property
    def languages(self) -> tuple[str, ...]:
        """Every language written: English, the default, then the others, each once."""
        return tuple(dict.fromkeys(("en", self.default, *self.captions)))

    @property
    def translated(self) -> tuple[str, ...]:
        """The languages a translation model makes (all but English)."""
        return tuple(lang for lang in self.languages if lang != "en")


_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")


def check_language(config: LanguageConfig, where: str) -> None:
    """Raise ConfigError (one line, ``where`` first) for a language code that is not ISO 639 (+ region), or a model
    named for a language that is not written."""
    for key, value in [*(("captions", c) for c in config.captions), ("default", config.default),
                       *(("models", k) for k in config.models)]:
        if not _LANGUAGE_RE.match(value):
            raise ConfigError(f"{where}language.{key}: {value!r} is not a language code (e.g. \"de\", \"pt-BR\")")
    extra = sorted(set(config.models) - set(config.translated))
    if extra:
        raise ConfigError(f"{where}language.models.{extra[0]}: {extra[0]!r} is not among language.captions or "
                          "language.default")


@dataclass(frozen=True)
class OcrConfig:
    """Text in images (capwatch.text)."""

    engine: OcrEngine = "off"
    #: Largest image handed to the OCR engine, in pixels; bigger ones are scaled down first (memory, time).
    max_pixels: Annotated[int, Range(1, 100_000_000)] = 4_000_000


@dataclass(frozen=True)
class WatchConfig:
    #: A file is processed once its size and mtime have not changed for this long.
    settle_seconds: Annotated[float, _SECONDS] = 2.0
    #: Use a polling observer (NFS/SMB mounts, where inotify sees no remote changes).
    poll: bool = False
    #: The watcher never polls faster than every 0.1 s, whatever this says.
    poll_interval_seconds: Annotated[float, Range(0.1, _DAY)] = 30.0
    #: Collect up to model.batch_size images, waiting at most this long for a batch to fill.
    batch_wait_ms: Annotated[int, Range(0, 60_000)] = 500
    queue_size: Annotated[int, Range(1, 1_000_000)] = 1024
    #: Re-check roots that were missing or unmounted this often.
    #: The daemon never re-checks more often than every 0.5 s, whatever this says.
    recheck_missing_seconds: Annotated[float, Range(0.5, _DAY)] = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    level: LogLevel = "info"
    #: None = stderr (the journal, under systemd).
    file: Path | None = None


@dataclass(frozen=True)
class ServeConfig:
    """``capwatch serve``: where the web page listens and who may use it."""

    host: str = "127.0.0.1"
    #: 0: any free port (the address is printed at start).
    port: Annotated[int, Range(0, 65535)] = 8765
    #: Results per search page.
    page_size: Annotated[int, Range(1, 500)] = 48
    #: Run the web page inside `capwatch watch` (the daemon, and so the systemd service) instead of on its own.
    in_daemon: bool = False
    #: "token": every request needs the access token (stored 0600 in the state folder), loopback included, since
    #: other local accounts reach 127.0.0.1 too. "none": no token, only on a loopback address (a machine with
    #: one user account).
    auth: ServeAuth = "token"
    #: A connection must deliver a whole request head within this many seconds, or it is closed (slow clients
    #: holding connections open must not lock out the people with the token).
    header_timeout_seconds: Annotated[float, Range(0.5, 300)] = 10.0
    #: The most the thumbnail and preview cache (in the cache folder) may hold, in MB; least recently shown
    #: pictures are deleted first.
    thumbnail_cache_mb: Annotated[int, Range(1, 1_000_000)] = 512
    #: Make a JPEG's thumbnail and preview from the large preview the camera stored in it (MPF, EXIF thumbnail)
    #: when that one is large enough and of the same shape; false decodes the photo itself every time (for files
    #: edited by a program that left a stale preview behind).
    embedded_previews: bool = True


@dataclass(frozen=True)
class ClusterConfig:
    #: A Dask scheduler (``tcp://HOST:8786``): `scan` captions on its workers; None captions on this machine.
    scheduler: str | None = None
    #: Model batches queued per worker at most (each holds its images' bytes until its result is written).
    batches_per_worker: Annotated[int, Range(1, 64)] = 2
    #: How long to wait for the scheduler to answer, and for a first worker to join it.
    connect_timeout_seconds: Annotated[float, Range(1, 3600)] = 10.0
    worker_wait_seconds: Annotated[float, Range(1, _DAY)] = 60.0


@dataclass(frozen=True)
class Config:
    library: LibraryConfig = field(default_factory=LibraryConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    #: The file this was loaded from, or None for built-in defaults.
    source: Path | None = None

    def index_path(self, env: Mapping[str, str] = os.environ) -> Path:
        """The index database file this configuration points at."""
        return self.index.path or paths.default_index_path(env)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | str | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Load the configuration in the documented order and apply ``$CAPWATCH_DB`` / ``$CAPWATCH_MODEL`` /
    ``$CAPWATCH_EMBED_MODEL``.

    Raises ConfigError (one line) when an explicitly named file is missing or unreadable, or any file is invalid.
    """
    chosen: Path | None
    if path is not None:
        chosen = Path(path).expanduser()
    elif env.get("CAPWATCH_CONFIG"):
        chosen = Path(env["CAPWATCH_CONFIG"]).expanduser()
    else:
        default = paths.default_config_path(env)
        chosen = default if default.is_file() else None
    config = Config() if chosen is None else load_config_file(chosen)
    return apply_overrides(config, db=env.get("CAPWATCH_DB") or None, model=env.get("CAPWATCH_MODEL") or None,
                           embed_model=env.get("CAPWATCH_EMBED_MODEL") or None)


def load_config_file(path: Path) -> Config:
    """Parse and validate one TOML file and return its Config.

    Raises ConfigError (one line naming the file, and the dotted key when one is at fault) when the file is missing,
    unreadable, larger than :data:`MAX_CONFIG_FILE_BYTES`, not UTF-8, not TOML (including nesting too deep for the
    parser and integers with more digits than Python converts) or has a key or value that is not allowed.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{path}: too large for a config file (more than {MAX_CONFIG_FILE_BYTES} bytes)")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    except ValueError as exc:  # an integer with more digits than int() converts
        raise ConfigError(f"{path}: invalid TOML: {str(exc).splitlines()[0]}") from None
    config: Config = _build(Config, data, _Ctx(path, ""))
    embed_dir = config.embed.dir
    if embed_dir is not None and not embed_dir.is_absolute():
        # Like every path in a config file: relative to that file, not to wherever the daemon starts.
        embed = dataclasses.replace(config.embed, model=str(path.parent / embed_dir))
        config = dataclasses.replace(config, embed=embed)
    check_language(config.language, f"{path}: ")
    parent = config.metadata.keyword_parent
    if parent is not None and any(not part.strip() for part in parent.split("|")):
        raise ConfigError(f"{path}: metadata.keyword_parent: {parent!r} has an empty level (write \"a\" or \"a|b\")")
    return dataclasses.replace(config, source=path)


def apply_overrides(
    config: Config,
    *,
    db: str | Path | None = None,
    model: str | Path | None = None,
    embed_model: str | Path | None = None,
) -> Config:
    """Return ``config`` with the index path, model and/or embedding model replaced (CLI flags and environment
    variables).

    ``model`` is taken as a directory when it names an existing directory or contains a path separator,
    otherwise as a registry name. ``embed_model`` replaces ``[embed] model`` as it is (a name, a directory, "off").
    """
    if embed_model is not None:
        text = str(embed_model).strip()
        if text:
            config = dataclasses.replace(config, embed=dataclasses.replace(config.embed, model=text))
    if db is not None:
        config = dataclasses.replace(config, index=dataclasses.replace(config.index, path=Path(db).expanduser()))
    if model is not None:
        text = str(model)
        candidate = Path(text).expanduser()
        if candidate.is_dir() or os.sep in text or text.startswith("."):
            new_model = dataclasses.replace(config.model, dir=candidate)
        elif text != config.model.name:
            # Another model by name: the configured repository and revision belonged to the configured one.
            new_model = dataclasses.replace(config.model, name=text, dir=None, repo=None, revision=None)
        else:
            new_model = dataclasses.replace(config.model, name=text, dir=None)
        config = dataclasses.replace(config, model=new_model)
    return config


@dataclass(frozen=True)
class _Ctx:
    file: Path
    key: str

    def child(self, name: str) -> _Ctx:
        return _Ctx(self.file, f"{self.key}.{name}" if self.key else name)

    def fail(self, message: str) -> ConfigError:
        where = f"{self.file}: {self.key}: " if self.key else f"{self.file}: "
        return ConfigError(where + message)


def _describe(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _build(cls: type[Any], data: object, ctx: _Ctx) -> Any:
    if isinstance(data, str) and cls is RootConfig:
        data = {"path": data}  # `roots = ["~/Pictures"]` is shorthand for a table with only a path
    if not isinstance(data, dict):
        raise ctx.fail(f"expected a table, got {_describe(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)  # keep Annotated[..., Range]
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ctx.child(unknown[0]).fail(f"unknown key; allowed keys here: {', '.join(names)}")
    values = {name: _coerce(data[name], hints[name], ctx.child(name)) for name in names if name in data}
    return cls(**values)


_TABLE_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _coerce(value: object, tp: Any, ctx: _Ctx, bounds: Range | None = None) -> Any:
    """Return ``value`` checked against (and converted to) the field type ``tp``.

    ``bounds`` is the Range of an ``Annotated[int|float, Range]`` field. Raises ConfigError (one line naming the
    file and key) for a bad value, TypeError for a field type the loader does not support, including a number
    without a Range (a programming error, caught by the tests).
    """
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        ranges = [e for e in extras if isinstance(e, Range)]
        return _coerce(value, base, ctx, ranges[0] if ranges else bounds)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config type {tp}")
        return _coerce(value, inner[0], ctx, bounds)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ctx.fail(f"expected one of {choices}, got {value!r}")
        return value
    if origin is dict:
        key_type, value_type = get_args(tp)
        if key_type is not str:
            raise TypeError(f"unsupported config type {tp}")
        if not isinstance(value, dict):
            raise ctx.fail(f"expected a table (e.g. {{ name = value }}), got {_describe(value)}")
        table = {}
        for key, item in value.items():
            if not _TABLE_KEY.match(key):
                raise ctx.child(key).fail("expected a name of letters, digits and '_' (at most 64)")
            table[key] = _coerce(item, value_type, ctx.child(key))
        return table
    if origin is tuple:
        (item_type, _ellipsis) = get_args(tp)
        if not isinstance(value, list):
            raise ctx.fail(f"expected a list, got {_describe(value)}")
        return tuple(_coerce(item, item_type, ctx.child(str(i))) for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type[Any], tp), value, ctx)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.fail(f"expected true or false, got {value!r}")
        return value
    if tp is int or tp is float:
        if bounds is None:
            raise TypeError(f"config field {ctx.key} is a number without a Range")
        problem = bounds.problem(value, integer=tp is int)
        if problem is not None:
            raise ctx.fail(problem)
        # In range, so float() cannot overflow (TOML integers may be arbitrarily large).
        return value if tp is int else float(typing.cast(float, value))
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ctx.fail(f"expected a non-empty string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ctx.fail(f"expected a path (non-empty string), got {value!r}")
        path = Path(value).expanduser()
        # Relative paths in a config file mean "relative to that file", not to wherever the daemon starts.
        return path if path.is_absolute() else (ctx.file.parent / path)
    raise TypeError(f"unsupported config type {tp}")
