"""The daemon without its model yet: READY at once, the model downloaded (or waited for) in the background while the
daemon indexes, captioning once it is there; what `capwatch status` and systemd's STATUS say meanwhile.

Real daemon processes, a real notification socket, and a local hub on 127.0.0.1 (tests/hub_server.py) that serves
the tiny ViT-GPT2 test model under ``[model] repo`` (the documented way to name a model the registry does not know).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import IMAGES, MODELS, REPO, NotifySocket, rows, start_daemon, stop_daemon, wait_until, write_config
from hub_server import FakeHub

pytestmark = pytest.mark.timeout(120)

HUB_REPO = "capwatch-test/vit-gpt2-tiny"
COMMIT = hashlib.sha1(b"tiny model for the daemon").hexdigest()
TINY = MODELS / "vit-gpt2-tiny-greedy"


def tiny_model_files() -> dict[str, bytes]:
    """The files of the tiny test model as a hub repository publishes them (configs, tokenizer, onnx/ graphs)."""
    names = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"]
    files = {name: (TINY / name).read_bytes() for name in names}
    for graph in sorted((TINY / "onnx").glob("*.onnx")):
        files[f"onnx/{graph.name}"] = graph.read_bytes()
    return files


class Notifications(NotifySocket):
    """A NotifySocket that can wait for a STATUS with given words, and for messages after a given point."""

    def wait_for_text(self, predicate: Callable[[str], bool], what: str, *, after: int = 0,
                      timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message with {what} within {timeout} s; got {self.messages[after:]}")
            self.sock.settimeout(min(remaining, 0.5))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def status(self, *words: str, after: int = 0) -> str:
        """The first STATUS= line (from message ``after`` on) that contains every one of ``words``."""
        def matches(message: str) -> bool:
            return any(line.startswith("STATUS=") and all(w in line for w in words) for line in message.splitlines())

        message = self.wait_for_text(matches, f"STATUS containing {words}", after=after)
        return next(line for line in message.splitlines() if line.startswith("STATUS="))


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capwatch", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def _status(config: Path, env: dict[str, str]) -> dict[str, Any]:
    result = _cli("--config", str(config), "status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    payload: dict[str, Any] = json.loads(result.stdout)
    return payload


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there any more: connections are refused


@pytest.fixture
def place(tmp_path: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path / "photos"
    root.mkdir()
    db = tmp_path / "state" / "index.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p),
        "CAPWATCH_CACHE_DIR": str(tmp_path / "cache"),
        "CAPWATCH_OFFLINE": "",
        "HF_TOKEN": "",
    }
    env.pop("NOTIFY_SOCKET", None)
    notify = Notifications(tmp_path / "notify.sock")
    yield {"root": root, "db": db, "env": env, "notify": notify, "log": tmp_path / "daemon.log", "tmp": tmp_path}
    notify.close()


def _config(place: dict[str, Any], model: str) -> Path:
    path = write_config(place["tmp"] / "config.toml", db=place["db"], roots=[place["root"]])
    text = path.read_text().replace("[model]\n", f"[model]\n{model}\nidle_unload_seconds = 0\n", 1)
    path.write_text(text)
    return path


def _hub_model(commit: str = COMMIT) -> str:
    return f'name = "tiny"\nrepo = "{HUB_REPO}"\nrevision = "{commit}"\nprecision = "fp32"'


def _start(place: dict[str, Any], config: Path, **env: str) -> subprocess.Popen[bytes]:
    return start_daemon(config, env={**place["env"], "NOTIFY_SOCKET": str(place["notify"].path), **env},
                        log=place["log"])


def _stop(proc: subprocess.Popen[bytes], within: float = 10.0) -> int:
    started = time.monotonic()
    code = stop_daemon(proc, signal.SIGTERM, timeout=within)
    assert time.monotonic() - started < within
    return code


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _drop(image: str, dest: Path) -> Path:
    """Put a copy of the fixture ``image`` at ``dest`` in one rename, as a finished copy lands."""
    staged = dest.parent.parent / f".{dest.name}.part"
    staged.write_bytes((IMAGES / image).read_bytes())
    os.replace(staged, dest)
    return dest


def _row(db: Path, path: Path) -> tuple[Any, ...]:
    return rows(db).get(str(path), ("",))


def _log(place: dict[str, Any]) -> str:
    return str(place["log"].read_text(errors="replace"))


# --------------------------------------------------------------------------------------------------------------


def test_ready_before_the_download_indexing_meanwhile_then_captions_and_counters_survive_sighup(
    place: dict[str, Any]
) -> None:
    root, db, env, notify = place["root"], place["db"], place["env"], place["notify"]
    before = root / "before.jpg"
    before.write_bytes((IMAGES / "blobs.jpg").read_bytes())  # there at start: waits in the index for the model
    config = _config(place, _hub_model())
    with FakeHub() as hub:
        hub.add_commit(HUB_REPO, COMMIT, tiny_model_files())
        hub.hold = threading.Event()  # the graphs do not arrive until the test says so
        proc = _start(place, config, HF_ENDPOINT=hub.url)
        try:
            notify.wait_for("READY=1")
            assert proc.poll() is None
            line = notify.status("downloading model tiny", "%")
            assert "MB" in line
            # The download is held (no graph has arrived), and still the daemon indexes what it sees.
            assert not (place["tmp"] / "cache" / "models" / "tiny" / COMMIT / ".capwatch").exists()
            dropped = _drop("gradient.jpg", root / "zebra-crossing.jpg")
            wait_until(lambda: _row(db, dropped)[0] == "pending" and _row(db, before)[0] == "pending",
                       what="both files indexed, waiting for a caption")
            found = _cli("--config", str(config), "search", "--paths", "zebra", env=env)
            assert found.returncode == 0 and found.stdout.split() == [str(dropped)], (found.stdout, found.stderr)
            status = _status(config, env)
            assert status["model_state"] == "downloading" and status["pending"] == 2
            assert status["daemon"]["model_progress"]["total"] > 0
            assert "downloading model tiny" in status["daemon"]["model_status"]
            human = _cli("--config", str(config), "status", env=env).stdout
            assert "downloading model tiny:" in human and "% (" in human
            assert proc.poll() is None

            hub.hold.set()  # the model arrives: both files are captioned
            wait_until(lambda: _row(db, dropped)[0] == "captioned" and _row(db, before)[0] == "captioned",
                       what="files captioned once the model is there")
            status = wait_until(lambda: (s := _status(config, env))["daemon"]["captioned"] >= 2 and s,
                                what="counters caught up")
            assert (status["model_id"], status["model_revision"]) == (HUB_REPO, COMMIT)
            assert status["model_state"] in ("loaded", "unloaded") and status["daemon"]["model_precision"] == "fp32"
            assert status["model"] == "tiny" and status["daemon"]["model_error"] is None
            log = _log(place)
            caption = _row(db, dropped)[1]
            assert f"captioned {dropped} in " in log and f": {caption}" in log
            assert f"captioned {before} in " in log
            # A file that fails is logged once, as a WARNING (and never as a caption).
            bad = root / "truncated.jpg"
            staged = place["tmp"] / "truncated.part"
            staged.write_bytes((IMAGES / "blobs.jpg").read_bytes()[:500])
            os.replace(staged, bad)
            wait_until(lambda: f"WARNING: {bad}: " in _log(place), what="the failure logged")

            # SIGHUP restarts the engine; the counters count since the process started.
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)
            notify.wait_for_text(lambda m: "RELOADING=1" in m.splitlines(), "RELOADING=1", after=mark)
            notify.wait_for_text(lambda m: "READY=1" in m.splitlines(), "READY=1 after the reload", after=mark)
            after = _status(config, env)
            assert after["daemon"]["captioned"] == status["daemon"]["captioned"] >= 2
            assert after["daemon"]["started"] == status["daemon"]["started"]
            assert after["model_revision"] == COMMIT
            assert _stop(proc) == 0
            lines = [line for line in _log(place).splitlines() if str(bad) in line]
            assert len(lines) == 1 and "WARNING" in lines[0] and _row(db, bad)[0] == "error", lines
        finally:
            hub.hold.set()
            _kill(proc)


def test_no_network_keeps_the_daemon_running_indexing_and_stops_at_once(place: dict[str, Any]) -> None:
    root, db, env, notify = place["root"], place["db"], place["env"], place["notify"]
    config = _config(place, _hub_model())
    proc = _start(place, config, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    try:
        notify.wait_for("READY=1")
        line = notify.status("no network", "trying again in")
        assert "model tiny is not downloaded" in line
        dropped = _drop("blobs.jpg", root / "offline.jpg")
        wait_until(lambda: _row(db, dropped)[0] == "pending", what="indexed without the model")
        status = _status(config, env)
        assert status["model_state"] == "missing" and status["model_id"] is None
        assert "cannot download tiny" in status["daemon"]["model_error"]
        assert proc.poll() is None  # no exit: systemd would only restart it into the same situation
        assert "indexing without captions, trying again in 30 s" in _log(place)
        assert _stop(proc, within=5.0) == 0
    finally:
        _kill(proc)


def test_offline_says_how_to_get_the_model_and_picks_it_up_when_it_lands_in_the_cache(place: dict[str, Any]) -> None:
    root, db, env, notify = place["root"], place["db"], place["env"], place["notify"]
    config = _config(place, _hub_model())
    (root / "waiting.jpg").write_bytes((IMAGES / "blobs.jpg").read_bytes())
    with FakeHub() as hub:
        hub.add_commit(HUB_REPO, COMMIT, tiny_model_files())
        proc = _start(place, config, HF_ENDPOINT=hub.url, CAPWATCH_OFFLINE="1")
        try:
            notify.wait_for("READY=1")
            line = notify.status("CAPWATCH_OFFLINE is set")
            assert "not downloaded" in line
            wait_until(lambda: _row(db, root / "waiting.jpg")[0] == "pending", what="indexed")
            assert hub.requests == []  # offline means no network at all
            # Someone pulls it into the cache (another shell, a copied cache): the daemon notices and captions.
            from capwatch.models.registry import custom_spec
            from capwatch.models.store import pull

            pull("tiny", "fp32", env, endpoint=hub.url, registry=[custom_spec("tiny", HUB_REPO, COMMIT)])
            wait_until(lambda: _row(db, root / "waiting.jpg")[0] == "captioned", what="captioned from the cache")
            assert _status(config, env)["model_revision"] == COMMIT
            assert _stop(proc) == 0
        finally:
            _kill(proc)


@pytest.mark.parametrize("damage", ["config", "graph"])
def test_a_model_that_cannot_be_loaded_is_reported_while_indexing_goes_on(place: dict[str, Any], damage: str) -> None:
    root, db, env, notify = place["root"], place["db"], place["env"], place["notify"]
    broken = place["tmp"] / "broken-model"
    shutil.copytree(TINY, broken)
    if damage == "config":
        (broken / "config.json").write_text("{not json")  # found when the model is opened, before READY
    else:
        # Opens fine (every file is there); onnxruntime refuses the graph when the first batch loads it.
        (broken / "onnx" / "encoder_model.onnx").write_bytes(b"not an onnx graph")
    config = _config(place, f'dir = "{broken}"\nprecision = "fp32"')
    proc = _start(place, config)
    try:
        notify.wait_for("READY=1")
        dropped = _drop("blobs.jpg", root / "still-indexed.jpg")
        line = notify.status("model error:", str(broken))
        assert "trying again in" in line
        wait_until(lambda: _row(db, dropped)[0] == "pending", what="indexed, waiting for a working model")
        status = _status(config, env)
        assert status["model_state"] == "error" and str(broken) in status["daemon"]["model_error"]
        human = _cli("--config", str(config), "status", env=env).stdout
        assert "model error:" in human
        assert "ERROR" in _log(place)
        assert _stop(proc, within=5.0) == 0
    finally:
        _kill(proc)


def test_an_unknown_model_name_still_stops_the_start_with_one_line(place: dict[str, Any]) -> None:
    config = _config(place, 'name = "no-such-model"')
    proc = start_daemon(config, env={**place["env"], "NOTIFY_SOCKET": str(place["notify"].path)})
    try:
        assert proc.wait(60) == 2
        assert proc.stderr is not None
        errors = [line for line in proc.stderr.read().decode().splitlines() if line.startswith("capwatch: error:")]
        assert len(errors) == 1 and "unknown model 'no-such-model'" in errors[0], errors
    finally:
        _kill(proc)
    assert not any("READY=1" in m.splitlines() for m in place["notify"].messages)


def test_sighup_keeps_the_download_going_and_sigterm_stops_it_at_once_the_next_start_resumes(
    place: dict[str, Any]
) -> None:
    root, db, notify = place["root"], place["db"], place["notify"]
    (root / "photo.jpg").write_bytes((IMAGES / "blobs.jpg").read_bytes())
    config = _config(place, _hub_model())
    files = tiny_model_files()
    with FakeHub() as hub:
        hub.add_commit(HUB_REPO, COMMIT, files)
        hub.hold = threading.Event()
        json_gets = lambda: hub.count("GET", f"/{HUB_REPO}/resolve/{COMMIT}/config.json")  # noqa: E731
        graph_gets = lambda: hub.count("GET", "/cdn/")  # noqa: E731
        proc = _start(place, config, HF_ENDPOINT=hub.url)
        try:
            notify.wait_for("READY=1")
            wait_until(lambda: graph_gets() == 1, what="the first graph asked for (and held)")
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)  # same model: the download goes on, it does not start again
            notify.wait_for_text(lambda m: "READY=1" in m.splitlines(), "READY=1 after the reload", after=mark)
            notify.status("downloading model tiny", "%", after=mark)
            assert graph_gets() == 1 and json_gets() == 1
            # SIGTERM while a graph is on its way: the daemon does not wait for the network.
            assert _stop(proc, within=5.0) == 0
        finally:
            hub.hold.set()
            _kill(proc)
        assert _row(db, root / "photo.jpg")[0] == "pending"
        hub.hold = None
        proc = _start(place, config, HF_ENDPOINT=hub.url)
        try:
            wait_until(lambda: _row(db, root / "photo.jpg")[0] == "captioned", what="captioned after a restart")
            assert json_gets() == 1  # what the first run finished was kept, not fetched again
            assert _stop(proc) == 0
        finally:
            _kill(proc)
