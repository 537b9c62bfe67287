"""`capwatch watch` (the daemon in the foreground) and `capwatch service install`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    pass

from capwatch.cli.app import AppContext, _global_options, _load, _open_index, _roots, cli

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
    if roots:
        # Folders given by hand are the owner's: `serve` shows them beside the configured roots.
        with _open_index(config) as index:
            index.add_owner_roots(root.path for root in roots)
    web = None
    if config.serve.in_daemon:
        # [serve] in_daemon: the web page runs on a thread of the daemon (the daemon makes the index if need be).
        from capwatch.cli.serving import BackgroundServer, prepare_server

        web = BackgroundServer(*prepare_server(config, config.serve.host, config.serve.port, in_daemon=True,
                                               need_index=False)).start()
    try:
        # On SIGHUP the same --config/--db/--model apply again, so a reload never loses a command-line choice.
        code = run_daemon(config, roots, reload=app.config, caption=not no_caption,
                          model_override=app.model or os.environ.get("CAPWATCH_MODEL") or None)
    finally:
        if web is not None:
            web.stop()
    ctx.exit(code)


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
