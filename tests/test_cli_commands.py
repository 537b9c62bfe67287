"""The command group imports each command's module on first use (capwatch.cli.app.COMMAND_MODULES): every command
is still found, help still lists them all, and a search does not import the other commands' modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import CliRunner

REPO = Path(__file__).resolve().parent.parent

# Every module under capwatch/cli that registers commands, imported in a fresh interpreter; then each registered
# command's module is printed beside the module COMMAND_MODULES names for it.
REGISTERED = """
import pkgutil, capwatch.cli
from capwatch.cli.app import COMMAND_MODULES, cli
for info in pkgutil.iter_modules(capwatch.cli.__path__):
    __import__(f"capwatch.cli.{info.name}")
for name, command in sorted(cli.commands.items()):
    print(name, command.callback.__module__.rsplit(".", 1)[-1], COMMAND_MODULES.get(name))
"""


def test_every_registered_command_is_named_with_the_module_that_defines_it() -> None:
    out = subprocess.run([sys.executable, "-c", REGISTERED], capture_output=True, text=True, timeout=120,
                         cwd=REPO, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    assert {"caption", "scan", "search", "status", "similar", "duplicates", "models", "watch", "serve"} <= {
        r[0] for r in rows}, out
    assert [r for r in rows if r[1] != r[2]] == [], out


def test_help_lists_every_command_and_each_runs_without_the_others_imported(run_cli: CliRunner,
                                                                              tmp_path: Path) -> None:
    listed = run_cli("--help")
    assert listed.code == 0, listed.err
    for name in ("caption", "scan", "recaption", "search", "status", "similar", "duplicates", "models", "watch",
                 "service", "serve"):
        assert f"\n  {name} " in listed.out, (name, listed.out)
    # A command's own help needs its module alone.
    assert run_cli("serve", "--help").code == 0
    db = tmp_path / "index.db"
    (tmp_path / "photos").mkdir()
    assert run_cli("--db", db, "scan", tmp_path / "photos", "--no-caption").code == 0
    made = run_cli("--db", db, "search", "anything", "--by", "words", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert made.code == 0, made.err
    loaded = {line.rsplit("|", 1)[-1].strip() for line in made.err.splitlines() if line.startswith("import time")}
    assert "capwatch.cli.find" in loaded
    assert not loaded & {"capwatch.cli.captioning", "capwatch.cli.serving", "capwatch.cli.running",
                         "capwatch.cli.meaning", "capwatch.cli.models"}, sorted(loaded)


def test_an_unknown_command_is_a_usage_error(run_cli: CliRunner) -> None:
    result = run_cli("serch", "cat")
    assert result.code == 2
    assert "No such command" in result.err and "Traceback" not in result.err
