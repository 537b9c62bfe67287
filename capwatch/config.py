"""Configuration: frozen dataclasses, loaded from TOML and validated field by field.

Load order (first found wins, nothing is merged across files): ``--config PATH``, ``$CAPWATCH_CONFIG``,
``<XDG config dir>/capwatch/config.toml``, built-in defaults. Then ``$CAPWATCH_DB`` / ``$CAPWATCH_MODEL`` and the
CLI's ``--db`` / ``--model`` override single fields.

Every error names the file, the dotted key and what is allowed, on one line, e.g.
``config.toml: model.precision: expected one of 'auto', 'fp32', 'int8', 'fp16', got 'int4'``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from capwatch import paths
from capwatch.errors import ConfigError

Precision = Literal["auto", "fp32", "int8", "fp16"]
CaptionLength = Literal["short", "detailed", "paragraph"]
WriteMode = Literal["embedded", "sidecar", "both", "none"]
ExistingPolicy = Literal["keep", "overwrite"]
LogLevel = Literal["debug", "info", "warning", "error"]

#: Extensions (lower case, no dot) capwatch treats as images by default.
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    "jpg", "jpeg", "jpe", "png", "webp", "tif", "tiff", "heic", "heif", "avif", "gif", "bmp",
    "dng", "cr2", "cr3", "nef", "nrw", "arw", "srf", "sr2", "orf", "rw2", "raf", "pef", "srw", "x3f", "3fr", "iiq",
)

#: Folders that NAS systems and desktop tools fill with thumbnails, never photos of the user.
DEFAULT_EXCLUDE: tuple[str, ...] = ("**/@eaDir/**", "**/#recycle/**", "**/.thumbnails/**", "**/.Trash-*/**")


@dataclass(frozen=True)
class RootConfig:
    """One library folder. ``include``/``exclude`` are globs relative to the root (``**`` spans folders)."""

    path: Path
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class LibraryConfig:
    roots: tuple[RootConfig, ...] = ()
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    include_hidden: bool = False
    follow_symlinks: bool = False


@dataclass(frozen=True)
class IndexConfig:
    #: None means ``<XDG state dir>/capwatch/index.db``.
    path: Path | None = None
    #: Seconds to wait for another process's write lock before giving up with a clear message.
    busy_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    #: Registry name (``capwatch models list``); ignored when ``dir`` is set.
    name: str = "florence-2-base-ft"
    #: A local model directory in the Hugging Face / transformers.js ONNX layout.
    dir: Path | None = None
    #: auto: a named model's recommended precision (int8); for a model directory, fp32 when it has it (the
    #: reference output), else int8, else fp16.
    precision: Precision = "auto"
    #: onnxruntime intra-op threads; 0 = all cores.
    threads: int = 0
    #: Unload the model after this many idle seconds (0 = never) so an idle daemon stays small.
    idle_unload_seconds: float = 300.0
    batch_size: int = 8
    #: Florence-2 task: short (<CAPTION>), detailed (<DETAILED_CAPTION>), paragraph (<MORE_DETAILED_CAPTION>).
    caption_length: CaptionLength = "short"
    # Generation overrides; unset means "as the model's generation_config.json says".
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    early_stopping: bool | None = None


@dataclass(frozen=True)
class MetadataConfig:
    write: WriteMode = "embedded"
    existing: ExistingPolicy = "keep"
    #: With existing = "keep": still caption a described image, into the index only (never into the file).
    index_only_when_described: bool = False
    keep_mtime: bool = True
    windows_xp_tags: bool = False


@dataclass(frozen=True)
class WatchConfig:
    #: A file is processed once its size and mtime have not changed for this long.
    settle_seconds: float = 2.0
    #: Use a polling observer (NFS/SMB mounts, where inotify sees no remote changes).
    poll: bool = False
    poll_interval_seconds: float = 30.0
    #: Collect up to model.batch_size images, waiting at most this long for a batch to fill.
    batch_wait_ms: int = 500
    queue_size: int = 1024
    #: Re-check roots that were missing or unmounted this often.
    recheck_missing_seconds: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    level: LogLevel = "info"
    #: None = stderr (the journal, under systemd).
    file: Path | None = None


@dataclass(frozen=True)
class Config:
    library: LibraryConfig = field(default_factory=LibraryConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: The file this was loaded from, or None for built-in defaults.
    source: Path | None = None

    def index_path(self, env: Mapping[str, str] = os.environ) -> Path:
        """The index database file this configuration points at."""
        return self.index.path or paths.default_index_path(env)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | str | None = None, env: Mapping[str, str] = os.environ) -> Config:
    """Load the configuration in the documented order and apply ``$CAPWATCH_DB`` / ``$CAPWATCH_MODEL``.

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
    return apply_overrides(config, db=env.get("CAPWATCH_DB") or None, model=env.get("CAPWATCH_MODEL") or None)


def load_config_file(path: Path) -> Config:
    """Parse and validate one TOML file. Raises ConfigError naming the file on any problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    config: Config = _build(Config, data, _Ctx(path, ""))
    return dataclasses.replace(config, source=path)


def apply_overrides(config: Config, *, db: str | Path | None = None, model: str | Path | None = None) -> Config:
    """Return ``config`` with the index path and/or model replaced (CLI flags and environment variables).

    ``model`` is taken as a directory when it names an existing directory or contains a path separator,
    otherwise as a registry name.
    """
    if db is not None:
        config = dataclasses.replace(config, index=dataclasses.replace(config.index, path=Path(db).expanduser()))
    if model is not None:
        text = str(model)
        candidate = Path(text).expanduser()
        if candidate.is_dir() or os.sep in text or text.startswith("."):
            new_model = dataclasses.replace(config.model, dir=candidate)
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
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ctx.child(unknown[0]).fail(f"unknown key; allowed keys here: {', '.join(names)}")
    values = {name: _coerce(data[name], hints[name], ctx.child(name)) for name in names if name in data}
    return cls(**values)


def _coerce(value: object, tp: Any, ctx: _Ctx) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config type {tp}")
        return _coerce(value, inner[0], ctx)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ctx.fail(f"expected one of {choices}, got {value!r}")
        return value
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
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(f"expected an integer, got {value!r}")
        if value < 0:
            raise ctx.fail(f"expected a non-negative integer, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.fail(f"expected a number, got {value!r}")
        if value < 0:
            raise ctx.fail(f"expected a non-negative number, got {value}")
        return float(value)
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
