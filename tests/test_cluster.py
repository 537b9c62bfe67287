"""`capwatch scan --cluster`: captioning on real Dask workers (a LocalCluster of 2 worker processes on 127.0.0.1,
and a `dask scheduler` / `dask worker --preload capwatch.cluster` pair), written by the coordinator alone.

Every write of the coordinator is logged by its before-write hook ($CAPWATCH_HOOK_BEFORE_WRITE), which also does the
harm at the first write (SIGKILL a worker, or the scheduler): so "every file captioned exactly once" is checked on
the writes themselves, not only on the end state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import MODELS
from hub_server import FakeHub
from PIL import Image

from capwatch.config import ModelConfig
from capwatch.errors import CapwatchError, ModelError
from capwatch.library.index import Index
from capwatch.metadata import read_snapshot
from capwatch.models.store import resolve_model
from tests.conftest import CliRunner, assert_one_line_error

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.timeout(120)]

TINY = MODELS / "vit-gpt2-tiny-greedy"
HUB_REPO = "capwatch-test/vit-gpt2-tiny"
COORDINATOR_COMMIT = hashlib.sha1(b"cluster test, coordinator's revision").hexdigest()
WORKER_COMMIT = hashlib.sha1(b"cluster test, workers' revision").hexdigest()


def _hub_files() -> dict[str, bytes]:
    files = {name: (TINY / name).read_bytes()
             for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json")}
    files.update({f"onnx/{g.name}": g.read_bytes() for g in (TINY / "onnx").glob("*.onnx")})
    return files


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two model caches holding the same hub model (branch main) at two revisions: main moved between the pulls."""
    base = tmp_path_factory.mktemp("caches")
    model = ModelConfig(name="tiny", repo=HUB_REPO, precision="fp32")
    out = {}
    with FakeHub() as hub:
        for who, commit in (("coordinator", COORDINATOR_COMMIT), ("worker", WORKER_COMMIT)):
            hub.add_commit(HUB_REPO, commit, _hub_files())
            env = {"CAPWATCH_CACHE_DIR": str(base / who), "XDG_STATE_HOME": str(base / "state"),
                   "HF_ENDPOINT": hub.url}
            assert resolve_model(model, env, download=True).revision == commit
            out[who] = base / who
    out["state"] = base / "state"
    return out


@pytest.fixture(scope="module")
def cluster(caches: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    """A LocalCluster: 2 worker processes of 1 thread each, on 127.0.0.1, whose model cache is the workers' one;
    and a client of the test's own (to find the workers' processes)."""
    home = tmp_path_factory.mktemp("worker-home")
    env = {"CAPWATCH_CACHE_DIR": str(caches["worker"]), "XDG_STATE_HOME": str(caches["state"]),
           "HOME": str(home), "CAPWATCH_OFFLINE": "1"}
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0", env=env) as local, \
            distributed.Client(local, set_as_default=False) as client:
        yield local.scheduler_address, client, local.scheduler


def _library(root: Path, count: int) -> Path:
    for i in range(count):
        path = root / f"{i // 8:02d}" / f"img{i:03d}.{'jpg' if i % 3 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64 + i, 48), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(path)
    return root


def _config(tmp_path: Path, model: str = "", batch_size: int = 4) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"[model]\n{model}batch_size = {batch_size}\n\n[cluster]\nconnect_timeout_seconds = 1\n"
                    "worker_wait_seconds = 30\n")
    return path


def _hook(tmp_path: Path, kill_pid: int | None = None) -> dict[str, str]:
    """A before-write hook that logs every file written, and SIGKILLs ``kill_pid`` at the first write."""
    hook = tmp_path / "hook.sh"
    kill = f'if [ ! -e "{tmp_path}/killed" ]; then touch "{tmp_path}/killed"; kill -9 {kill_pid}; sleep 0.5; fi\n' \
        if kill_pid else ""
    hook.write_text(f'#!/bin/sh\necho "$1" >> "{tmp_path}/writes.log"\n{kill}')
    hook.chmod(0o755)
    return {"CAPWATCH_HOOK_BEFORE_WRITE": str(hook)}


def _writes(tmp_path: Path) -> Counter[str]:
    log = tmp_path / "writes.log"
    return Counter(log.read_text().split()) if log.exists() else Counter()


def _captions(db: Path, root: Path) -> dict[str, tuple[str, str | None, str | None]]:
    """Per file (relative to ``root``): status, caption in the index, caption in the file."""
    index = Index.open(db, readonly=True)
    try:
        rows = list(index.iter_records(root))
    finally:
        index.close()
    out = {}
    for row in rows:
        try:
            desc = read_snapshot(Path(row.path)).metadata.description
        except CapwatchError:
            desc = None
        out[os.path.relpath(row.path, root)] = (row.status, row.caption, desc.text if desc else None)
    return out


def _index_error(db: Path, path: Path) -> str:
    index = Index.open(db, readonly=True)
    try:
        row = index.get(path)
    finally:
        index.close()
    assert row is not None and row.status == "error" and row.error, row
    return row.error


def test_captions_made_on_the_cluster_are_identical_to_a_local_scan(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    address = cluster[0]
    local = _library(tmp_path / "local", 14)
    # Metadata reads fine, pixels do not decode: fails on the worker, reported (and recorded) by the coordinator.
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "whole.jpg")
    (local / "broken.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:700])
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    config = _config(tmp_path)
    at_home = run_cli("--config", config, "--db", tmp_path / "local.db", "--model", TINY, "scan", local)
    result = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", TINY, "scan", remote,
                     "--cluster", address, env=_hook(tmp_path))
    assert at_home.code == result.code == 1, (at_home.err, result.err)  # broken.jpg fails in both
    assert "15 images: 15 new" in result.out and "14 captioned; 1 failed" in result.out, result.out
    assert f"{remote / 'broken.jpg'}: error: " in result.err and "Traceback" not in result.err, result.err
    want, got = _captions(tmp_path / "local.db", local), _captions(tmp_path / "remote.db", remote)
    assert got == want
    # The worker's decode error names the file as the coordinator knows it, as a local scan's does.
    errors = [_index_error(db, root / "broken.jpg").replace(str(root), "ROOT")
              for db, root in ((tmp_path / "local.db", local), (tmp_path / "remote.db", remote))]
    assert errors[0] == errors[1] and errors[0].startswith("ROOT/broken.jpg: "), errors
    assert sum(1 for status, caption, text in got.values() if status == "captioned" and caption == text) == 14
    assert _writes(tmp_path) == Counter({str(remote / name): 1 for name, row in got.items() if row[0] == "captioned"})
    assert "worker tcp://127.0.0.1:" in result.err  # per-worker rates in the log
    # `status` shows the configured scheduler's workers and the model each holds.
    config.write_text(config.read_text().replace("[cluster]\n", f'[cluster]\nscheduler = "{address}"\n'))
    status = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", TINY, "status", "--json")
    assert status.code == 0, status.err
    cluster = json.loads(status.out)["cluster"]
    assert cluster["scheduler"] == address and cluster["error"] is None
    assert [(w["threads"], w["model"]) for w in cluster["workers"]] == \
        [(1, "vit-gpt2-tiny-greedy (revision unknown) fp32 on cpu")] * 2


def _vectors(db: Path, root: Path) -> dict[str, Any]:
    import sqlite3

    import numpy as np

    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT i.path, v.vector FROM image_vectors AS v JOIN images AS i ON i.id = v.image_id")
    found = {os.path.relpath(path, root): np.frombuffer(blob, dtype=np.float32) for path, blob in rows}
    conn.close()
    return found


def test_embeddings_are_made_on_the_workers_from_the_same_decode_as_a_local_scan(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    address = cluster[0]
    local = _library(tmp_path / "local", 9)
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    config = _config(tmp_path)
    env = {"CAPWATCH_EMBED_MODEL": str(MODELS / "siglip-tiny")}
    at_home = run_cli("--config", config, "--db", tmp_path / "local.db", "--model", TINY, "scan", local, env=env)
    result = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", TINY, "scan", remote,
                     "--cluster", address, env=env)
    assert at_home.code == result.code == 0, (at_home.err, result.err)
    # Every image came back with its embedding: nothing was left for this machine to fill in afterwards.
    assert "9 captioned" in result.out and "embedded" not in result.out, result.out
    want, got = _vectors(tmp_path / "local.db", local), _vectors(tmp_path / "remote.db", remote)
    assert sorted(got) == sorted(want) and len(got) == 9
    for name, vector in got.items():
        assert float(vector @ want[name]) > 1 - 1e-5, name


def test_keywords_made_on_the_cluster_are_those_of_a_local_scan(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    # Florence-2 gives keywords (<OD>) besides the caption: the workers make them, the coordinator writes them.
    florence = MODELS / "florence2-tiny"
    local = tmp_path / "local"
    local.mkdir()
    for name in ("blobs.jpg", "gradient.jpg", "checker.png", "red.png"):
        shutil.copy(MODELS.parent / "images" / name, local / name)
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    config = _config(tmp_path, batch_size=2)
    at_home = run_cli("--config", config, "--db", tmp_path / "local.db", "--model", florence, "scan", local)
    result = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", florence, "scan", remote,
                     "--cluster", cluster[0])
    assert at_home.code == result.code == 0, (at_home.err, result.err)

    def keywords(db: Path, root: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        with Index.open(db, readonly=True) as index:
            return {os.path.relpath(r.path, root): (r.keywords, r.model_keywords) for r in index.iter_records(root)}

    want, got = keywords(tmp_path / "local.db", local), keywords(tmp_path / "remote.db", remote)
    assert got == want and any(mine for _, mine in got.values()), got
    assert _captions(tmp_path / "remote.db", remote) == _captions(tmp_path / "local.db", local)
    for name, (_, mine) in got.items():
        assert read_snapshot(remote / name).metadata.model_keywords == mine


def test_a_video_on_the_cluster_gets_the_caption_keywords_text_and_moments_of_a_local_scan(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    # The workers get a video's chosen frames (not the video): keywords and text merged over them, each embedded.
    pytest.importorskip("av")
    import sqlite3

    import numpy as np
    from video_helpers import scenes_video

    florence = MODELS / "florence2-tiny"
    local = tmp_path / "local"
    local.mkdir()
    scenes_video(local / "clip.mp4")
    scenes_video(local / "bars.mov", "smptebars", "testsrc2", "rgbtestsrc")
    shutil.copy(MODELS.parent / "images" / "blobs.jpg", local / "blobs.jpg")
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    config = tmp_path / "config.toml"
    config.write_text('[model]\nbatch_size = 2\n\n[ocr]\nengine = "florence"\n\n[cluster]\n'
                      "connect_timeout_seconds = 1\nworker_wait_seconds = 30\n")
    env = {"CAPWATCH_EMBED_MODEL": str(MODELS / "siglip-tiny")}
    at_home = run_cli("--config", config, "--db", tmp_path / "local.db", "--model", florence, "scan", local, env=env)
    result = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", florence, "scan", remote,
                     "--cluster", cluster[0], env=env)
    assert at_home.code == result.code == 0, (at_home.err, result.err)
    assert "embedded" not in result.out, result.out  # nothing left for the coordinator to embed afterwards

    def described(db: Path, root: Path) -> dict[str, tuple[Any, ...]]:
        with Index.open(db, readonly=True) as index:
            return {os.path.relpath(r.path, root): (r.caption, r.keywords, r.model_keywords, r.ocr_text)
                    for r in index.iter_records(root)}

    def moments(db: Path, root: Path) -> dict[str, tuple[Any, list[tuple[float, Any]]]]:
        conn = sqlite3.connect(db)
        out = {}
        for image_id, path, at in conn.execute("SELECT v.image_id, i.path, v.at FROM image_vectors AS v "
                                               "JOIN images AS i ON i.id = v.image_id"):
            out[os.path.relpath(path, root)] = (at, [(t, np.frombuffer(v, dtype=np.float32)) for t, v in conn.execute(
                "SELECT at, vector FROM frame_vectors WHERE image_id = ? ORDER BY at", (image_id,))])
        conn.close()
        return out

    want, got = described(tmp_path / "local.db", local), described(tmp_path / "remote.db", remote)
    assert got == want, got
    assert any(keywords for _, keywords, _, _ in got.values())
    assert _captions(tmp_path / "remote.db", remote) == _captions(tmp_path / "local.db", local)
    want_m, got_m = moments(tmp_path / "local.db", local), moments(tmp_path / "remote.db", remote)
    assert sorted(got_m) == sorted(want_m) == ["bars.mov", "blobs.jpg", "clip.mp4"]
    for name in ("clip.mp4", "bars.mov"):
        assert got_m[name][0] == want_m[name][0] is not None
        assert [t for t, _ in got_m[name][1]] == [t for t, _ in want_m[name][1]] and len(got_m[name][1]) == 2
        for (_, a), (_, b) in zip(got_m[name][1], want_m[name][1], strict=True):
            assert float(a @ b) > 1 - 1e-5
    assert got_m["blobs.jpg"] == (None, [])


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is the independent reader")
def test_captions_made_on_the_cluster_record_the_static_int8_encoder_the_workers_ran_and_status_shows_it(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    # [model] int8_image_encoder = "static": each worker makes and probes its own static graph; what it ran is
    # recorded in each file's provenance (capwatch:ModelPrecision) as a local scan records it, and shown by status.
    florence = MODELS / "florence2-tiny"
    local = tmp_path / "local"
    local.mkdir()
    for name in ("coffee.jpg", "astronaut.jpg"):
        shutil.copy(MODELS.parent / "photos" / name, local / name)
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    config = tmp_path / "config.toml"
    config.write_text('[model]\nprecision = "int8"\nint8_image_encoder = "static"\nbatch_size = 2\n\n[cluster]\n'
                      "connect_timeout_seconds = 1\nworker_wait_seconds = 30\n")
    at_home = run_cli("--config", config, "--db", tmp_path / "local.db", "--model", florence, "scan", local)
    result = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", florence, "scan", remote,
                     "--cluster", cluster[0])
    assert at_home.code == result.code == 0, (at_home.err, result.err)

    def recorded(root: Path) -> dict[str, str]:
        out = json.loads(subprocess.run(["exiftool", "-j", "-XMP-capwatch:ModelPrecision", str(root)],
                                        capture_output=True, text=True, check=True).stdout)
        return {Path(item["SourceFile"]).name: item.get("ModelPrecision") for item in out}

    want = {"coffee.jpg": "int8+vision_encoder=int8-static", "astronaut.jpg": "int8+vision_encoder=int8-static"}
    assert recorded(local) == recorded(remote) == want
    config.write_text(config.read_text() + f'scheduler = "{cluster[0]}"\n')
    status = run_cli("--config", config, "--db", tmp_path / "remote.db", "status", "--json")
    assert status.code == 0, status.err
    workers = json.loads(status.out)["cluster"]["workers"]
    assert workers and all("int8+vision_encoder=int8-static" in str(w["model"]) for w in workers), workers


def test_a_worker_killed_mid_run_has_its_batches_redone_elsewhere_and_every_file_is_written_once(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    address, client, scheduler = cluster
    pids: dict[str, int] = client.run(os.getpid)
    victim_address, victim = sorted(pids.items())[0]
    library = _library(tmp_path / "lib", 40)
    result = run_cli("--config", _config(tmp_path, batch_size=2), "--db", tmp_path / "db", "--model", TINY,
                     "scan", library, "--cluster", address, env=_hook(tmp_path, kill_pid=victim))
    assert (tmp_path / "killed").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # the worker really is gone (its nanny may start a new one)
    # The scheduler took back batches the dead worker held (running, or done but not yet delivered) to run again.
    taken_back = [t for t in scheduler.transition_log if str(t.key).startswith("caption_batch")
                  and t.start in ("processing", "memory") and t.finish == "released"
                  and t.stimulus_id.startswith("handle-worker-cleanup")]
    assert taken_back, f"{victim_address} held no batch when it was killed"
    assert result.code == 0, result.err
    assert "40 captioned" in result.out, result.out
    rows = _captions(tmp_path / "db", library)
    assert len(rows) == 40 and all(status == "captioned" and caption and caption == text
                                   for status, caption, text in rows.values())
    writes = _writes(tmp_path)
    assert sorted(writes) == sorted(str(library / name) for name in rows) and set(writes.values()) == {1}


def test_a_worker_with_another_model_revision_is_refused_in_one_line_before_anything_is_written(
        cluster: tuple[str, Any, Any], caches: dict[str, Path], run_cli: CliRunner, tmp_path: Path) -> None:
    address = cluster[0]
    library = _library(tmp_path / "lib", 3)
    before = {p: p.read_bytes() for p in library.rglob("*.*")}
    config = _config(tmp_path, model=f'name = "tiny"\nrepo = "{HUB_REPO}"\nprecision = "fp32"\n')
    # The scheduler from the configuration this time ([cluster] scheduler), not --cluster.
    config.write_text(config.read_text().replace("[cluster]\n", f'[cluster]\nscheduler = "{address}"\n'))
    result = run_cli("--config", config, "--db", tmp_path / "db", "scan", library,
                     env={"CAPWATCH_CACHE_DIR": str(caches["coordinator"]), "XDG_STATE_HOME": str(caches["state"]),
                          **_hook(tmp_path)})
    line = assert_one_line_error(result, 2)
    assert "model mismatch" in line and WORKER_COMMIT in line and COORDINATOR_COMMIT in line, line
    assert {p: p.read_bytes() for p in library.rglob("*.*")} == before
    assert not _writes(tmp_path)


def _start_scheduler(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard", "--scheduler-file", str(scheduler_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return proc, json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("dask scheduler did not start")


def _start_worker(address: str, env: dict[str, str], *options: str) -> subprocess.Popen[bytes]:
    """A real one-thread `dask worker` process (no nanny, so a kill is final)."""
    return subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-nanny",
                             "--no-dashboard", *options], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_the_last_worker_gone_mid_run_stops_cleanly_once_none_came_back_in_time(
        run_cli: CliRunner, tmp_path: Path) -> None:
    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    scheduler, address = _start_scheduler(tmp_path, env)
    worker = _start_worker(address, env)
    try:
        library = _library(tmp_path / "lib", 12)
        config = _config(tmp_path, batch_size=3)
        config.write_text(config.read_text().replace("worker_wait_seconds = 30", "worker_wait_seconds = 1"))
        result = run_cli("--config", config, "--db", tmp_path / "db", "--model", TINY, "scan", library,
                         "--cluster", address, env=_hook(tmp_path, kill_pid=worker.pid))
    finally:
        worker.kill()
        scheduler.kill()
        worker.wait()
        scheduler.wait()
    line = assert_one_line_error(result, 1)
    assert f"no Dask worker left at {address} for 1 s" in line, line
    rows = _captions(tmp_path / "db", library)
    done = {name for name, (status, _, _) in rows.items() if status == "captioned"}
    assert 0 < len(done) < 12 and all(rows[name][1] == rows[name][2] for name in done), rows
    assert set(_writes(tmp_path)) == {str(library / name) for name in done}


def test_the_scheduler_gone_mid_run_stops_cleanly_and_a_new_run_finishes_the_rest(
        cluster: tuple[str, Any, Any], run_cli: CliRunner, tmp_path: Path) -> None:
    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    scheduler, address = _start_scheduler(tmp_path, env)
    worker = _start_worker(address, env, "--preload", "capwatch.cluster", "--providers", "cpu")
    try:
        library = _library(tmp_path / "lib", 24)
        config = _config(tmp_path, batch_size=3)
        result = run_cli("--config", config, "--db", tmp_path / "db", "--model", TINY, "scan", library,
                         "--cluster", address, env=_hook(tmp_path, kill_pid=scheduler.pid))
    finally:
        worker.kill()
        scheduler.kill()
        worker.wait()
        scheduler.wait()
    line = assert_one_line_error(result, 1)
    assert f"the Dask scheduler at {address} went away" in line and "run the scan again" in line, line
    rows = _captions(tmp_path / "db", library)
    done = {name for name, (status, _, _) in rows.items() if status == "captioned"}
    # Whole batches only: what was written is in the file and the index alike; the rest is untouched, pending.
    assert 0 < len(done) < 24 and len(done) % 3 == 0, rows
    for name, (status, caption, text) in rows.items():
        assert (status, caption == text) == ("captioned", True) if name in done else (status, text) == ("pending", None)
    # Resumed on the other cluster: the rest is captioned, and nothing is written a second time.
    again = run_cli("--config", config, "--db", tmp_path / "db", "--model", TINY, "scan", library,
                    "--cluster", cluster[0], env=_hook(tmp_path))
    assert again.code == 0, again.err
    assert f"{24 - len(done)} captioned" in again.out, again.out
    rows = _captions(tmp_path / "db", library)
    assert all(status == "captioned" and caption == text for status, caption, text in rows.values())
    writes = _writes(tmp_path)
    assert sorted(writes) == sorted(str(library / name) for name in rows) and set(writes.values()) == {1}


def test_scan_with_no_scheduler_at_the_address_says_so_in_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    library = _library(tmp_path / "lib", 2)
    result = run_cli("--config", _config(tmp_path), "--db", tmp_path / "db", "--model", TINY, "scan", library,
                     "--cluster", "tcp://127.0.0.1:9")
    line = assert_one_line_error(result, 2)
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in line, line


def test_a_worker_runs_on_its_own_providers_and_refuses_another_capwatch_version(tmp_path: Path) -> None:
    from capwatch.cluster import PROVIDERS_ENV, ModelRequest, open_worker_captioner, parse_providers

    request = ModelRequest(ModelConfig(dir=TINY, providers=("cpu",)), TINY.name, None, "fp32")
    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / "state"),
           PROVIDERS_ENV: "cuda,cpu"}
    captioner = open_worker_captioner(request, 3, env)
    try:
        # A GPU box's worker asks for CUDA first (an onnxruntime without it runs on the CPU, saying so once).
        assert captioner.config.providers == ("cuda", "cpu") and captioner.config.threads == 3
        assert captioner.loaded and captioner.provider in ("cuda", "cpu")
    finally:
        captioner.close()
    with pytest.raises(ModelError, match=r"0\.0\.1 on the coordinator"):
        open_worker_captioner(dataclasses.replace(request, version="0.0.1"), 1, env)
    with pytest.raises(ModelError, match="unknown onnxruntime provider 'gpu'"):
        open_worker_captioner(request, 1, {**env, PROVIDERS_ENV: "gpu"})
    assert parse_providers(" CUDA, cpu ") == ("cuda", "cpu") and parse_providers("") == ()


def test_scan_cluster_without_the_extra_says_how_to_install_it_before_touching_anything(
        run_cli: CliRunner, tmp_path: Path) -> None:
    blocked = tmp_path / "site" / "distributed"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("No module named \'distributed\'")\n')
    library = _library(tmp_path / "lib", 1)
    pythonpath = os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = run_cli("--db", tmp_path / "db", "--model", TINY, "scan", library, "--cluster", "tcp://127.0.0.1:9",
                     env={"PYTHONPATH": pythonpath})
    line = assert_one_line_error(result, 2)
    # This environment's own pip, not whichever pip comes first on the PATH.
    assert f"{sys.executable} -m pip install 'capwatch[cluster]'" in line, line
    assert not (tmp_path / "db").exists()


def test_a_worker_killed_while_the_workers_load_the_model_leaves_the_others_to_caption(tmp_path: Path) -> None:
    import signal

    from capwatch import cluster as dask_cluster
    from capwatch.cluster.worker import plugin_state
    from capwatch.config import Config
    from capwatch.models.captioner import open_captioner

    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    scheduler, address = _start_scheduler(tmp_path, env)
    survivor = _start_worker(address, env, "--preload", "capwatch.cluster")
    victim = _start_worker(address, env, "--preload", "capwatch.cluster")
    config = Config(model=ModelConfig(dir=TINY, precision="fp32"))
    captioner = open_captioner(TINY, config.model)
    try:
        with dask_cluster.connect(address, timeout=10) as client:
            client.wait_for_workers(2, timeout=60)
            os.kill(victim.pid, signal.SIGSTOP)  # it cannot answer: the install waits on it ...
            thread, result = _install_in_thread(client, captioner, config, wait_seconds=30)
            thread.join(2)  # ... until it is killed
            assert thread.is_alive(), result
            victim.kill()
            thread.join(90)
            assert not thread.is_alive()
            assert "error" not in result, result["error"]
            assert len(result["workers"]) == 1
            assert client.run(plugin_state) == {result["workers"][0]: None}
    finally:
        captioner.close()
        for proc in (victim, survivor, scheduler):
            proc.kill()
            proc.wait()


def test_the_scheduler_gone_while_the_workers_load_the_model_is_said_as_such(tmp_path: Path) -> None:
    import signal

    from capwatch import cluster as dask_cluster
    from capwatch.config import Config
    from capwatch.models.captioner import open_captioner

    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    scheduler, address = _start_scheduler(tmp_path, env)
    worker = _start_worker(address, env, "--preload", "capwatch.cluster")
    config = Config(model=ModelConfig(dir=TINY, precision="fp32"))
    captioner = open_captioner(TINY, config.model)
    try:
        with dask_cluster.connect(address, timeout=10) as client:
            client.wait_for_workers(1, timeout=60)
            os.kill(worker.pid, signal.SIGSTOP)
            thread, result = _install_in_thread(client, captioner, config, wait_seconds=5)
            thread.join(2)
            assert thread.is_alive(), result
            scheduler.kill()
            thread.join(90)
            assert not thread.is_alive()
            error = result.get("error")
            assert isinstance(error, dask_cluster.ClusterLost), result
            assert f"the Dask scheduler at {address} went away while its workers were loading" in str(error)
    finally:
        captioner.close()
        for proc in (worker, scheduler):
            proc.kill()
            proc.wait()


def _install_in_thread(client: Any, captioner: Any, config: Any, *, wait_seconds: float
                       ) -> tuple[threading.Thread, dict[str, Any]]:
    """``capwatch.cluster.install`` of ``captioner``'s model started on a thread of its own (the test stops a
    worker or the scheduler meanwhile); the thread and where it leaves ``workers`` or ``error``."""
    from capwatch import cluster as dask_cluster

    result: dict[str, Any] = {}

    def install() -> None:
        try:
            result["workers"] = dask_cluster.install(
                client, dask_cluster.model_request(captioner, config.model), wait_seconds=wait_seconds)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=install)
    thread.start()
    return thread, result
