"""`capwatch service install`: the unit runs the capwatch that wrote it (venv, pipx, anywhere), verified by systemd."""

from __future__ import annotations

import configparser
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CliResult, CliRunner, assert_one_line_error

from capwatch.daemon import unit

REPO = Path(__file__).resolve().parent.parent


def _analyze_works() -> bool:
    exe = shutil.which("systemd-analyze")
    return exe is not None and subprocess.run([exe, "--version"], capture_output=True, check=False).returncode == 0


needs_analyze = pytest.mark.skipif(not _analyze_works(), reason="systemd-analyze is not available here")


def verify(unit_file: Path, tmp_path: Path, *, user: bool) -> str:
    """Run `systemd-analyze [--user] verify` on ``unit_file``; return what it said (nothing, when all is well)."""
    env = dict(os.environ)
    if user:
        runtime = tmp_path / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    command = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit_file)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr
    return (result.stdout + result.stderr).strip()


def service_section(text: str) -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser["Service"]


def expected_command() -> list[str]:
    """What the unit must run: the capwatch of the interpreter the tests use (run_cli runs `python -m capwatch`)."""
    return unit.capwatch_command(sys.executable)


def install(run_cli: CliRunner, unit_dir: Path, *args: str) -> CliResult:
    return run_cli("service", "install", "--unit-dir", unit_dir, *args)


@needs_analyze
def test_user_install_writes_a_unit_that_runs_this_capwatch_and_passes_verify(run_cli: CliRunner,
                                                                              tmp_path: Path) -> None:
    unit_dir = tmp_path / "units" / "systemd" / "user"  # created on demand
    result = install(run_cli, unit_dir, "--user")
    assert result.code == 0, result.err
    path = unit_dir / "capwatch.service"
    assert result.out.splitlines()[0] == f"wrote {path}"
    text = path.read_text()
    exec_start = service_section(text)["ExecStart"]
    assert exec_start == " ".join(expected_command()) + " watch"
    program = Path(exec_start.split()[0])
    assert program.is_absolute() and os.access(program, os.X_OK)
    assert f"  ExecStart={exec_start}" in result.out.splitlines()
    assert "systemctl --user daemon-reload && systemctl --user enable --now capwatch" in result.out
    assert "printf '[library]" in result.out  # this home has no config yet: how to make one
    assert path.stat().st_mode & 0o777 == 0o644
    said = verify(path, tmp_path, user=True)
    assert "not executable" not in said and said == "", said
    # Everything else is the shipped template's.
    template = unit.template_text("user")
    assert text.split("[Unit]", 1)[1] == template.split("[Unit]", 1)[1].replace(
        "ExecStart=%h/.local/bin/capwatch watch", f"ExecStart={exec_start}")


@needs_analyze
def test_system_install_renders_the_sandboxed_unit_with_this_capwatch(run_cli: CliRunner, tmp_path: Path) -> None:
    unit_dir = tmp_path / "system"
    first = install(run_cli, unit_dir, "--system")
    problem = unit.unreachable_by(expected_command())
    if problem is not None:
        # e.g. a Python below /root (0700): user capwatch could not start it, and the install says so.
        line = assert_one_line_error(first)
        assert problem in line and "203/EXEC" in line and "--force" in line, line
        assert not (unit_dir / "capwatch.service").exists()
        first = install(run_cli, unit_dir, "--system", "--force")
    assert first.code == 0, first.err
    path = unit_dir / "capwatch.service"
    service = service_section(path.read_text())
    assert service["ExecStart"] == " ".join(expected_command()) + " --config /etc/capwatch/config.toml watch"
    assert service["User"] == "capwatch" and service["StateDirectory"] == "capwatch"
    assert service["ProtectSystem"] == "strict"
    said = verify(path, tmp_path, user=False)
    assert "not executable" not in said and said == "", said
    assert "systemctl daemon-reload" in first.out and "usermod -aG capwatch" in first.out
    assert "ReadWritePaths=" in first.out and "setfacl" in first.out
    # The global option and the environment choose the system unit too.
    for args, env in ((("--system", "service", "install"), {}), (("service", "install"), {"CAPWATCH_SYSTEM": "1"})):
        again = run_cli(*args, "--unit-dir", unit_dir, "--force", env=env)
        assert again.code == 0, again.err
        assert again.out.splitlines()[0] == f"unchanged {path}"


def test_the_system_unit_keeps_the_index_to_its_group_and_sidecars_readable() -> None:
    service = service_section(unit.template_text("system"))
    # The folder holds the index back from everyone but group capwatch...
    assert service["StateDirectoryMode"] == "0750"
    # ...while files capwatch creates in the library (XMP sidecars) stay readable to the media server and the rest.
    assert service["UMask"] == "0022"


def test_an_existing_different_unit_is_kept_unless_forced(run_cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "capwatch.service"
    path.write_text("[Service]\nExecStart=/bin/true\n")
    line = assert_one_line_error(install(run_cli, tmp_path, "--user"))
    assert str(path) in line and "--force" in line
    assert path.read_text() == "[Service]\nExecStart=/bin/true\n"
    again = install(run_cli, tmp_path, "--user")  # still refused: nothing was changed by the first attempt
    assert again.code == 2
    forced = install(run_cli, tmp_path, "--user", "--force")
    assert forced.code == 0, forced.err
    assert forced.out.startswith(f"wrote {path}")
    assert "ExecStart=" + " ".join(expected_command()) in path.read_text()
    unchanged = install(run_cli, tmp_path, "--user")
    assert unchanged.code == 0 and unchanged.out.startswith(f"unchanged {path}")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_dry_run_prints_the_unit_and_writes_nothing(run_cli: CliRunner, tmp_path: Path) -> None:
    result = install(run_cli, tmp_path / "units", "--user", "--dry-run")
    assert result.code == 0, result.err
    assert not (tmp_path / "units").exists()
    assert service_section(result.out)["ExecStart"] == " ".join(expected_command()) + " watch"
    assert result.err_lines[0] == f"capwatch: dry run: would write {tmp_path / 'units' / 'capwatch.service'}"
    default = run_cli("service", "install", "--dry-run")  # the real destination is only named
    assert default.code == 0, default.err
    assert str(tmp_path / "home" / ".config" / "systemd" / "user" / "capwatch.service") in default.err
    assert not (tmp_path / "home" / ".config" / "systemd").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write /etc/systemd/system: not something a test does")
def test_system_install_into_etc_needs_root(run_cli: CliRunner) -> None:
    line = assert_one_line_error(run_cli("service", "install", "--system"))
    assert "/etc/systemd/system/capwatch.service" in line and "sudo" in line


@needs_analyze
def _venv_like(folder: Path) -> Path:
    """Make ``folder`` a venv without a capwatch script whose ``bin/python3`` sees the packages of the Python running
    the tests (capwatch and its dependencies), and return that interpreter.

    A bare symlink to ``sys.executable`` is not enough: outside its venv the link runs the *base* Python (a venv is
    found by the ``pyvenv.cfg`` next to ``bin/``), where capwatch is not installed when the tests run in a venv, as
    the README's test command does. So the folder gets its own ``pyvenv.cfg`` and a ``.pth`` file that adds this
    environment's site folders (their own ``.pth`` files, an editable install's among them, included).
    """
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python3"
    python.symlink_to(sys.executable)
    base = Path(os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable))
    (folder / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                       f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    site_dir = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site_dir.mkdir(parents=True)
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (site_dir / "outer.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in outer))
    return python


def test_a_python_without_a_capwatch_script_runs_as_python_minus_m(tmp_path: Path) -> None:
    # A venv-like folder whose name needs quoting in a unit: the interpreter runs capwatch as a module.
    bin_dir = tmp_path / "my venv 100%" / "bin"
    python = _venv_like(bin_dir.parent)
    command = unit.capwatch_command(str(python))
    assert command == [str(python), "-P", "-m", "capwatch"]  # the venv's own path, not the Python it links to
    text = unit.render_unit("system", command)
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_line == f'ExecStart="{bin_dir.parent.parent}/my venv 100%%/bin/python3" -P -m capwatch ' \
                        "--config /etc/capwatch/config.toml watch"
    path = tmp_path / "capwatch.service"
    path.write_text(text)
    said = verify(path, tmp_path, user=False)
    assert said == "", said
    # That command really is capwatch.
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("capwatch"), result.stderr


def test_a_script_next_to_the_interpreter_is_used_only_when_that_interpreter_runs_it(tmp_path: Path) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.symlink_to(sys.executable)
    script = bin_dir / "capwatch"
    script.write_text("#!/usr/bin/python3\nimport sys\n")  # another environment's script
    script.chmod(0o755)
    assert unit.capwatch_command(str(python))[1:] == ["-P", "-m", "capwatch"]
    script.write_text(f"#!{python}\nimport sys\n")
    assert unit.capwatch_command(str(python)) == [str(script)]


def test_quoting_for_systemd() -> None:
    assert unit.systemd_quote("/opt/capwatch/bin/capwatch") == "/opt/capwatch/bin/capwatch"
    assert unit.systemd_quote("/a b/c") == '"/a b/c"'
    assert unit.systemd_quote("/x/$HOME%h") == "/x/$$HOME%%h"
    assert unit.systemd_quote('/q"uote\\') == '"/q\\"uote\\\\"'


def test_templates_ship_with_the_package_and_systemd_folder_shows_the_same(tmp_path: Path) -> None:
    for scope in ("user", "system"):
        name = unit.template_name(scope)  # type: ignore[arg-type]
        assert (REPO / "systemd" / name).read_text() == unit.template_text(scope)  # type: ignore[arg-type]
    # A build (what pip installs from) carries them as package data.
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["capwatch"]
    shipped = {p.relative_to(REPO / "capwatch") for pattern in patterns for p in (REPO / "capwatch").glob(pattern)}
    assert {Path("data/systemd/capwatch.service"), Path("data/systemd/capwatch-user.service")} <= shipped
    pytest.importorskip("setuptools", reason="building needs setuptools (not in every venv)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "capwatch", source / "capwatch", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                            "--build-lib", str(tmp_path / "lib")], cwd=source, capture_output=True, text=True,
                           check=False)
    assert build.returncode == 0, build.stderr
    for name in ("capwatch.service", "capwatch-user.service"):
        assert (tmp_path / "lib" / "capwatch" / "data" / "systemd" / name).is_file(), name


@pytest.mark.parametrize("command", [["service"], ["service", "install"]])
def test_service_commands_have_help(run_cli: CliRunner, command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.code == 0, result.err
    assert "Usage:" in result.out and len([line for line in result.out.splitlines() if line.strip()]) >= 3


def test_system_option_is_documented_in_the_main_help(run_cli: CliRunner) -> None:
    text = " ".join(run_cli("--help").out.split())
    assert "--system" in text and "/etc/capwatch/config.toml" in text and "service" in text


def test_a_venv_whose_python_lives_in_a_private_home_is_refused_naming_that_interpreter() -> None:
    import tempfile

    # Not below tmp_path: pytest's base folder is private to its user, and would be the first thing refused.
    base = Path(tempfile.mkdtemp(prefix="capwatch-unit-"))
    try:
        base.chmod(0o755)
        home = base / "home" / "alice"
        python = home / ".pyenv" / "versions" / "3.11" / "bin" / "python3.11"
        python.parent.mkdir(parents=True)
        shutil.copy("/bin/true", python)
        (base / "home").chmod(0o755)
        home.chmod(0o700)  # a private home: user capwatch may not pass
        venv_bin = base / "opt" / "capwatch" / "bin"
        venv_bin.mkdir(parents=True)
        for folder in (base / "opt", base / "opt" / "capwatch", venv_bin):
            folder.chmod(0o755)
        (venv_bin / "python3").symlink_to(python)
        script = venv_bin / "capwatch"
        script.write_text(f"#!{venv_bin / 'python3'}\nimport sys\n")
        script.chmod(0o755)
        problem = unit.unreachable_by([str(script)], user="capwatch-nobody-here")
        assert problem is not None and f"may not enter {home}" in problem, problem
        assert f"its Python interpreter {python}" in problem and str(venv_bin / "python3") in problem, problem
        # The python -m form names it too.
        problem = unit.unreachable_by([str(venv_bin / "python3"), "-P", "-m", "capwatch"], user="capwatch-nobody-here")
        assert problem is not None and f"the Python interpreter {python}" in problem, problem
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_system_steps_say_where_setfacl_comes_from_when_it_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    base = {"CAPWATCH_SYSTEM_ROOT": str(tmp_path / "root")}
    without = unit.next_steps("system", {**base, "PATH": str(empty)})
    position = next(i for i, step in enumerate(without) if "apt install acl" in step)
    assert "setfacl" in without[position + 1], without
    if shutil.which("setfacl"):
        steps = unit.next_steps("system", {**base, "PATH": os.environ["PATH"]})
        assert not any("apt install acl" in step for step in steps), steps
