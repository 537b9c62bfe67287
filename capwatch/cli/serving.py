"""`capwatch serve`: the local web page (search grid, photo page, status) over the index."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import click

from capwatch.cli.app import _global_options, _load, _open_captioner, cli, log
from capwatch.config import Config
from capwatch.errors import CapwatchError, ConfigError, IndexUnavailable
from capwatch.paths import install_hint


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; raises ConfigError (one line) when that address cannot be used."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _owner_roots(index_path: Path) -> tuple[Path, ...]:
    """The folders scanned by hand into the index at ``index_path``; () when it cannot be read (yet)."""
    from capwatch.library.index import Index

    if not index_path.exists():
        return ()
    try:
        with Index.open(index_path, readonly=True) as index:
            return index.owner_roots()
    except CapwatchError:
        return ()


def prepare_server(config: Config, host: str, port: int, *, need_index: bool = True) -> tuple[Any, socket.socket]:
    """The uvicorn server for the web page and its listening socket (`capwatch serve`, or `watch` with
    ``[serve] in_daemon``). Prints the access token when one is made (the only time it is shown).

    Raises ConfigError (one line) when the web extra is not installed, the address cannot be used or the token
    file is unusable; IndexUnavailable when ``need_index`` and there is no index yet.
    """
    try:
        import uvicorn

        from capwatch.web.app import ServeSettings, create_app
        from capwatch.web.security import LOOPBACK_NAMES, is_loopback, load_or_create_token, new_csrf_secret
    except ImportError as exc:
        raise ConfigError(f"capwatch serve needs the web extra ({exc.name} is missing): "
                          f"{install_hint('web')}") from None
    from capwatch import paths
    from capwatch.daemon.instance import read_live_state

    index_path = config.index_path()
    if need_index and not index_path.exists():
        raise IndexUnavailable(f"no index at {index_path} yet; run `capwatch scan DIR` first (or pass --db)")
    if not any(root.path.is_dir() for root in config.library.roots) and \
            not any(folder.is_dir() for folder in _owner_roots(index_path)):
        # Only files below a configured root or a folder scanned by hand are shown: with none, every page is empty.
        log.warning("none of the configured [library] roots is a folder here (%s) and no folder was scanned into "
                    "this index: no photo can be shown (roots go into %s)",
                    ", ".join(str(r.path) for r in config.library.roots) or "none configured",
                    config.source or paths.default_config_path(os.environ))
    token = None
    allowed: frozenset[str] | None = LOOPBACK_NAMES
    if not is_loopback(host):
        token = load_or_create_token(paths.state_dir(os.environ))
        allowed = None  # reached by whatever name the network gives it; the token is the gate
    sock = _listen(host, port)
    if token is not None and token.created:
        # The only time the token is shown: a person starting the server reads it here.
        click.echo(f"access token (shown once, stored in {token.path}): {token.value}")
    elif token is not None:
        click.echo(f"access token: in {token.path}")

    def live_state() -> dict[str, Any] | None:
        return read_live_state(index_path)

    settings = ServeSettings(config=config, csrf=new_csrf_secret(), cache_dir=paths.cache_dir(os.environ),
                             open_captioner=lambda: _open_captioner(config), live_state=live_state,
                             token=token, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"capwatch: serving http://{shown}:{sock.getsockname()[1]}/", err=True)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, server_header=False, proxy_headers=False,
        limit_concurrency=64, timeout_keep_alive=5, lifespan="on", log_config=None,
    ))
    return server, sock


@cli.command()
@_global_options
@click.option("--host", metavar="ADDRESS", help="Address to listen on (default: [serve] host, 127.0.0.1). Any "
              "other than loopback needs the access token, made on the first such start and printed once.")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [serve] port, 8765; 0: any free one).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve a local web page: search with thumbnails, a photo page to edit a caption, the status.

    \b
    Open http://127.0.0.1:8765/ (the address it prints).  / focuses the search box, arrows move
    through the results.  Captions edited there are written into the file as a person's words.
    Ctrl-C stops it.  [serve] in_daemon = true runs it inside `capwatch watch` instead.
    """
    config = _load(ctx)
    server, sock = prepare_server(config, host or config.serve.host,
                                  config.serve.port if port is None else port)
    log.info("serving %s", config.index_path())
    server.run(sockets=[sock])


class BackgroundServer:
    """The web page on a thread of another process (the daemon): :meth:`stop` ends it and waits."""

    def __init__(self, server: Any, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        # uvicorn installs no signal handlers off the main thread: the daemon keeps its own.
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="capwatch-serve",
                                        daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
