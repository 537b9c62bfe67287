"""The model cache and model folders as input from someone else: links planted in the cache never carry a write (or
a read) outside it, and nothing is called verified unless capwatch hashed it itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import FakeHub
from test_store import COMMIT, REPO, _repo_files, _spec

from capwatch.config import ModelConfig
from capwatch.errors import ModelError
from capwatch.models.store import model_info, models_root, pull, resolve_model
from tests.conftest import FIXTURES, CliRunner, assert_one_line_error

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loopback_only")]

VICTIM = b"export PATH=$HOME/bin:$PATH\n"


@pytest.fixture
def hub() -> FakeHub:
    with FakeHub() as server:
        server.add_commit(REPO, COMMIT, _repo_files())
        yield server


def _env(tmp_path: Path, state: str = "state") -> dict[str, str]:
    return {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / state)}


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / ".bashrc"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(VICTIM)
    return victim


def _one_line(exc: ModelError) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def test_a_link_at_the_marker_temp_name_is_not_written_through(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path)
    victim = _victim(tmp_path)
    markers = models_root(env) / "tiny" / COMMIT / ".capwatch"
    markers.mkdir(parents=True)
    (markers / ".int8.json.tmp").symlink_to(victim)  # the name the marker used to be written under
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert victim.read_bytes() == VICTIM
    assert json.loads((resolved.dir / ".capwatch" / "int8.json").read_text())["commit"] == COMMIT


def test_a_link_at_a_partial_download_is_refused_and_its_target_untouched(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path)
    victim = _victim(tmp_path)
    staging = models_root(env) / "tiny" / ".staging" / COMMIT / "onnx"
    staging.mkdir(parents=True)
    (staging / "encoder_model_quantized.onnx.part").symlink_to(victim)
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert "symbolic link" in _one_line(info.value)
    assert victim.read_bytes() == VICTIM  # not taken as a partial download, nothing appended
    assert not any(r.range for r in hub.requests)


def test_a_partial_download_of_another_user_is_not_resumed(tmp_path: Path, hub: FakeHub) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a file owned by another user needs root")
    env = _env(tmp_path)
    staging = models_root(env) / "tiny" / ".staging" / COMMIT / "onnx"
    staging.mkdir(parents=True)
    part = staging / "encoder_model_quantized.onnx.part"
    part.write_bytes(b"planted")
    os.chown(part, 12345, 12345)
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert "not a partial download of this user" in _one_line(info.value)
    assert part.read_bytes() == b"planted"


@pytest.mark.parametrize("where", ["commit", "model", "models", "marker-folder", "onnx-folder", "lock"])
def test_a_link_anywhere_inside_the_cache_is_refused_and_nothing_lands_outside(
        tmp_path: Path, hub: FakeHub, where: str) -> None:
    env = _env(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = models_root(env)
    link = {"commit": root / "tiny" / COMMIT, "model": root / "tiny", "models": root,
            "marker-folder": root / "tiny" / COMMIT / ".capwatch", "onnx-folder": root / "tiny" / COMMIT / "onnx",
            "lock": root / "tiny" / ".lock"}[where]
    link.parent.mkdir(parents=True, exist_ok=True)
    target = outside / "victim.lock" if where == "lock" else outside
    if where == "lock":
        target.write_bytes(VICTIM)
    link.symlink_to(target)
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    _one_line(info.value)
    if where == "lock":
        assert target.read_bytes() == VICTIM
    else:
        assert list(outside.iterdir()) == [], "a file was written outside the cache"


def test_a_cache_directory_that_is_itself_a_link_is_the_users_choice(tmp_path: Path, hub: FakeHub) -> None:
    real = tmp_path / "big-disk" / "capwatch"
    real.mkdir(parents=True)
    (tmp_path / "cache").symlink_to(real)
    env = _env(tmp_path)
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert (real / "models" / "tiny" / COMMIT / "onnx" / "encoder_model_quantized.onnx").is_file()
    assert resolved.dir == models_root(env) / "tiny" / COMMIT


def test_a_pulled_model_is_verified_and_a_copied_cache_is_hashed_once_then_verified(
        tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path)
    pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert "int8" in {p.precision for p in model_info("tiny", env, registry=[_spec()]).precisions if p.verified}
    # Another machine (another user's key) receives a copy of the cache.
    other = {"CAPWATCH_CACHE_DIR": str(tmp_path / "copied"), "XDG_STATE_HOME": str(tmp_path / "other-state"),
             "CAPWATCH_OFFLINE": "1"}
    shutil.copytree(tmp_path / "cache", tmp_path / "copied", symlinks=True)
    info = model_info("tiny", other, registry=[_spec()])
    assert not any(p.verified for p in info.precisions)  # listed, but capwatch here has not hashed it yet
    resolved = resolve_model(ModelConfig(name="tiny", precision="int8"), other, registry=[_spec()])
    assert resolved.revision == COMMIT
    info = model_info("tiny", other, registry=[_spec()])
    assert "int8" in {p.precision for p in info.precisions if p.verified}


def test_a_graph_swapped_in_a_copied_cache_is_not_used(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path)
    pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    other = {"CAPWATCH_CACHE_DIR": str(tmp_path / "copied"), "XDG_STATE_HOME": str(tmp_path / "other-state"),
             "CAPWATCH_OFFLINE": "1"}
    shutil.copytree(tmp_path / "cache", tmp_path / "copied", symlinks=True)
    graph = Path(other["CAPWATCH_CACHE_DIR"]) / "models" / "tiny" / COMMIT / "onnx" / "encoder_model_quantized.onnx"
    graph.write_bytes(bytes(len(graph.read_bytes())))  # same size, other content: a size check alone passes
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(name="tiny", precision="int8"), other, registry=[_spec()])
    assert "not in the cache" in _one_line(info.value)


def test_a_graph_rewritten_in_place_with_its_times_put_back_loses_its_stamp(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path)
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    graph = resolved.dir / "onnx" / "encoder_model_quantized.onnx"
    st = graph.stat()
    with open(graph, "r+b") as handle:  # same inode, same size
        handle.write(b"\x00" * 64)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    info = model_info("tiny", env, registry=[_spec()])
    assert not any(p.verified for p in info.precisions)
    with pytest.raises(ModelError):
        resolve_model(ModelConfig(name="tiny", precision="int8"), {**env, "CAPWATCH_OFFLINE": "1"},
                      registry=[_spec()])


def _model_folder_with_a_forged_marker(tmp_path: Path) -> Path:
    folder = tmp_path / "shared-model"
    shutil.copytree(FIXTURES / "models" / "vit-gpt2-tiny-greedy", folder)
    files = [{"path": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": "0" * 64}
             for p in sorted(folder.rglob("*")) if p.is_file()]
    commit = "215b4edcbe1b3ab6b6c8c1b2c3d4e5f6a7b8c9d0"
    marker = {"format": 1, "name": "vit-gpt2", "repo": "Xenova/vit-gpt2-image-captioning", "revision": commit,
              "commit": commit, "precision": "fp32", "files": files, "pulled_at": "2026-01-01T00:00:00.000000Z",
              "stamp": "f" * 64}
    (folder / ".capwatch").mkdir()
    (folder / ".capwatch" / "fp32.json").write_text(json.dumps(marker))
    return folder


def test_a_hand_written_marker_claims_neither_verification_nor_provenance(tmp_path: Path,
                                                                         run_cli: CliRunner) -> None:
    folder = _model_folder_with_a_forged_marker(tmp_path)
    result = run_cli("models", "info", folder, "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert not any(p["verified"] for p in info["precisions"])
    assert info["repo"] != "Xenova/vit-gpt2-image-captioning" and info["commit"] is None
    # Nor does the claim end up in the photos as the caption's provenance.
    image = tmp_path / "photo.jpg"
    shutil.copyfile(FIXTURES / "images" / "blobs.jpg", image)
    result = run_cli("--db", tmp_path / "index.db", "--model", folder, "caption", "--json", image)
    assert result.code == 0, result.err
    assert json.loads(result.out)["model"] == "shared-model"


def test_a_cache_link_is_one_line_through_the_cli(tmp_path: Path, run_cli: CliRunner) -> None:
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "vit-gpt2").symlink_to(tmp_path)
    result = run_cli("models", "pull", "vit-gpt2", env={"CAPWATCH_CACHE_DIR": str(cache), "CAPWATCH_OFFLINE": "",
                                                      "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert "symbolic link" in assert_one_line_error(result)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs), for what a full disk does; skipped where it cannot be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_pull_that_does_not_fit_is_refused_before_any_download(tmp_path: Path, hub: FakeHub,
                                                                  small_disk: Path) -> None:
    env = {"CAPWATCH_CACHE_DIR": str(small_disk / "cache"), "XDG_STATE_HOME": str(tmp_path / "state")}
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert "not enough free space" in _one_line(info.value)
    assert not any(r.method == "GET" for r in hub.requests)


def test_a_file_announced_far_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    files = _repo_files()
    with FakeHub() as server:
        server.add_commit(REPO, COMMIT, files)
        server.announce_size("onnx/encoder_model_quantized.onnx", 10 ** 15)
        with pytest.raises(ModelError) as info:
            pull("tiny", "int8", _env(tmp_path), endpoint=server.url, registry=[_spec()])
        assert "far more than the whole model" in _one_line(info.value)
        assert not any(r.method == "GET" for r in server.requests)
