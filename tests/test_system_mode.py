"""`capwatch --system`: the system service's config, index and live state, read by users who may only read them.

A real daemon runs as a subprocess with STATE_DIRECTORY / CONFIGURATION_DIRECTORY / CACHE_DIRECTORY set the way
systemd sets them for the shipped unit; `capwatch --system ...` runs in other processes with CAPWATCH_SYSTEM_ROOT
pointing at the same temp tree. When the tests run as root, readers also run as user nobody (only in the group that
may read the index, or in no group at all) to prove read-only access works without write permission anywhere.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CliResult, CliRunner, assert_one_line_error, isolated_env
from daemon_helpers import copy_images, start_daemon, stop_daemon, wait_until

from capwatch.daemon.instance import live_state_path, lock_path, read_live_state
from capwatch.library.access import check_readable, keep_wal_files
from capwatch.library.index import Index

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="switching to another user needs root")


@dataclass
class SystemTree:
    """A stand-in for / with the unit's /etc/capwatch, /var/lib/capwatch and /var/cache/capwatch."""

    root: Path
    config_dir: Path
    state: Path
    cache: Path
    photos: Path

    @property
    def index(self) -> Path:
        return self.state / "index.db"

    @property
    def config(self) -> Path:
        return self.config_dir / "config.toml"

    def unit_env(self) -> dict[str, str]:
        """What systemd puts in the service's environment (plus isolation from the developer's own setup)."""
        return {"CONFIGURATION_DIRECTORY": str(self.config_dir), "STATE_DIRECTORY": str(self.state),
                "CACHE_DIRECTORY": str(self.cache), "CAPWATCH_OFFLINE": "1", "CAPWATCH_DB": "",
                "CAPWATCH_CONFIG": "", "CAPWATCH_CACHE_DIR": "", "CAPWATCH_MODEL": ""}

    def cli_env(self) -> dict[str, str]:
        return {"CAPWATCH_SYSTEM_ROOT": str(self.root)}


@pytest.fixture
def tree() -> Iterator[SystemTree]:
    # Not below tmp_path: pytest's base folder is private to its user, and some tests read as user nobody.
    root = Path(tempfile.mkdtemp(prefix="capwatch-system-"))
    root.chmod(0o755)
    config_dir, state, cache = root / "etc" / "capwatch", root / "var" / "lib" / "capwatch", root / "var" / "cache"
    for folder in (config_dir, state, cache, root / "photos" / "harbour"):
        folder.mkdir(parents=True)
    for folder in (root / "etc", root / "var", root / "var" / "lib", root / "photos"):
        folder.chmod(0o755)
    tree = SystemTree(root, config_dir, state, cache / "capwatch", root / "photos")
    tree.cache.mkdir()
    # No [index] path: the index is wherever STATE_DIRECTORY says, as for the real service.
    tree.config.write_text(
        f'[library]\nroots = ["{tree.photos}"]\n\n[watch]\nsettle_seconds = 0.2\nbatch_wait_ms = 50\n'
        'recheck_missing_seconds = 0.5\n'
    )
    try:
        yield tree
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def system_daemon(tree: SystemTree, tmp_path: Path, *, umask: int = 0o022) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon as the unit starts it (`capwatch --config /etc/capwatch/config.toml watch`), indexing only."""
    env = {**isolated_env(tmp_path), **tree.unit_env()}
    old = os.umask(umask)  # the unit's UMask=, inherited by the child
    try:
        proc = start_daemon(tree.config, env=env, caption=False, log=tmp_path / "daemon.log")
    finally:
        os.umask(old)
    try:
        wait_until(lambda: read_live_state(tree.index) or proc.poll() is not None, what="daemon start")
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        yield proc
    finally:
        stop_daemon(proc)


def status_json(result: CliResult) -> dict[str, object]:
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert isinstance(data, dict)
    return data


# -- the same user ---------------------------------------------------------------------------------------------


def test_system_status_and_search_see_the_running_system_daemon(tree: SystemTree, tmp_path: Path,
                                                                run_cli: CliRunner) -> None:
    copy_images(tree.photos / "harbour", 3)
    with system_daemon(tree, tmp_path) as proc:
        wait_until(lambda: status_json(run_cli("--system", "status", "--json", env=tree.cli_env()))["images"] == 3,
                   what="backfill seen through --system status")
        # The option before or after the command, or the environment; the caller's own index and config are ignored.
        personal = {"CAPWATCH_DB": str(tmp_path / "mine.db"), "CAPWATCH_CONFIG": str(tmp_path / "missing.toml")}
        for args, extra in ((("--system", "status", "--json"), {}), (("status", "--system", "--json"), {}),
                            (("status", "--json"), {"CAPWATCH_SYSTEM": "1"}),
                            (("--system", "status", "--json"), personal)):
            data = status_json(run_cli(*args, env={**tree.cli_env(), **extra}))
            assert data["index"] == str(tree.index), args
            assert data["images"] == 3, args
            daemon = data["daemon"]
            assert isinstance(daemon, dict) and daemon["pid"] == proc.pid, args
        assert not (tmp_path / "mine.db").exists()
        found = run_cli("--system", "search", "harbour", "--paths", env=tree.cli_env())
        assert found.code == 0, found.err
        assert len(found.out.splitlines()) == 3
        # Without --system the same user sees its own (empty) index and no daemon.
        own = status_json(run_cli("status", "--json", env=tree.cli_env()))
        assert own["index"] != str(tree.index) and own["daemon"] is None
        # An explicit --db still wins over the system index.
        other = status_json(run_cli("--system", "--db", tmp_path / "other.db", "status", "--json",
                                    env=tree.cli_env()))
        assert other["index"] == str(tmp_path / "other.db")
    stopped = status_json(run_cli("--system", "status", "--json", env=tree.cli_env()))
    assert stopped["daemon"] is None and stopped["images"] == 3


def test_writing_commands_with_system_run_only_as_the_owner_of_the_service_state(
        tree: SystemTree, run_cli: CliRunner) -> None:
    owner = os.stat(tree.state).st_uid
    assert owner == os.geteuid()
    # The owner (here: whoever runs the tests) may; it writes into the service's index.
    scanned = run_cli("--system", "scan", "--no-caption", tree.photos, env=tree.cli_env())
    assert scanned.code == 0, scanned.err
    assert tree.index.exists()
    if not AS_ROOT:
        return
    nobody = pwd.getpwnam("nobody")
    os.chown(tree.state, nobody.pw_uid, -1)
    for args in (("--system", "scan", "--no-caption", str(tree.photos)), ("--system", "watch"),
                 ("caption", "--system", "x.jpg"), ("--system", "models", "pull", "vit-gpt2")):
        line = assert_one_line_error(run_cli(*args, env=tree.cli_env()))
        assert "belong to nobody" in line and "sudo -u nobody" in line, line
    # Reading stays open to anyone who may read.
    assert status_json(run_cli("--system", "status", "--json", env=tree.cli_env()))["images"] == 0


def test_system_mode_without_the_service_directories_says_so(tmp_path: Path, run_cli: CliRunner) -> None:
    env = {"CAPWATCH_SYSTEM_ROOT": str(tmp_path / "nothing")}
    line = assert_one_line_error(run_cli("--system", "scan", tmp_path, env=env))
    assert "does not exist" in line and "service install --system" in line
    # status of a service that never ran: an empty picture, not an error
    data = status_json(run_cli("--system", "status", "--json", env=env))
    assert data["images"] == 0 and data["daemon"] is None
    assert data["index"] == str(tmp_path / "nothing" / "var" / "lib" / "capwatch" / "index.db")
    bad = assert_one_line_error(run_cli("status", env={**env, "CAPWATCH_SYSTEM": "maybe"}))
    assert "--system" in bad


def test_system_status_of_a_service_that_never_ran_names_the_scan_the_service_user_runs(
        tree: SystemTree, run_cli: CliRunner) -> None:
    result = run_cli("--system", "status", env=tree.cli_env())
    assert result.code == 0, result.err
    [line] = [line for line in result.out.splitlines() if line.startswith("index ")]
    assert "not created yet: run `sudo -u capwatch " in line and " --system scan`" in line, line
    assert "capwatch scan DIR" not in line
    own = run_cli("status")
    assert "not created yet: run `capwatch scan DIR`" in own.out


# -- WAL files for read-only readers ---------------------------------------------------------------------------


def test_closing_a_writable_index_leaves_empty_wal_files_with_the_index_mode(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    Index.open(db).close()
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    assert wal.exists() and shm.exists()
    assert wal.stat().st_size == 0
    assert (wal.stat().st_mode & 0o777) == (db.stat().st_mode & 0o777)
    # SQLite treats them as what a persistent-WAL close leaves: writers and readers carry on.
    with Index.open(db) as index:
        assert index.stats().images == 0
    with Index.open(db, readonly=True) as index:
        assert index.stats().images == 0
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    # Another SQLite program (not capwatch) closing last deletes them, as SQLite does.
    assert not wal.exists() and not shm.exists()
    keep_wal_files(db)
    assert wal.exists() and shm.exists()
    # Never replaces a name that is there (a connection that opened meanwhile owns it), nor follows a link.
    shm.unlink()
    shm.symlink_to(tmp_path / "elsewhere")
    keep_wal_files(db)
    assert shm.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_a_readable_index_passes_the_check_and_a_missing_one_is_not_an_error(tmp_path: Path) -> None:
    check_readable(tmp_path / "none.db")
    db = tmp_path / "index.db"
    Index.open(db).close()
    check_readable(db)


# -- another user, in the service's group or not ---------------------------------------------------------------


READER = """
import os, sys
# Everything the read-only commands import, loaded while the interpreter's own folder is still readable (as root):
# user nobody may not enter the folder this Python is installed in.
import capwatch.cli, capwatch.cli.find, capwatch.cli.models, capwatch.config, capwatch.paths, capwatch.daemon.instance
import capwatch.library.index
import capwatch.library.search, capwatch.library.scan, click, grp, json, pwd, sqlite3
groups = [int(g) for g in sys.argv[1].split(",") if g]
uid, gid = int(sys.argv[2]), int(sys.argv[3])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
capwatch.cli.main(sys.argv[4:])
"""


def _unused_group() -> grp.struct_group:
    """A group that exists and that user nobody is not in (so the error's hint names a real group)."""
    nobody = pwd.getpwnam("nobody")
    for group in grp.getgrall():
        if group.gr_gid not in (0, nobody.pw_gid) and "nobody" not in group.gr_mem and group.gr_gid >= 100:
            return group
    pytest.skip("no spare group on this system")


def run_as_nobody(tmp_path: Path, tree: SystemTree, *args: str, groups: tuple[int, ...]) -> CliResult:
    nobody = pwd.getpwnam("nobody")
    env = {**isolated_env(tmp_path), **tree.cli_env()}
    proc = subprocess.run(
        [sys.executable, "-c", READER, ",".join(map(str, groups)), str(nobody.pw_uid), str(nobody.pw_gid), *args],
        env=env, capture_output=True, text=True, timeout=120, cwd="/",
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@needs_root
def test_a_member_of_the_service_group_reads_index_and_live_state_without_any_write_permission(
        tree: SystemTree, tmp_path: Path) -> None:
    group = _unused_group()
    # As the unit leaves it: the state folder group-readable only (here 2750, so the index files the daemon makes
    # belong to the group too, and a daemon umask of 027 makes them 0640: nothing is readable by others).
    os.chown(tree.state, -1, group.gr_gid)
    tree.state.chmod(0o2750)
    copy_images(tree.photos / "harbour", 2)
    with system_daemon(tree, tmp_path, umask=0o027) as proc:
        wait_until(lambda: status_json(run_as_nobody(tmp_path, tree, "--system", "status", "--json",
                                                     groups=(group.gr_gid,)))["images"] == 2,
                   what="nobody sees the backfill")
        for name in (tree.index, Path(f"{tree.index}-wal"), Path(f"{tree.index}-shm"), lock_path(tree.index),
                     live_state_path(tree.index)):
            mode = name.stat().st_mode & 0o777
            assert mode & 0o007 == 0 and mode & 0o020 == 0, (name, oct(mode))  # no write for the group, none for others
        data = status_json(run_as_nobody(tmp_path, tree, "--system", "status", "--json", groups=(group.gr_gid,)))
        daemon = data["daemon"]
        assert isinstance(daemon, dict) and daemon["pid"] == proc.pid
        # The daemon keeps writing while nobody reads through a -shm it may not write.
        copy_images(tree.photos / "harbour", 5)
        wait_until(lambda: status_json(run_as_nobody(tmp_path, tree, "status", "--system", "--json",
                                                     groups=(group.gr_gid,)))["images"] == 5,
                   what="nobody sees new files the daemon indexed")
        found = run_as_nobody(tmp_path, tree, "--system", "search", "harbour", "--paths", "--limit", "100",
                              groups=(group.gr_gid,))
        assert found.code == 0, found.err
        assert len(found.out.splitlines()) == 5
        # A lock file the reader may not open: the daemon's pid is the evidence, no crash.
        lock_path(tree.index).chmod(0o600)
        data = status_json(run_as_nobody(tmp_path, tree, "--system", "status", "--json", groups=(group.gr_gid,)))
        assert isinstance(data["daemon"], dict) and data["daemon"]["pid"] == proc.pid
        # Outside the group: one line naming the folder and the group to join.
        line = assert_one_line_error(run_as_nobody(tmp_path, tree, "--system", "status", groups=()))
        assert f"no permission to enter {tree.state}" in line and f"usermod -aG {group.gr_name}" in line, line
        line = assert_one_line_error(run_as_nobody(tmp_path, tree, "--system", "search", "harbour", groups=()))
        assert str(tree.state) in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    # Stopped cleanly: SQLite deleted -wal/-shm on the last close, capwatch put them back, so reading still works.
    assert Path(f"{tree.index}-wal").exists() and Path(f"{tree.index}-shm").exists()
    data = status_json(run_as_nobody(tmp_path, tree, "--system", "status", "--json", groups=(group.gr_gid,)))
    assert data["images"] == 5 and data["daemon"] is None
    # Without them (left so by another SQLite program) a reader cannot open a WAL index: one line saying why.
    Path(f"{tree.index}-wal").unlink()
    Path(f"{tree.index}-shm").unlink()
    line = assert_one_line_error(run_as_nobody(tmp_path, tree, "--system", "search", "harbour",
                                               groups=(group.gr_gid,)))
    assert "index.db-wal and index.db-shm missing" in line and f"{tree.state} not writable" in line, line
    # An -shm the group may not read: named.
    keep_wal_files(tree.index)
    Path(f"{tree.index}-shm").chmod(0o600)
    line = assert_one_line_error(run_as_nobody(tmp_path, tree, "--system", "status", groups=(group.gr_gid,)))
    assert f"{tree.index}-shm is not readable" in line, line


@needs_root
def test_the_writing_refusal_also_holds_for_another_user(tree: SystemTree, tmp_path: Path) -> None:
    line = assert_one_line_error(run_as_nobody(tmp_path, tree, "--system", "scan", str(tree.photos), groups=()))
    assert "belong to root" in line and "sudo -u root" in line, line
