"""systemd unit files for the daemon: render the shipped templates for the capwatch that is running, and install them.

The templates live in ``capwatch/data/systemd/`` (package data; the repository's ``systemd/`` links to them). Their
``ExecStart=`` names a conventional path (``/usr/local/bin/capwatch``, ``%h/.local/bin/capwatch``) that is wrong for
a venv or pipx install, where systemd then fails with 203/EXEC. :func:`render_unit` puts in the absolute path of the
capwatch that runs it instead, and :func:`install_unit` writes the result without ever replacing a different unit
unless asked to.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import pwd
import shlex
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from capwatch.errors import CapwatchError

Scope = Literal["user", "system"]

#: The unit's name once installed, for both scopes (``systemctl [--user] ... capwatch``).
UNIT_NAME = "capwatch.service"
#: The system service's user and group (``User=``/``Group=`` in the template).
SERVICE_USER = "capwatch"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
_TEMPLATES: dict[Scope, str] = {"user": "capwatch-user.service", "system": "capwatch.service"}


class UnitError(CapwatchError):
    """The unit cannot be rendered or installed (one line; exit status 2)."""


def template_name(scope: Scope) -> str:
    """The file name of the template for ``scope`` in ``capwatch/data/systemd/``."""
    return _TEMPLATES[scope]


def template_text(scope: Scope) -> str:
    """Return the shipped template for ``scope``. Raises UnitError when the package data is missing (a broken
    install)."""
    resource = importlib.resources.files("capwatch").joinpath("data", "systemd", _TEMPLATES[scope])
    try:
        return resource.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnitError(f"the unit template {_TEMPLATES[scope]} is missing from this capwatch install: "
                        f"{exc.strerror or exc}; reinstall capwatch") from None


def capwatch_command(executable: str | None = None) -> list[str]:
    """Return the absolute command line that runs this capwatch, for ``ExecStart=``.

    The ``capwatch`` console script next to the interpreter when there is one that this interpreter's environment
    installed (a venv, pipx, a pyenv or system Python whose scripts sit beside it); otherwise the interpreter
    itself with ``-P -m capwatch`` (``-P``: no current folder on ``sys.path``). ``executable`` defaults to
    ``sys.executable``; a venv's interpreter is kept as its path in the venv, never resolved to the Python it links
    to (that would lose the venv). Raises UnitError when there is no interpreter path to use.
    """
    exe = executable if executable is not None else sys.executable
    if not exe:
        raise UnitError("cannot tell which Python runs capwatch (sys.executable is empty)")
    interpreter = Path(os.path.abspath(exe))
    script = interpreter.parent / "capwatch"
    if script.is_file() and os.access(script, os.X_OK) and _script_uses(script, interpreter.parent):
        return [str(script)]
    return [str(interpreter), "-P", "-m", "capwatch"]


def _shebang(script: Path) -> str | None:
    """The interpreter named on the first line of ``script`` (``#!/path/python``), or None. Never raises."""
    try:
        with open(script, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    return words[0] if words else None


def _script_uses(script: Path, bin_dir: Path) -> bool:
    """Whether ``script`` is run by an interpreter in ``bin_dir`` (a script of this environment)."""
    interpreter = _shebang(script)
    return interpreter is not None and Path(os.path.abspath(interpreter)).parent == bin_dir


def systemd_quote(arg: str) -> str:
    """Return ``arg`` as one word of a systemd command line: ``%`` and ``$`` escaped, quoted when it has spaces,
    quotes or backslashes."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not any(c.isspace() or c in "\"'\\;" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(scope: Scope, command: Sequence[str]) -> str:
    """Return the unit text for ``scope``: the shipped template with ``ExecStart=``'s program replaced by
    ``command`` (see :func:`capwatch_command`; the template's arguments are kept) and a header saying where the
    file came from instead of the template's install notes. Raises UnitError when the template has no ExecStart=.
    """
    lines = template_text(scope).splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
    body = lines[start:]
    for i, line in enumerate(body):
        if line.startswith("ExecStart="):
            words = line[len("ExecStart="):].split(None, 1)
            rest = f" {words[1]}" if len(words) > 1 else ""
            body[i] = "ExecStart=" + " ".join(systemd_quote(a) for a in command) + rest
            break
    else:
        raise UnitError(f"the unit template {_TEMPLATES[scope]} has no ExecStart= line; reinstall capwatch")
    flag = "--user" if scope == "user" else "--system"
    edit = "systemctl --user edit capwatch" if scope == "user" else "sudo systemctl edit capwatch"
    header = [
        f"# capwatch {scope} service, written by `capwatch service install {flag}` from the template",
        f"# {_TEMPLATES[scope]} shipped with capwatch. ExecStart= runs the capwatch that wrote it: after moving or",
        f"# reinstalling capwatch elsewhere, run the new one's `capwatch service install {flag} --force`.",
        f"# Put local changes in a drop-in (`{edit}`), not here.",
        "",
    ]
    return "\n".join(header + body) + "\n"


def default_unit_dir(scope: Scope, env: Mapping[str, str] = os.environ) -> Path:
    """Where systemd looks for units an administrator installs: ``/etc/systemd/system``, or for a user unit
    ``$XDG_CONFIG_HOME/systemd/user`` (``~/.config/systemd/user``)."""
    if scope == "system":
        return SYSTEM_UNIT_DIR
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(config_home) / "systemd" / "user"


def install_unit(text: str, directory: Path, *, force: bool = False) -> tuple[Path, bool]:
    """Write ``text`` as ``directory/capwatch.service`` (mode 0644, atomically; ``directory`` is created).

    Returns (path, written): written is False when the file already holds exactly ``text``. Raises UnitError when
    a different file is there and ``force`` is not set, when the name is not a regular file, or when writing fails.
    """
    path = directory / UNIT_NAME
    try:
        existing: str | None = path.read_text(encoding="utf-8") if path.exists() or path.is_symlink() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnitError(f"{path} exists and cannot be read ({_reason(exc)}); remove it or pass --unit-dir") from None
    if existing == text:
        return path, False
    if existing is not None and not force:
        raise UnitError(f"{path} exists and differs from the unit capwatch would write; pass --force to replace it "
                        "(--dry-run shows the new one)")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UnitError(f"{path} is not a regular file (a link to another unit?); remove it first")
    tmp = directory / f".{UNIT_NAME}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UnitError(f"cannot write {path}: {_reason(exc)}") from None
    return path, True


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _identity(user: str) -> tuple[int | None, frozenset[int]]:
    """(uid, gids) of ``user``; (None, empty) when there is no such user yet (then only "others" bits count)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None, frozenset()
    return entry.pw_uid, frozenset(os.getgrouplist(user, entry.pw_gid))


def _allowed(st: os.stat_result, uid: int | None, gids: frozenset[int], bits: int) -> bool:
    if uid == 0:
        return True
    if uid is not None and st.st_uid == uid:
        shift = 6
    elif st.st_gid in gids:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def unreachable_by(command: Sequence[str], user: str = SERVICE_USER) -> str | None:
    """Return why ``user`` could not start ``command`` (one line), or None when the permission bits allow it.

    Checks every folder on the way to the program and, for a script, its interpreter (both as named and with
    symbolic links resolved) for search permission, and the files for execute (and read, for a script) permission,
    as ``user`` would have them (the "others" bits when the user does not exist yet). ACLs are not consulted.
    Never raises.
    """
    uid, gids = _identity(user)
    program = Path(command[0])
    # What each file is, for the message: the Python interpreter is the one a venv links to a private home.
    is_python = list(command[1:3]) == ["-P", "-m"] or program.name.startswith("python")
    targets: list[tuple[Path, int, str]] = [(program, 0o1, "the Python interpreter" if is_python else "")]
    interpreter = _shebang(program)
    if interpreter is not None:
        targets = [(program, 0o5, ""), (Path(interpreter), 0o1, "its Python interpreter")]
    for target, bits, role in targets:
        for candidate in dict.fromkeys((target, target.resolve())):
            for folder in reversed(candidate.parents):
                try:
                    st = os.stat(folder)
                except OSError:
                    continue
                if not _allowed(st, uid, gids, 0o1):
                    where = ""
                    if role or candidate != program:
                        links = f" (where {target} leads)" if candidate != target else ""
                        where = f", on the way to {role or 'the file'} {candidate}{links}"
                    return f"{user} may not enter {folder} (mode {stat.S_IMODE(st.st_mode):04o}, " \
                           f"owner {_user_name(st.st_uid)}){where}"
            try:
                st = os.stat(candidate)
            except OSError as exc:
                return f"{candidate}: {_reason(exc)}"
            if not _allowed(st, uid, gids, bits):
                what = "read and run" if bits == 0o5 else "run"
                return f"{user} may not {what} {candidate} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def service_user_exists(user: str = SERVICE_USER) -> bool:
    """Whether the system has a user named ``user``."""
    return _identity(user)[0] is not None


def _configured_roots(config: Path) -> list[str]:
    """The library roots ``config`` names; [] when it is missing or invalid (the caller falls back to an example)."""
    from capwatch.config import load_config_file

    try:
        return [str(root.path) for root in load_config_file(config).library.roots]
    except CapwatchError:
        return []


def next_steps(scope: Scope, env: Mapping[str, str] = os.environ) -> list[str]:
    """Return the shell commands that follow installing the unit for ``scope``, one per item.

    User: a config with your photo folders (when there is none), daemon-reload and enable, the log. System: the
    ``capwatch`` user and group (when missing), ``/etc/capwatch/config.toml`` (when missing), write access to each
    library root and ``ReadWritePaths=`` for it (the roots of an existing config, else ``/srv/photos``),
    daemon-reload and enable, and joining group ``capwatch`` to read the index. Commands get ``sudo`` unless this
    process is root. Never raises.
    """
    from capwatch import paths

    q = shlex.quote
    if scope == "user":
        config = paths.default_config_path({})
        steps: list[str] = []
        if not config.exists():
            steps.append(f"mkdir -p {q(str(config.parent))} && printf '[library]\\nroots = [\"~/Pictures\"]\\n' > "
                         f"{q(str(config))}   # your photo folders (every key: config.example.toml)")
        return [*steps,
                "systemctl --user daemon-reload && systemctl --user enable --now capwatch",
                "journalctl --user -u capwatch -f   # the log; `capwatch status` shows the live state",
                "loginctl enable-linger \"$USER\"   # optional: keep it running while you are logged out"]
    sudo = "" if os.geteuid() == 0 else "sudo "
    config_dir, state, _cache = paths.system_dirs(env)
    config = config_dir / "config.toml"
    roots = _configured_roots(config) if config.exists() else []
    steps = []
    if not service_user_exists():
        steps.append(f"{sudo}useradd --system --user-group --home-dir {q(str(state))} --shell /usr/sbin/nologin "
                     f"{SERVICE_USER}")
    if not config.exists():
        steps.append(f"{sudo}mkdir -p {q(str(config_dir))} && printf '[library]\\nroots = [\"/srv/photos\"]\\n' | "
                     f"{sudo}tee {q(str(config))} >/dev/null   # your library folders (every key: config.example.toml)")
    shown = roots or ["/srv/photos"]
    member = q(env["SUDO_USER"]) if env.get("SUDO_USER") else '"$USER"'
    if shutil.which("setfacl", path=env.get("PATH", os.defpath)) is None:
        steps.append(f"{sudo}apt install acl   # setfacl, for the next step (Debian/Ubuntu; elsewhere the acl package)")
    steps += [f"{sudo}setfacl -R -m u:{SERVICE_USER}:rwX -m d:u:{SERVICE_USER}:rwX {q(root)}   # captions go into "
              "the files" for root in shown]
    steps += [f"{sudo}systemctl edit capwatch   # add: [Service] ReadWritePaths={' '.join(shown)}",
              f"{sudo}systemctl daemon-reload && {sudo}systemctl enable --now capwatch",
              f"{sudo}usermod -aG {SERVICE_USER} {member}   # then, after "
              "logging in again: capwatch --system status, capwatch --system search WORDS"]
    return steps
