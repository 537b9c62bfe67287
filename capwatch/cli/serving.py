"""`capwatch serve`: the local web page (search grid, photo page, status) over the index."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from capwatch.cli.app import _global_options, _load, _open_captioner, cli, log
from capwatch.config import Config
from capwatch.errors import CapwatchError, ConfigError, IndexUnavailable
from capwatch.paths import install_hint

if TYPE_CHECKING:
    from capwatch.web.security import AccessToken


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


def _access(config: Config, host: str) -> tuple[AccessToken | None, frozenset[str] | None]:
    """(the access token, or None with ``[serve] auth = "none"``; the Host names answered, None = any).

    Raises ConfigError (one line) for ``auth = "none"`` on an address beyond loopback, or an unusable token file.
    """
    from capwatch import paths
    from capwatch.web.security import LOOPBACK_NAMES, is_loopback, load_or_create_token

    loopback = is_loopback(host)
    if config.serve.auth == "none":
        if not loopback:
            raise ConfigError(f'[serve] auth = "none" is only for a loopback address (127.0.0.1, ::1), not --host '
                              f'{host}: beyond this machine the access token is required')
        return None, LOOPBACK_NAMES
    token = load_or_create_token(paths.state_dir(os.environ))
    # A loopback server also answers only to loopback names (DNS rebinding); any other is reached by whatever
    # name the network gives it, and the token is the gate.
    return token, (LOOPBACK_NAMES if loopback else None)


def _address(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _to_journal() -> bool:
    """True when standard error goes to the systemd journal (``$JOURNAL_STREAM`` names it): a token printed
    there would be readable by everyone who may read the logs."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def prepare_server(config: Config, host: str, port: int, *, need_index: bool = True,
                   in_daemon: bool = False) -> tuple[Any, socket.socket]:
    """The uvicorn server for the web page and its listening socket (`capwatch serve`, or `watch` with
    ``[serve] in_daemon``). Prints the address on stderr: with the access token for `capwatch serve` on a
    terminal; without it inside the daemon and when stderr is the journal (`capwatch serve --print-url` gives it).

    Raises ConfigError (one line) when the web extra is not installed, the address cannot be used, ``auth =
    "none"`` is asked for beyond loopback, or the token file is unusable; IndexUnavailable when ``need_index``
    and there is no index yet.
    """
    try:
        import uvicorn

        from capwatch.web.app import ServeSettings, create_app
        from capwatch.web.gate import ConnectionGate, gated_protocol
        from capwatch.web.security import new_csrf_secret
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
    token, allowed = _access(config, host)
    sock = _listen(host, port)

    def live_state() -> dict[str, Any] | None:
        return read_live_state(index_path)

    settings = ServeSettings(config=config, csrf=new_csrf_secret(), cache_dir=paths.cache_dir(os.environ),
                             open_captioner=lambda: _open_captioner(config), live_state=live_state,
                             token=token, allowed_hosts=allowed)
    address = _address(host, sock.getsockname()[1])
    if token is None:
        click.echo(f'capwatch: serving {address} (no access token: [serve] auth = "none")', err=True)
    elif in_daemon or _to_journal():
        click.echo(f"capwatch: serving {address} (it needs the access token: `capwatch serve --print-url`, as "
                   "the account that runs this server, prints the address to open)", err=True)
    else:
        # Printed at every start, on the terminal of the person who started it (as Jupyter does).
        click.echo(f"capwatch: serving {address}?token={token.value}", err=True)
    gate = ConnectionGate(header_seconds=config.serve.header_timeout_seconds)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), http=gated_protocol(gate), log_level="warning", access_log=False,
        server_header=False, proxy_headers=False, limit_concurrency=None, timeout_keep_alive=5, lifespan="on",
        log_config=None,
    ))
    return server, sock


def url_to_open(config: Config, host: str, port: int) -> str:
    """The address to open, with the access token (made now if there is none yet, as a start would); raises
    ConfigError (one line) as :func:`prepare_server` does for the token."""
    if port == 0:
        raise ConfigError("--print-url needs a port: with port 0 the server takes any free one and prints its "
                          "address when it starts")
    token, _ = _access(config, host)
    return _address(host, port) + (f"?token={token.value}" if token is not None else "")


@cli.command()
@_global_options
@click.option("--host", metavar="ADDRESS", help="Address to listen on (default: [serve] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [serve] port, 8765; 0: any free one).")
@click.option("--print-url", is_flag=True, help="Print the address to open, with the access token, and exit "
              "(for a server that is already running: in the daemon, or started elsewhere).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, print_url: bool) -> None:
    """Serve a local web page: search with thumbnails, a photo page to edit a caption, the status.

    \b
    It prints the address to open, with the access token every request needs
    (a cookie keeps it from then on; it is stored 0600 in the state folder).
    [serve] auth = "none" drops the token, on a loopback address only.
    / focuses the search box, arrows move through the results.  Captions
    edited there are written into the file as a person's words.  Ctrl-C
    stops it.  [serve] in_daemon = true runs it inside `capwatch watch`.
    """
    config = _load(ctx)
    host = host or config.serve.host
    port = config.serve.port if port is None else port
    if print_url:
        click.echo(url_to_open(config, host, port))
        return
    server, sock = prepare_server(config, host, port)
    text_server = _text_server(config)
    log.info("serving %s", config.index_path())
    if text_server is not None:
        import signal

        def stop_then_die(signum: int, _frame: object) -> None:
            # uvicorn re-raises the SIGTERM it shut down on; with the default action the process would die
            # before a `finally` runs, leaving the socket file behind.
            text_server.stop()
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

        signal.signal(signal.SIGTERM, stop_then_die)
    try:
        server.run(sockets=[sock])
    finally:
        if text_server is not None:
            text_server.stop()


def _text_server(config: Config) -> Any:
    """The query-embedding socket (capwatch.daemon.textserver) that `capwatch search` asks while this server
    runs, started now; None when search by meaning is off or a running daemon already answers there."""
    if config.embed.off:
        return None
    from capwatch.daemon.textserver import TextEmbedServer, is_served

    index_path = config.index_path()
    if is_served(index_path):
        return None
    server = TextEmbedServer(config, index_path)
    server.start()
    return server


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
