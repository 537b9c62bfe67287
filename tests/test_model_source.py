"""capwatch.daemon.modelsource in-process: back-off, stopping, retry on demand, a download stopped and resumed.

The daemon-level behaviour (READY first, indexing meanwhile, STATUS) is in test_daemon_model_startup.py; these
tests pin the timing rules with short back-offs, so they run in a fraction of a second each.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import MODELS, wait_until
from hub_server import FakeHub, sha256

from capwatch.config import Config, ModelConfig
from capwatch.daemon.modelsource import ModelSource
from capwatch.errors import ModelError, ModelUnreachable

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loopback_only")]

TINY = MODELS / "vit-gpt2-tiny-greedy"
HUB_REPO = "capwatch-test/vit-gpt2-tiny"
COMMIT = hashlib.sha1(b"tiny model for the model source").hexdigest()


class FakeCaptioner:
    model_id = "fake/model"
    revision = None
    loaded = False

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Flaky:
    """A captioner factory that raises the given errors in turn, then opens; records when it was called."""

    def __init__(self, *errors: ModelError) -> None:
        self.errors = list(errors)
        self.calls: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, config: Config) -> FakeCaptioner:
        with self.lock:
            self.calls.append(time.monotonic())
            if self.errors:
                raise self.errors.pop(0)
        return FakeCaptioner()


def _offline(n: int) -> list[ModelError]:
    return [ModelUnreachable("cannot download x: connection refused", problem="connection refused")
            for _ in range(n)]


@pytest.fixture
def sources() -> Iterator[list[ModelSource]]:
    made: list[ModelSource] = []
    yield made
    for source in made:
        assert source.stop(5.0)


def _source(sources: list[ModelSource], factory: Any = None, *, config: Config | None = None,
            env: dict[str, str] | None = None, backoff: tuple[float, float] = (30.0, 3600.0)) -> ModelSource:
    source = ModelSource(config or Config(), env or {}, factory=factory, backoff=backoff, recheck=0.01)
    sources.append(source)
    return source


def test_no_network_is_retried_with_a_doubling_back_off_up_to_its_ceiling(sources: list[ModelSource]) -> None:
    factory = Flaky(*_offline(4))
    source = _source(sources, factory, backoff=(0.05, 0.2))
    assert source.try_now() is None  # the first attempt, in the caller's thread
    snap = source.snapshot()
    assert snap.state == "missing" and "no network (connection refused)" in snap.text
    assert "trying again in" in snap.text and snap.error is not None
    source.start()
    captioner = wait_until(source.take, what="the model once the network is back")
    assert isinstance(captioner, FakeCaptioner)
    gaps = [b - a for a, b in zip(factory.calls, factory.calls[1:], strict=False)]
    assert len(gaps) == 4
    # 0.05, 0.1, 0.2, then the ceiling: a wait never ends before its back-off.
    for gap, least in zip(gaps, (0.05, 0.1, 0.2, 0.2), strict=True):
        assert gap >= least - 0.005, (gaps, least)
    assert source.snapshot().state == "ready"
    assert source.take() is None  # handed over once


def test_an_error_waits_for_its_back_off_even_though_the_cache_is_checked_often(sources: list[ModelSource]) -> None:
    factory = Flaky(ModelError("broken model"), ModelError("broken model"))
    source = _source(sources, factory, backoff=(0.15, 0.3))
    assert source.try_now() is None
    assert source.snapshot().state == "error" and source.snapshot().error == "model error: broken model"
    source.start()
    wait_until(source.take, what="the model after two errors")
    first, second, third = factory.calls
    # Checked every 0.01 s, yet nothing was tried again before each back-off was over.
    assert second - first >= 0.15 - 0.005 and third - second >= 0.3 - 0.005


def test_stop_ends_a_long_back_off_within_a_second(sources: list[ModelSource]) -> None:
    factory = Flaky(*_offline(10))
    source = _source(sources, factory)  # 30 s before the next attempt
    source.start()
    wait_until(lambda: source.snapshot().error, what="the first failure")
    started = time.monotonic()
    assert source.stop(1.0)
    assert time.monotonic() - started < 1.0
    assert len(factory.calls) == 1 and source.take() is None


def test_retry_now_skips_the_rest_of_the_back_off(sources: list[ModelSource]) -> None:
    factory = Flaky(*_offline(1))
    source = _source(sources, factory)
    source.start()
    wait_until(lambda: source.snapshot().error, what="the first failure")
    source.retry_now()  # what SIGHUP does
    assert isinstance(wait_until(source.take, timeout=5, what="the model at once"), FakeCaptioner)


def test_a_model_that_fails_when_it_runs_is_opened_again_after_a_growing_back_off(
    sources: list[ModelSource]
) -> None:
    factory = Flaky()
    source = _source(sources, factory, backoff=(0.1, 1.0))
    assert isinstance(source.try_now(), FakeCaptioner)
    source.report_failure("model error: graph does not load")
    assert source.snapshot().state == "error"
    wait_until(source.take, what="opened again")
    source.report_failure("model error: graph does not load")
    wait_until(source.take, what="opened again")
    assert factory.calls[2] - factory.calls[1] >= 0.2 - 0.005  # the back-off kept doubling


def test_a_missing_model_directory_is_waited_for(tmp_path: Path, sources: list[ModelSource]) -> None:
    folder = tmp_path / "mount" / "model"
    config = Config(model=ModelConfig(dir=folder, precision="fp32"))
    source = _source(sources, config=config)
    assert source.try_now() is None
    snap = source.snapshot()
    assert snap.state == "missing" and f"model directory {folder} does not exist" in snap.text
    assert "trying again" not in snap.text  # nothing failed: it is looked for again every recheck
    source.start()
    folder.parent.mkdir()
    # The mount comes up: the whole folder appears at once. (Copied in place file by file, the source could catch
    # it half-copied, fail to load it and wait out its 30 s back-off: another behaviour, and a 30 s test.)
    staged = tmp_path / "staged-model"
    shutil.copytree(TINY, staged)
    staged.rename(folder)
    captioner = wait_until(source.take, what="the model once its folder is there")
    try:
        assert captioner.model_dir == folder
    finally:
        captioner.close()


def _tiny_files() -> dict[str, bytes]:
    files = {name: (TINY / name).read_bytes()
             for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json")}
    files.update({f"onnx/{g.name}": g.read_bytes() for g in (TINY / "onnx").glob("*.onnx")})
    return files


def test_a_download_stopped_midway_is_resumed_by_the_next_source(tmp_path: Path, sources: list[ModelSource]) -> None:
    files = _tiny_files()
    model = ModelConfig(name="tiny", repo=HUB_REPO, revision=COMMIT, precision="fp32")
    with FakeHub() as hub:
        hub.add_commit(HUB_REPO, COMMIT, files)
        env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url,
               "XDG_STATE_HOME": str(tmp_path / "state")}
        hub.hold = threading.Event()
        first = _source(sources, config=Config(model=model), env=env)
        first.start()
        wait_until(lambda: first.snapshot().total > 0, what="the download under way")
        snap = first.snapshot()
        assert snap.state == "downloading" and snap.text.startswith("downloading model tiny: ")
        assert snap.text.endswith(f"of {snap.total / 1e6:.1f} MB)")
        graph = sha256(files["onnx/encoder_model.onnx"])
        wait_until(lambda: hub.count("GET", f"/cdn/{graph}") == 1, what="the first graph asked for")
        first.cancel()  # stopped while that graph is on its way
        hub.hold.set()
        assert first.stop(10.0)
        assert first.take() is None  # stopped: nothing handed over
        second = _source(sources, config=Config(model=model), env=env)
        second.start()
        captioner = wait_until(second.take, what="the model after the resumed download")
        try:
            assert (captioner.model_id, captioner.revision) == (HUB_REPO, COMMIT)
        finally:
            captioner.close()
        assert hub.count("GET", f"/cdn/{graph}") == 1  # what arrived before the stop was not fetched again
