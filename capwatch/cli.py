"""The ``capwatch`` command line: parse, load config, call one library function, format the output.

Exit codes (the CLI contract): 0 ok; 1 some files failed (the others were still done); 2 usage, config, query or
index error, reported as ONE line on stderr (``capwatch: error: ...``), never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from capwatch import __version__
from capwatch.config import Config, RootConfig, apply_overrides, load_config
from capwatch.errors import CapwatchError

if TYPE_CHECKING:
    from capwatch.library.index import Index
    from capwatch.library.process import FileOutcome, Processor
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


class _CapwatchGroup(click.Group):
    """The top-level group. click turns a broken pipe into exit status 1; for capwatch, as for any Unix filter, a
    reader that stops reading is no failure, so it reaches :func:`main` (exit 0) instead."""

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


# -- search -----------------------------------------------------------------------------------------------------


class _SearchCommand(click.Command):
    """Lets ``-word`` (exclude) through as a search word instead of an unknown option.

    Anything that is not one of the command's own options is moved behind ``--``, so ``capwatch search cat -dog``
    and ``capwatch search -dog cat --json`` work as a person expects.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: dict[str, bool] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for name in (*param.opts, *param.secondary_opts):
                    takes_value[name] = not param.is_flag and not param.count
        options: list[str] = []
        words: list[str] = []
        rest = iter(args)
        for arg in rest:
            if arg == "--":
                words.extend(rest)
                break
            name = arg.split("=", 1)[0]
            if name in takes_value:
                options.append(arg)
                if takes_value[name] and "=" not in arg:
                    options.append(next(rest, ""))
            else:
                words.append(arg)
        return super().parse_args(ctx, [*options, "--", *words])


@cli.command(cls=_SearchCommand)
@_global_options
@click.argument("words", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: path, caption, score, source, "
              "model, taken_at.")
@click.option("--paths", "paths_only", is_flag=True, help="Only the paths, one per line.")
@click.option("-0", "--null", "null_sep", is_flag=True, help="With --paths: separate paths by NUL (for xargs -0).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most N results.")
@click.option("--in", "in_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Only images below DIR.")
@click.option("--since", metavar="DATE", help="Taken on or after DATE (YYYY, YYYY-MM, YYYY-MM-DD, 30d, today).")
@click.option("--until", metavar="DATE", help="Taken on or before DATE (the whole day/month/year named).")
@click.option("--source", type=click.Choice(["human", "model", "embedded"]),
              help="Only captions written by people, by the model, or found in the file as camera boilerplate.")
@click.pass_context
def search(ctx: click.Context, words: tuple[str, ...], as_json: bool, paths_only: bool, null_sep: bool, limit: int,
           in_dir: Path | None, since: str | None, until: str | None, source: str | None) -> None:
    """Find images whose caption (or path) matches WORDS.

    \b
    Words are ANDed.  "a phrase" matches words in order.  -word excludes.
    OR between two words means either.  bik* matches words starting with bik.
    Dates use the date taken (EXIF), or the file's time when the camera gave none.

    \b
    Examples:
      capwatch search red bike leaning on a wall
      capwatch search '"golden retriever"' beach -snow
      capwatch search bike OR bicycle --since 2023 --in ~/Pictures/2023
      capwatch search --paths -0 sunset | xargs -0 ls -l
    """
    from capwatch.errors import QueryError
    from capwatch.library.search import make_filters, parse_query

    if as_json and paths_only:
        raise click.UsageError("--json and --paths cannot be used together")
    if null_sep and not paths_only:
        raise click.UsageError("-0 only goes with --paths")
    config = _load(ctx)
    query = parse_query(list(words))
    filters = make_filters(in_dir=str(in_dir) if in_dir else None, since=since, until=until, source=source)
    styled = sys.stdout.isatty() and not as_json and not paths_only
    marks = ("\x1b[1m", "\x1b[22m") if styled else ("", "")
    with _open_index(config, readonly=True) as index:
        hits = index.search(query, filters, limit=limit, highlight=marks)
    out = sys.stdout
    for hit in hits:
        if as_json:
            out.write(json.dumps({"path": hit.path, "caption": hit.caption, "score": round(hit.score, 4),
                                  "source": hit.source, "model": hit.model, "taken_at": hit.taken_at},
                                 ensure_ascii=False) + "\n")
        elif paths_only:
            out.write(hit.path + ("\0" if null_sep else "\n"))
        else:
            out.write(f"{hit.path}\n    {hit.highlighted or hit.caption}\n")
    if not hits and in_dir is not None and not os.path.isdir(in_dir):
        # Rows below a folder that is gone (an unmounted root) are still searched; a typo finds nothing.
        raise QueryError(f"--in {in_dir}: that folder does not exist (and nothing indexed below it matches)")
    if not hits and not as_json and not paths_only:
        click.echo("no matches", err=True)


# -- status -----------------------------------------------------------------------------------------------------


def _model_label(config: Config) -> str:
    return str(config.model.dir) if config.model.dir is not None else config.model.name


def _running_model(live: dict[str, Any], configured: str) -> str:
    """The model line of `status` while a daemon runs: the model it runs (id, revision, precision), not ours."""
    label = str(live.get("model") or configured)
    model_id, revision, precision = live.get("model_id"), live.get("model_revision"), live.get("model_precision")
    details = [str(model_id) + (f" @ {str(revision)[:12]}" if revision else "")] if model_id else []
    if precision:
        details.append(str(precision))
    text = f"{label} ({', '.join(details)})" if details else label
    if label != configured:
        text += f"  [this configuration says {configured}: reload the daemon to switch]"
    return text


def _check_readable(index_path: Path) -> None:
    """Raise IndexUnavailable (one line naming the file or folder) when a permission keeps this user from reading
    the index at ``index_path``, e.g. ``--system status`` outside the service's group. A missing index is fine."""
    from capwatch.library.index import check_readable

    check_readable(index_path)


def _live_state(index_path: Path) -> dict[str, Any] | None:
    from capwatch.daemon.instance import read_live_state

    return read_live_state(index_path)


@cli.command()
@_global_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show counts by status and source, recent errors, the index and the model (and the daemon, if running)."""
    config = _load(ctx)
    index_path = config.index_path()
    _check_readable(index_path)
    live = _live_state(index_path)
    if index_path.exists():
        with _open_index(config, readonly=True) as index:
            stats = index.stats()
        images, captioned, size = stats.images, stats.captioned, stats.size_bytes
        by_status, by_source = stats.by_status, stats.by_source
        errors = [{"path": e.path, "error": e.error, "at": e.updated_at} for e in stats.last_errors]
    else:
        images = captioned = size = 0
        by_status, by_source, errors = {}, {}, []
    payload = {
        "images": images, "captioned": captioned, "pending": int(by_status.get("pending", 0)),
        "described": int(by_status.get("described", 0)), "errors": int(by_status.get("error", 0)),
        "by_status": by_status, "by_source": by_source, "last_errors": errors,
        # While a daemon runs, the model is the one it runs (its configuration may not be ours).
        "index": str(index_path), "index_bytes": size,
        "model": str(live.get("model") or _model_label(config)) if live else _model_label(config),
        "model_id": live.get("model_id") if live else None,
        "model_revision": live.get("model_revision") if live else None,
        "model_state": live.get("model_state") if live else None,
        "daemon": live,
    }
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False))
        return
    click.echo(f"index      {index_path} ({_human_bytes(size)})" if index_path.exists()
               else f"index      {index_path} (not created yet: run `capwatch scan DIR`)")
    click.echo(f"model      {_running_model(live, _model_label(config)) if live else payload['model']}")
    click.echo(f"images     {images}")
    click.echo(f"captioned  {captioned}  (model {by_source.get('model', 0)}, human {by_source.get('human', 0)}, "
               f"embedded {by_source.get('embedded', 0)})")
    click.echo(f"pending    {payload['pending']}")
    click.echo(f"errors     {payload['errors']}")
    for entry in errors:
        # Most messages already start with the file's path; do not say it twice.
        message = str(entry["error"])
        click.echo(f"  {message}" if message.startswith(str(entry["path"])) else f"  {entry['path']}: {message}")
    if live:
        click.echo(f"daemon     running since {live.get('started', '?')} (pid {live.get('pid')}), "
                   f"{live.get('state', '')}")
        click.echo(f"  queue    {live.get('queue', 0)} ({live.get('queue_live', 0)} live, "
                   f"{live.get('queue_backfill', 0)} backfill), {live.get('in_flight', 0)} in flight, "
                   f"{live.get('settling', 0)} settling")
        if live.get("backfill_total"):
            click.echo(f"  backfill {live.get('backfill_done', 0)} / {live.get('backfill_total')}")
        click.echo(f"  rate     {float(live.get('rate_per_minute') or 0):.1f} images/min; "
                   f"{live.get('captioned', 0)} captioned, {live.get('errors', 0)} errors since the daemon started")
        state = live.get("model_status") or ("loaded" if live.get("model_loaded") else "unloaded")
        click.echo(f"  model    {state}")
        for root in live.get("missing_roots") or []:
            click.echo(f"  missing  {root} (kept in the index; re-checked periodically)")
    else:
        click.echo("daemon     not running")


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


# -- models -----------------------------------------------------------------------------------------------------


def _open_captioner(config: Config) -> Captioner:
    from capwatch.models.captioner import open_captioner
    from capwatch.models.store import resolve_model

    resolved = resolve_model(config.model, os.environ, download=True)
    # A named model runs the precision that was resolved (and pulled) for it, not whatever else is cached.
    model = dataclasses.replace(config.model, precision=resolved.precision)  # type: ignore[arg-type]
    return open_captioner(resolved.dir, model, model_id=resolved.model_id, revision=resolved.revision)


@cli.group()
def models() -> None:
    """List, download and inspect captioning models."""


@models.command("list")
@_global_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Known models, which one is the default, and what is in the local cache."""
    from capwatch.models.store import list_models

    config = _load(ctx)
    for status in list_models(os.environ):
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(status)))
            continue
        chosen = "*" if status.name == config.model.name and config.model.dir is None else " "
        cached = ",".join(status.cached_precisions) if status.cached_precisions else "-"
        default = "default" if status.default else ""
        click.echo(f"{chosen} {status.name:<20} {default:<8} {status.family:<23} cached: {cached:<14} "
                   f"{_human_bytes(status.bytes_on_disk):>9}  {status.description}")


@models.command("pull")
@_global_options
@click.argument("name")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), help="Default: the configured one.")
@click.pass_context
def models_pull(ctx: click.Context, name: str, precision: str | None) -> None:
    """Download model NAME into the cache (resumable; every file verified by sha256).

    Set HF_ENDPOINT to use a mirror and HF_TOKEN for a token; CAPWATCH_OFFLINE=1 forbids any download.
    """
    from capwatch.models.store import pull

    config = _load(ctx)
    show = sys.stderr.isatty()

    def progress(file: str, done: int, total: int) -> None:
        if show:
            pct = f"{100 * done / total:5.1f}%" if total else ""
            click.echo(f"\r{file}: {_human_bytes(done)} of {_human_bytes(total)} {pct}   ", err=True, nl=False)

    configured = None if config.model.precision == "auto" else config.model.precision
    resolved = pull(name, precision or configured, os.environ, progress=progress)
    if show:
        click.echo("", err=True)
    commit = f" (commit {resolved.revision[:12]})" if resolved.revision else ""
    click.echo(f"{name} {resolved.precision} -> {resolved.dir}{commit}")


@models.command("info")
@_global_options
@click.argument("name_or_dir")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def models_info(ctx: click.Context, name_or_dir: str, as_json: bool) -> None:
    """Details of a known model or of any model directory."""
    from capwatch.models.store import model_info

    _load(ctx)
    info = model_info(name_or_dir, os.environ)
    if as_json:
        click.echo(json.dumps(info.to_dict(), ensure_ascii=False))
        return
    lines: list[tuple[str, object]] = [
        ("name", info.name or "-"),
        ("repo", f"{info.repo}@{info.revision}" if info.repo else "-"),
        ("commit", info.commit or "-"),
        ("dir", info.dir or "not downloaded"),
        ("family", f"{info.family} ({info.model_type})" if info.model_type else info.family or "-"),
    ]
    for prec in info.precisions:
        state = "complete" if prec.complete else "incomplete"
        if prec.verified:
            state += ", verified"
        lines.append((f"  {prec.precision}", f"{_human_bytes(prec.bytes)} in {len(prec.files)} graph files, {state}"))
    for prec_name, size in info.approx_bytes:
        if not any(p.precision == prec_name for p in info.precisions):
            lines.append((f"  {prec_name}", f"~{_human_bytes(size)} to download"))
    lines += [
        ("tokenizer", info.tokenizer or "-"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in info.special_tokens) or "-"),
        ("image size", "x".join(map(str, info.image_size)) if info.image_size else "-"),
        ("generation", ", ".join(f"{k}={v}" for k, v in info.generation) or "-"),
        ("task prompts", ", ".join(f"{k} {v!r}" for k, v in info.task_prompts) or "-"),
        ("licence", info.licence or "-"),
        ("about", info.description or "-"),
    ]
    for key, value in lines:
        click.echo(f"{key:<16} {value}")


# -- caption ----------------------------------------------------------------------------------------------------


def _emit(outcome: FileOutcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.as_json(), ensure_ascii=False))
    elif outcome.error:
        _report_failure(outcome.path, outcome.error)
    else:
        note = f"  [{outcome.skipped}]" if outcome.skipped else ""
        written = f"  (written: {', '.join(outcome.written)})" if outcome.written else ""
        click.echo(f"{outcome.path}: {outcome.caption or ''}{written}{note}")


@cli.command()
@_global_options
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print captions; write nothing into files or the index.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file: path, caption, model, written, "
              "skipped, error.")
@click.option("--force", is_flag=True, help="Replace descriptions people wrote too: their words are lost.")
@click.pass_context
def caption(ctx: click.Context, files: tuple[Path, ...], dry_run: bool, as_json: bool, force: bool) -> None:
    """Caption FILES now: write the caption into each file and the index (unless --dry-run).

    A symlink is followed: the file it points to is written and the link stays a link. A file that another
    program changes while it is being captioned is read and captioned again; nothing is written over a change.
    """
    config = _load(ctx)
    unusable = _nothing_to_caption(files)
    if unusable:
        for outcome in unusable:
            _emit(outcome, as_json)
        ctx.exit(1)
    if not dry_run:
        _recover_writes()
    captioner = _open_captioner(config)
    failed = False
    with _maybe_index(config, dry_run) as index:
        processor = _processor(config, index, captioner, dry_run=dry_run, force=force)
        size = max(1, config.model.batch_size)
        for start in range(0, len(files), size):
            for outcome in processor.process(files[start:start + size], skip_captioned=False):
                failed |= outcome.error is not None
                _emit(outcome, as_json)
    captioner.close()
    ctx.exit(1 if failed else 0)


def _nothing_to_caption(files: Sequence[Path]) -> list[FileOutcome]:
    """When none of ``files`` names a regular file (each is missing, unreachable, a folder, ...), return their
    failed outcomes in order; otherwise an empty list, and the processor reports the bad ones among the others.

    Asked before anything else, so a typo costs neither a model download nor a model load. Never raises.
    """
    from capwatch.library.process import FileOutcome, stat_file

    checked = [stat_file(path) for path in files]
    failed = [c for c in checked if isinstance(c, FileOutcome)]
    return failed if len(failed) == len(checked) else []


def _recover_writes() -> None:
    """Settle writes a killed capwatch left behind (every writing command starts with this)."""
    from capwatch.library.process import recover_writes

    recover_writes(log)


def _processor(config: Config, index: Index | None, captioner: Captioner, *, dry_run: bool = False,
               force: bool = False) -> Processor:
    from capwatch.library.process import Processor, hooks_from_env
    from capwatch.metadata import Journal

    return Processor(config, index, captioner, dry_run=dry_run, force=force, journal=Journal.default(),
                     hooks=hooks_from_env(os.environ))


@contextmanager
def _maybe_index(config: Config, skip: bool) -> Iterator[Index | None]:
    if skip:
        yield None
        return
    index = _open_index(config)
    try:
        yield index
    finally:
        index.close()


# -- scan -------------------------------------------------------------------------------------------------------


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


class _Progress:
    """A one-line counter on a TTY (stderr), silent otherwise."""

    def __init__(self, label: str) -> None:
        self.enabled = sys.stderr.isatty()
        self.label = label
        self.started = time.monotonic()

    def __call__(self, count: int) -> None:
        if self.enabled:
            rate = count / max(time.monotonic() - self.started, 1e-6)
            click.echo(f"\r{self.label}: {count} files ({rate:,.0f}/s)   ", err=True, nl=False)

    def done(self) -> None:
        if self.enabled:
            click.echo("", err=True)


@cli.command()
@_global_options
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-caption", is_flag=True, help="Only index: record images and import existing descriptions.")
@click.option("--force", is_flag=True, help="Caption every file again and REPLACE DESCRIPTIONS PEOPLE WROTE: their "
              "words are lost. To redo only capwatch's own captions use `capwatch recaption`.")
@click.pass_context
def scan(ctx: click.Context, dirs: tuple[Path, ...], no_caption: bool, force: bool) -> None:
    """Reconcile DIRS (default: configured roots) with the index, then caption what needs it.

    Unchanged files are skipped by their state alone (size, times, sidecars); moved files keep their captions;
    descriptions already in the files are imported and searchable at once. Safe to interrupt and run again:
    a write cut short is finished or undone by the next run.
    """
    from capwatch.library.scan import reconcile

    config = _load(ctx)
    roots = _roots(config, dirs)
    _recover_writes()
    totals: dict[str, int] = {"seen": 0, "new": 0, "changed": 0, "moved": 0, "removed": 0, "imported": 0,
                              "errors": 0}
    to_caption: list[Path] = []
    missing: list[str] = []
    with _open_index(config) as index:
        for root in roots:
            progress = _Progress(f"scanning {root.path}")
            result = reconcile(root, config, index, progress=progress)
            progress.done()
            if result.root_missing:
                problem = result.root_problem or "missing"
                problem += " (unmounted?)" if problem == "empty" else ""
                kept = f"its {result.kept} indexed images were kept until it is back" if result.kept \
                    else "nothing is indexed there"
                missing.append(f"{root.path} is {problem}; {kept}")
                continue
            totals["seen"] += result.seen
            totals["new"] += len(result.new)
            totals["changed"] += len(result.changed)
            totals["moved"] += len(result.moved)
            totals["removed"] += len(result.removed)
            totals["imported"] += result.imported
            totals["errors"] += len(result.errors)
            for path, message in result.errors:
                _report_failure(path, message)
            to_caption.extend(result.to_caption)
            if force:
                to_caption.extend(Path(r.path) for r in index.iter_records(root.path)
                                  if r.status in ("captioned", "described", "error"))
        captioned = failed = 0
        if not no_caption and to_caption:
            captioned, failed = _caption_all(config, index, to_caption, force)
        # Files that failed in an earlier run and have not changed since are not retried by a scan.
        failed_rows = sum(1 for root in roots for _ in index.iter_records(root.path, status="error"))
    for missing_root in missing:
        click.echo(f"capwatch: warning: {missing_root}", err=True)
    summary = (f"{totals['seen']} images: {totals['new']} new, {totals['changed']} changed, "
               f"{totals['moved']} moved, {totals['removed']} removed, {totals['imported']} descriptions imported")
    if no_caption:
        summary += f"; {len(to_caption)} waiting for a caption"
    else:
        summary += f"; {captioned} captioned"
    failures = totals["errors"] + failed
    if failures:
        summary += f"; {failures} failed (listed above)"
    if earlier_failures := max(0, failed_rows - failures):
        summary += f"; {earlier_failures} failed before and are unchanged since (retry: capwatch recaption --errors)"
    click.echo(summary)
    ctx.exit(1 if failures or missing else 0)


def _report_failure(path: str | Path, message: str) -> None:
    """One line on stderr per failed file (messages usually start with the path already)."""
    text = message.removeprefix(f"{path}: ")
    click.echo(f"{path}: error: {text}", err=True)


def _caption_all(config: Config, index: Index, paths: list[Path], force: bool) -> tuple[int, int]:
    captioner = _open_captioner(config)
    try:
        tally = _caption_many(_processor(config, index, captioner, force=force), paths, skip_captioned=not force)
    finally:
        captioner.close()
    return tally.captioned, tally.failed


@dataclass
class _Tally:
    """What a run over many files did: captioned (new words written or recorded), kept (a person's description
    left alone), unchanged (the same caption again), failed."""

    captioned: int = 0
    kept: int = 0
    unchanged: int = 0
    failed: int = 0


def _caption_many(processor: Processor, paths: list[Path], *, skip_captioned: bool,
                  label: str = "captioning") -> _Tally:
    """Process ``paths`` in batches with a progress bar on a TTY; report each failure in one line at the end."""
    from capwatch.library.process import HUMAN_KEPT

    size = max(1, processor.config.model.batch_size)
    tally = _Tally()
    failures: list[tuple[Path, str]] = []
    show = sys.stderr.isatty()
    started = time.monotonic()
    bar_ctx = click.progressbar(length=len(paths), label=label, file=sys.stderr, show_eta=True,
                                show_pos=True, item_show_func=lambda rate: rate) if show else None
    try:
        for start in range(0, len(paths), size):
            outcomes = processor.process(paths[start:start + size], skip_captioned=skip_captioned)
            for outcome in outcomes:
                if outcome.error:
                    tally.failed += 1
                    failures.append((outcome.path, outcome.error))
                elif outcome.skipped == HUMAN_KEPT:
                    tally.kept += 1
                elif outcome.written or (outcome.caption and not outcome.skipped):
                    tally.captioned += 1
                else:
                    tally.unchanged += 1
            if bar_ctx is not None:
                done = start + len(outcomes)
                rate = 60 * done / max(time.monotonic() - started, 1e-6)
                bar_ctx.update(len(outcomes), f"{rate:,.1f} img/min")
    finally:
        if bar_ctx is not None:
            bar_ctx.render_finish()
    for path, message in failures:
        _report_failure(path, message)
    return tally


# -- recaption --------------------------------------------------------------------------------------------------


def _current_model(config: Config) -> tuple[str, str | None]:
    """The model id and revision captions would be made with now, without loading or downloading anything."""
    from capwatch.errors import ModelError
    from capwatch.models.registry import get_spec
    from capwatch.models.store import resolve_model

    if config.model.dir is not None:
        resolved = resolve_model(config.model, os.environ)
        return resolved.model_id, resolved.revision
    spec = get_spec(config.model.name)
    try:
        resolved = resolve_model(config.model, os.environ)
        return resolved.model_id, resolved.revision
    except ModelError:
        return spec.repo, spec.revision if spec.pinned else None


def _model_ids(names: Sequence[str]) -> frozenset[str]:
    """Model ids as the index records them for each name given: a registry name stands for its repository."""
    from capwatch.models.registry import REGISTRY

    ids = set(names)
    ids.update(spec.repo for spec in REGISTRY if spec.name in names)
    return frozenset(ids)


@cli.command()
@_global_options
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model-changed", is_flag=True,
              help="Captions made by another model, or another revision of it, than the one configured now.")
@click.option("--from-model", "from_model", multiple=True, metavar="NAME",
              help="Captions made by this model: a name from `capwatch models list`, a repository id, or a model "
                   "directory's name (repeatable).")
@click.option("--before", metavar="DATE", help="Captions made before DATE (YYYY, YYYY-MM-DD, 30d, ...).")
@click.option("--errors", is_flag=True, help="Retry the files whose last attempt failed.")
@click.option("--dry-run", is_flag=True, help="List the files that would be captioned again; change nothing.")
@click.pass_context
def recaption(ctx: click.Context, dirs: tuple[Path, ...], model_changed: bool, from_model: tuple[str, ...],
              before: str | None, errors: bool, dry_run: bool) -> None:
    """Caption again the files in DIRS (default: configured roots, else the whole index) whose caption capwatch
    wrote, as chosen.

    A description a person wrote is never replaced: every file is read again first, so words added since the
    last scan are kept too (use `scan --force` to replace people's words). Criteria combine: --model-changed
    --before 2024 takes captions of another model made before 2024; --errors adds the failed files. Safe to
    interrupt and run again: files already done are not chosen again.

    \b
    Examples:
      capwatch recaption --model-changed            # after switching models
      capwatch recaption --from-model vit-gpt2 ~/Pictures/2023
      capwatch recaption --errors                   # retry what failed
    """
    from capwatch.library.recaption import make_criteria, select

    config = _load(ctx)
    # Without DIRS: the configured roots, or else everything the index holds.
    roots = [Path(r.path) for r in _roots(config, dirs)] if dirs or config.library.roots else None
    current = _current_model(config) if model_changed else None
    criteria = make_criteria(model_changed=model_changed, current=current, from_model=_model_ids(from_model),
                             before=before, errors=errors)
    if dry_run:
        with _open_index(config, readonly=True) as index:
            chosen = list(select(index, roots, criteria))
        for record in chosen:
            why = f"failed: {record.error}" if record.status == "error" else \
                f"{record.model or '?'} {(record.model_revision or '')[:12]}, {record.captioned_at or '?'}"
            click.echo(f"{record.path}  ({why.strip()})")
        click.echo(f"{len(chosen)} files would be captioned again")
        return
    _recover_writes()
    with _open_index(config) as index:
        chosen_paths = [Path(r.path) for r in select(index, roots, criteria)]
        if not chosen_paths:
            click.echo("0 files to caption again")
            return
        captioner = _open_captioner(config)
        try:
            tally = _caption_many(_processor(config, index, captioner), chosen_paths, skip_captioned=False,
                                  label="re-captioning")
        finally:
            captioner.close()
    summary = f"{len(chosen_paths)} files: {tally.captioned} captioned again"
    if tally.unchanged:
        summary += f", {tally.unchanged} unchanged (the same caption)"
    if tally.kept:
        summary += f", {tally.kept} kept (a person's description)"
    if tally.failed:
        summary += f"; {tally.failed} failed (listed above)"
    click.echo(summary)
    ctx.exit(1 if tally.failed else 0)


# -- watch ------------------------------------------------------------------------------------------------------


@cli.command()
@_global_options
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-caption", is_flag=True, help="Only keep the index in step (new, moved, deleted files and "
              "descriptions people wrote); load no model.")
@click.pass_context
def watch(ctx: click.Context, dirs: tuple[Path, ...], no_caption: bool) -> None:
    """Run the daemon in the foreground: caption images as they appear in DIRS (default: configured roots).

    Reconciles the roots at start (backfill), then follows changes. SIGTERM/Ctrl-C stop cleanly, SIGHUP re-reads
    the configuration. Under systemd it reports READY, STATUS and WATCHDOG.
    """
    from capwatch.daemon.service import run_daemon

    app: AppContext = ctx.obj
    config = _load(ctx)
    # Without DIRS the daemon follows the configured roots, also when SIGHUP brings a new list.
    roots = _roots(config, dirs) if dirs else None
    if roots is None and not config.library.roots:
        raise click.UsageError("no folders given and none configured in [library] roots")
    # On SIGHUP the same --config/--db/--model apply again, so a reload never loses a command-line choice.
    ctx.exit(run_daemon(config, roots, reload=app.config, caption=not no_caption))


# -- service ----------------------------------------------------------------------------------------------------


@cli.group()
def service() -> None:
    """Run capwatch as a systemd service: install the unit for the capwatch you are running."""


@service.command("install")
@click.option("--user", "scope", flag_value="user",
              help="A user service, for your own photos: ~/.config/systemd/user/capwatch.service (the default).")
@click.option("--system", "scope", flag_value="system",
              help="The system-wide service, run as user capwatch: /etc/systemd/system/capwatch.service (needs "
              "root; also `capwatch --system service install`).")
@click.option("--dry-run", is_flag=True, help="Print the unit on stdout; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing unit that differs; install a system unit even when "
              "the permission bits say user capwatch cannot run this capwatch (an ACL may allow it).")
@click.option("--unit-dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Write capwatch.service into DIR instead (tests, packaging; no root needed).")
@click.pass_context
def service_install(ctx: click.Context, scope: str | None, dry_run: bool, force: bool, unit_dir: Path | None) -> None:
    """Write capwatch.service with ExecStart= the absolute path of this capwatch, then print the next commands.

    Works from a venv or pipx install: the unit runs the same capwatch you typed. An existing unit that differs is
    left alone unless --force. The unit comes from the template shipped with capwatch (systemd/ in its sources).

    \b
    Examples:
      capwatch service install --user
      sudo /opt/capwatch/bin/capwatch service install --system
      capwatch service install --system --dry-run
    """
    from capwatch.daemon import unit

    app: AppContext = ctx.obj
    chosen: unit.Scope = "system" if (scope or ("system" if app.system else "user")) == "system" else "user"
    command = unit.capwatch_command()
    text = unit.render_unit(chosen, command)
    directory = unit_dir if unit_dir is not None else unit.default_unit_dir(chosen)
    problem = unit.unreachable_by(command) if chosen == "system" else None
    if dry_run:
        click.echo(text, nl=False)
        click.echo(f"capwatch: dry run: would write {directory / unit.UNIT_NAME}", err=True)
        if problem:
            click.echo(f"capwatch: warning: {problem}: the service would fail to start (203/EXEC)", err=True)
        return
    if chosen == "system" and unit_dir is None and os.geteuid() != 0:
        raise unit.UnitError(f"installing the system service writes {directory / unit.UNIT_NAME}: run it as root "
                             f"(sudo {' '.join(command)} service install --system)")
    if problem and not force:
        raise unit.UnitError(f"{problem}, so the service could not start (203/EXEC): install capwatch where user "
                             f"{unit.SERVICE_USER} can run it (e.g. a venv in /opt/capwatch) and run that one's "
                             "`capwatch service install --system` (--force if an ACL allows it)")
    path, written = unit.install_unit(text, directory, force=force)
    click.echo(f"{'wrote' if written else 'unchanged'} {path}")
    click.echo("  " + next(line for line in text.splitlines() if line.startswith("ExecStart=")))
    click.echo("next:")
    for step in unit.next_steps(chosen):
        click.echo(f"  {step}")


# --------------------------------------------------------------------------------------------------------------


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
