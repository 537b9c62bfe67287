"""Where capwatch keeps its files: XDG base directories, or the directories systemd hands a service.

systemd sets ``STATE_DIRECTORY``, ``CACHE_DIRECTORY`` and ``CONFIGURATION_DIRECTORY`` for units that declare
``StateDirectory=`` etc.; those win over the XDG defaults so a system service never writes into a home directory.
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
