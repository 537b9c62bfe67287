"""The command line's common ground: the click group, global options, configuration, logging, and ``main``.

Exit codes (the CLI contract): 0 ok; 1 some files failed (the others were still done); 2 usage, config, query or
index error, reported as ONE line on stderr (``capwatch: error: ...``), never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from capwatch import __version__
from capwatch.config import Config, RootConfig, apply_overrides, load_config
from capwatch.errors import CapwatchError

if TYPE_CHECKING:
    from capwatch.library.index import Index
    from capwatch.models.captioner import Captioner

log = logging.getLogger("capwatch")


@dataclass(frozen=True)
class AppContext:
    """What every command gets: the loaded configuration and the verbosity asked for."""

    config_path: str | None
    db: str | None
    model: str | None
    verbosity: int
    #: --system / $CAPWATCH_SYSTEM: the system service's configuration, index, live state and model cache.
    system: bool = False

    def config(self) -> Config:
        """Load the configuration (raises ConfigError) and apply --db / --model."""
        config = load_config(self.config_path, os.environ)
        return apply_overrides(config, db=self.db, model=self.model)


def _setup_logging(config: Config, verbosity: int) -> None:
    level = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
             "error": logging.ERROR}[config.logging.level]
    if verbosity > 0:
        level = logging.DEBUG
    elif verbosity < 0:
        level = logging.ERROR if verbosity < -1 else logging.WARNING
    handler: logging.Handler
    if config.logging.file is not None:
        handler = logging.FileHandler(config.logging.file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        # journald stamps every line itself; elsewhere a time helps reading a long-running log.
        fmt = "%(levelname)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
            "%(asctime)s %(levelname)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root = logging.getLogger("capwatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


#: The paragraph every command's ``--help`` ends with: the global options are hidden in its option list.
_GLOBAL_OPTIONS_HELP = ("The global options (--config PATH, --db PATH, --model NAME|DIR, -v, -q, ...; see `capwatch "
                        "--help`) work here too, before or after the command.")


def _global_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Accept the global options after the subcommand too (``capwatch caption --model DIR FILE``).

    A value given after the subcommand wins over one given before it.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        app: AppContext = ctx.obj
        ctx.obj = dataclasses.replace(
            app,
            config_path=kwargs.pop("g_config") or app.config_path,
            db=kwargs.pop("g_db") or app.db,
            model=kwargs.pop("g_model") or app.model,
            verbosity=app.verbosity + kwargs.pop("g_verbose") - kwargs.pop("g_quiet"),
            system=kwargs.pop("g_system") or app.system,
        )
        return command(*args, **kwargs)

    options = [
        click.option("--config", "g_config", metavar="PATH", hidden=True),
        click.option("--db", "g_db", metavar="PATH", hidden=True),
        click.option("--model", "g_model", metavar="NAME|DIR", hidden=True),
        click.option("-v", "--verbose", "g_verbose", count=True, hidden=True),
        click.option("-q", "--quiet", "g_quiet", count=True, hidden=True),
        click.option("--system", "g_system", is_flag=True, hidden=True),
    ]
    # Hidden here, so each command's help says where to find them.
    wrapper.__doc__ = inspect.cleandoc(command.__doc__ or "") + "\n\n" + _GLOBAL_OPTIONS_HELP
    decorated: Callable[..., Any] = wrapper
    for option in options:
        decorated = option(decorated)
    return decorated


def _load(ctx: click.Context) -> Config:
    app: AppContext = ctx.obj
    if app.system:
        _enter_system_mode(ctx.command_path.split(" ", 1)[-1])
    config = app.config()
    _setup_logging(config, app.verbosity)
    return config


def _open_index(config: Config, *, readonly: bool = False) -> Index:
    from capwatch.library.index import Index

    return Index.open(config.index_path(), busy_timeout=config.index.busy_timeout_seconds, readonly=readonly)


#: Commands that only read the system service's index and live state: with --system, anyone who may read those runs
#: them. Every other command needs the service's own files (write journal, model key and cache, index) and runs with
#: --system only as the user that owns them.
_SYSTEM_READERS_MAY_RUN = frozenset({"search", "status", "models list"})


def _enter_system_mode(command: str) -> None:
    """Give this process the environment systemd gives the system service (``capwatch --system COMMAND``).

    ``CONFIGURATION_DIRECTORY``, ``STATE_DIRECTORY`` and ``CACHE_DIRECTORY`` name the unit's directories
    (capwatch.paths.system_dirs), and the caller's own ``$CAPWATCH_CONFIG``/``_DB``/``_MODEL``/``_CACHE_DIR`` go, so
    the configuration, index, live state, write journal and model cache are the service's (--config, --db and
    --model on the command line still apply). Raises ConfigError (one line) when ``command`` writes and this
    process is not the user that owns the service's state directory: root included, since files it made there
    would belong to root and the service could not use them.
    """
    from capwatch import paths
    from capwatch.errors import ConfigError

    environment = paths.system_environment(os.environ)
    for key in paths.PERSONAL_VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(environment)
    if command in _SYSTEM_READERS_MAY_RUN:
        return
    state = paths.system_dirs(os.environ)[1]
    try:
        owner = os.stat(state).st_uid
    except FileNotFoundError:
        raise ConfigError(f"--system: {state} does not exist: install and start the system service first "
                          "(`capwatch service install --system`)") from None
    except OSError as exc:
        raise ConfigError(f"--system {command}: cannot look at {state}: {exc.strerror or exc}") from None
    if os.geteuid() != owner:
        import pwd

        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise ConfigError(f"--system {command} changes the service's files in {state}, which belong to {name}: "
                          f"run it as that user (sudo -u {name} capwatch --system {command} ...); only search, "
                          "status and models list run as anyone who may read the index")


# --------------------------------------------------------------------------------------------------------------


class _ReaderGone(Exception):
    """Standard output's reader went away (``capwatch status | head -1``)."""


#: Where each command is defined (``capwatch.cli.<module>``): the group imports a command's module only when that
#: command runs (or help lists them all), so `capwatch search` does not import the captioning, serving and
#: service commands, and a search a daemon answers sends its question before the library is imported (see
#: capwatch.cli.find). A test checks this against what the modules register.
COMMAND_MODULES: dict[str, str] = {
    "caption": "captioning", "scan": "captioning", "recaption": "captioning",
    "search": "find", "status": "find",
    "similar": "meaning", "duplicates": "meaning",
    "models": "models",
    "watch": "running", "service": "running",
    "serve": "serving",
}


def _import_commands(module: str) -> None:
    """Import ``capwatch.cli.<module>``, which registers its commands on :data:`cli`."""
    # __import__, not importlib.import_module: the latter bypasses the interpreter's import path that
    # `python -X importtime` reports, and the import costs of a command are worth seeing there.
    __import__(f"capwatch.cli.{module}")


class _CapwatchGroup(click.Group):
    """The top-level group. click turns a broken pipe into exit status 1; for capwatch, as for any Unix filter, a
    reader that stops reading is no failure, so it reaches :func:`main` (exit 0) instead. Commands are imported
    on first use (:data:`COMMAND_MODULES`)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command called ``cmd_name``, its module imported first when it is not registered yet."""
        module = COMMAND_MODULES.get(cmd_name)
        if cmd_name not in self.commands and module is not None:
            _import_commands(module)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name (all their modules imported: help shows each one's summary)."""
        for module in dict.fromkeys(COMMAND_MODULES.values()):
            _import_commands(module)
        return super().list_commands(ctx)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        """Parse the options (``--help`` and ``--version`` print here); raises _ReaderGone as :meth:`invoke` does."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except BrokenPipeError as exc:
            raise _ReaderGone() from exc

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; raises _ReaderGone when its output's reader closed the pipe."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _ReaderGone() from exc


@click.group(cls=_CapwatchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="PATH",
              help="Configuration file (default: $CAPWATCH_CONFIG, then ~/.config/capwatch/config.toml).")
@click.option("--db", metavar="PATH", help="Index database file (default: $CAPWATCH_DB, config, XDG state dir).")
@click.option("--model", metavar="NAME|DIR", help="Model name from `capwatch models list`, or a model directory "
              "(default: $CAPWATCH_MODEL, then config).")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.option("-q", "--quiet", count=True, help="Less log output (-q: warnings only, -qq: errors only).")
@click.option("--system", is_flag=True, envvar="CAPWATCH_SYSTEM",
              help="Use the system service's files: /etc/capwatch/config.toml, its index and live state in "
              "/var/lib/capwatch, its models in /var/cache/capwatch (default: $CAPWATCH_SYSTEM). search and status "
              "work for anyone in group capwatch.")
@click.version_option(__version__, prog_name="capwatch")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, db: str | None, model: str | None, verbose: int,
        quiet: int, system: bool) -> None:
    """Keep a photo library captioned by a local model, with captions inside the files and searchable.

    The options below may also follow the command (capwatch caption --model DIR FILE).

    \b
    Quick start:
      capwatch scan ~/Pictures          # caption everything once (downloads the model on first use)
      capwatch search red bike          # find photos by words
      capwatch watch ~/Pictures         # keep captioning new photos as they arrive
    """
    ctx.obj = AppContext(config_path=config_path, db=db, model=model, verbosity=verbose - quiet, system=system)


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _open_captioner(config: Config) -> Captioner:
    from capwatch.models.captioner import open_captioner
    from capwatch.models.derived import DerivedCache
    from capwatch.models.store import resolve_model

    resolved = resolve_model(config.model, os.environ, download=True)
    # A named model runs the precision that was resolved (and pulled) for it, not whatever else is cached.
    model = dataclasses.replace(config.model, precision=resolved.precision)  # type: ignore[arg-type]
    return open_captioner(resolved.dir, model, model_id=resolved.model_id, revision=resolved.revision,
                          derived=DerivedCache.from_env(os.environ))

# --------------------------------------------------------------------------------------------------------------


def _roots(config: Config, dirs: Sequence[Path]) -> list[RootConfig]:
    if not dirs:
        if not config.library.roots:
            raise click.UsageError("no folders given and none configured in [library] roots")
        return list(config.library.roots)
    configured = {os.path.abspath(r.path): r for r in config.library.roots}
    wanted = sorted({os.path.abspath(d) for d in dirs})
    # A folder inside another one given is already covered: scanning it twice would count its files twice.
    outer = [d for d in wanted if not any(d != o and d.startswith(o.rstrip(os.sep) + os.sep) for o in wanted)]
    return [configured.get(d, RootConfig(path=Path(d))) for d in outer]


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"capwatch: error: {message}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the CLI and map every known failure to one line and an exit code."""
    try:
        # standalone_mode=False: click returns ctx.exit()'s code instead of exiting, and lets errors reach us.
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="capwatch",
                        standalone_mode=False)
        sys.stdout.flush()  # a reader that left is noticed here (see below), not by the interpreter at exit
        if isinstance(code, int):
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.UsageError as exc:
        hint = f" (see `capwatch {exc.ctx.command_path.split(' ', 1)[-1]} --help`)" \
            if exc.ctx is not None and " " in exc.ctx.command_path else " (see `capwatch --help`)"
        _fail(exc.format_message().splitlines()[0] + hint, 2)
    except click.ClickException as exc:
        _fail(exc.format_message().splitlines()[0], exc.exit_code)
    except CapwatchError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (BrokenPipeError, _ReaderGone):
        # `capwatch search ... | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    sys.exit(0)
