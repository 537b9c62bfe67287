"""Where capwatch keeps its files: XDG base directories, or the directories systemd hands a service.

systemd sets ``STATE_DIRECTORY``, ``CACHE_DIRECTORY`` and ``CONFIGURATION_DIRECTORY`` for units that declare
``StateDirectory=`` etc.; those win over the XDG defaults so a system service never writes into a home directory.
``capwatch --system`` gives any process the same three variables (:func:`system_environment`), so it finds the
system service's files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

APP = "capwatch"


def _first_dir(value: str | None) -> Path | None:
    # systemd joins several directories with ':' when a unit lists more than one; the first is ours.
    if not value:
        return None
    return Path(value.split(":")[0])


def config_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Directory searched for ``config.toml`` when neither ``--config`` nor ``$CAPWATCH_CONFIG`` is given."""
    return _first_dir(env.get("CONFIGURATION_DIRECTORY")) or Path(platformdirs.user_config_dir(APP))


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Directory for the index database (not created here)."""
    return _first_dir(env.get("STATE_DIRECTORY")) or Path(platformdirs.user_state_dir(APP))


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Directory for downloaded models: ``$CAPWATCH_CACHE_DIR``, systemd's ``CacheDirectory``, or XDG cache."""
    explicit = env.get("CAPWATCH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return _first_dir(env.get("CACHE_DIRECTORY")) or Path(platformdirs.user_cache_dir(APP))


def default_index_path(env: Mapping[str, str] = os.environ) -> Path:
    """The index file used when neither config, ``--db`` nor ``$CAPWATCH_DB`` names one."""
    return state_dir(env) / "index.db"


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """``config.toml`` inside :func:`config_dir`."""
    return config_dir(env) / "config.toml"


# -- the system service's directories ---------------------------------------------------------------------------

#: What ``capwatch --system`` (or ``$CAPWATCH_SYSTEM=1``) stops taking from the caller's environment: these describe
#: the caller's own setup, and the system service never sees them.
PERSONAL_VARIABLES = ("CAPWATCH_CONFIG", "CAPWATCH_DB", "CAPWATCH_MODEL", "CAPWATCH_EMBED_MODEL",
                      "CAPWATCH_CACHE_DIR")


def system_dirs(env: Mapping[str, str] = os.environ) -> tuple[Path, Path, Path]:
    """Return the system unit's (configuration, state, cache) directories.

    They are what ``ConfigurationDirectory=``, ``StateDirectory=`` and ``CacheDirectory=capwatch`` give the service:
    ``/etc/capwatch``, ``/var/lib/capwatch`` and ``/var/cache/capwatch``, each below ``$CAPWATCH_SYSTEM_ROOT`` when
    that is set (for tests, and for packagers who stage a root file system). Never raises; creates nothing.
    """
    root = Path(env.get("CAPWATCH_SYSTEM_ROOT") or "/")
    return root / "etc" / APP, root / "var" / "lib" / APP, root / "var" / "cache" / APP


def system_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Return ``env`` as the system service sees it: the directories systemd hands the unit
    (``CONFIGURATION_DIRECTORY``, ``STATE_DIRECTORY``, ``CACHE_DIRECTORY``, see :func:`system_dirs`) and none of
    :data:`PERSONAL_VARIABLES`. Never raises."""
    config, state, cache = system_dirs(env)
    out = {key: value for key, value in env.items() if key not in PERSONAL_VARIABLES}
    out.update({"CONFIGURATION_DIRECTORY": str(config), "STATE_DIRECTORY": str(state), "CACHE_DIRECTORY": str(cache)})
    return out


def install_hint(extra: str) -> str:
    """How to install capwatch's ``extra`` into the environment running now: its own pip (``python -m pip`` of
    this interpreter, so never another Python's pip that happens to come first on the PATH)."""
    import shlex
    import sys

    return f"{shlex.quote(sys.executable or 'python3')} -m pip install 'capwatch[{extra}]'"
