"""The model store against a real HTTP server on 127.0.0.1 that answers like the hub (tests/hub_server.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import FakeHub, sha256

from capwatch.config import ModelConfig
from capwatch.errors import CapwatchError, ModelError
from capwatch.models.registry import FileSpec, ModelSpec, PrecisionSpec, graph_files
from capwatch.models.store import (
    ModelInfo,
    list_models,
    model_info,
    models_root,
    pull,
    resolve_model,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loopback_only")]

REPO = "capwatch-test/tiny-vit-gpt2"
COMMIT = hashlib.sha1(b"first commit").hexdigest()
COMMIT2 = hashlib.sha1(b"second commit").hexdigest()


def _random(n: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


#: Several of the store's 1 MiB read blocks, so that a cut lands in the middle of a multi-block body.
BIG = 3 * 1024 * 1024 + 12345


def _repo_files(seed: int = 0, *, big: bool = False) -> dict[str, bytes]:
    config = {"model_type": "vision-encoder-decoder", "decoder_start_token_id": 7, "pad_token_id": 7,
              "decoder": {"model_type": "gpt2", "bos_token_id": 7, "eos_token_id": 7}}
    generation = {"num_beams": 2, "max_length": 9, "bos_token_id": 7, "eos_token_id": 7, "decoder_start_token_id": 7}
    preprocessor = {"do_resize": True, "size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5]}
    tokenizer = {"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}}
    return {
        "config.json": json.dumps(config).encode(),
        "generation_config.json": json.dumps(generation).encode(),
        "preprocessor_config.json": json.dumps(preprocessor).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
        "tokenizer_config.json": b'{"model_max_length": 1024}',
        "onnx/encoder_model.onnx": _random(300_000, seed + 1),
        "onnx/decoder_model_merged.onnx": _random(200_000, seed + 2),
        "onnx/encoder_model_quantized.onnx": _random(120_000, seed + 3),
        "onnx/decoder_model_merged_quantized.onnx": _random(BIG if big else 90_000, seed + 4),
    }


def _spec(revision: str = COMMIT, *, name: str = "tiny", repo: str = REPO,
          int8_pins: dict[str, tuple[int, str]] | None = None) -> ModelSpec:
    shared = (FileSpec("config.json"), FileSpec("generation_config.json"), FileSpec("preprocessor_config.json"),
              FileSpec("tokenizer.json"), FileSpec("tokenizer_config.json", optional=True))
    return ModelSpec(
        name=name, repo=repo, revision=revision, family="vision-encoder-decoder", description="tiny test model",
        licence="MIT", shared_files=shared,
        precisions=(PrecisionSpec("int8", graph_files("vision-encoder-decoder", "int8", int8_pins), 1),
                    PrecisionSpec("fp32", graph_files("vision-encoder-decoder", "fp32"), 1)),
        default_precision="int8", default=True,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_commit(REPO, COMMIT, _repo_files())
        yield server


def _assert_one_line(exc: CapwatchError) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def _marker(model_dir: Path, precision: str) -> Path:
    return model_dir / ".capwatch" / f"{precision}.json"


# --------------------------------------------------------------------------------------------------------------


def test_pull_downloads_every_file_of_the_precision_and_marks_it_complete(hub: FakeHub, env: dict[str, str]) -> None:
    calls: list[tuple[str, int, int]] = []
    resolved = pull("tiny", "int8", env, endpoint=hub.url, progress=lambda *a: calls.append(a),
                    registry=[_spec()])
    files = _repo_files()
    assert resolved.dir == models_root(env) / "tiny" / COMMIT
    assert (resolved.model_id, resolved.revision, resolved.precision, resolved.name) == (REPO, COMMIT, "int8", "tiny")
    for path in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "onnx/encoder_model_quantized.onnx",
                 "onnx/decoder_model_merged_quantized.onnx"):
        assert (resolved.dir / path).read_bytes() == files[path]
    assert not (resolved.dir / "onnx/encoder_model.onnx").exists()  # fp32 was not asked for
    marker = json.loads(_marker(resolved.dir, "int8").read_text())
    assert marker["commit"] == COMMIT and marker["repo"] == REPO
    recorded = {f["path"]: f["sha256"] for f in marker["files"]}
    assert recorded["onnx/encoder_model_quantized.onnx"] == sha256(files["onnx/encoder_model_quantized.onnx"])
    assert not (models_root(env) / "tiny" / ".staging").exists()
    # progress: a start and an end call per file, with the real size
    assert ("onnx/encoder_model_quantized.onnx", 0, 120_000) in calls
    assert ("onnx/encoder_model_quantized.onnx", 120_000, 120_000) in calls
    # the cached copy is what resolve_model hands out, without any network
    before = len(hub.requests)
    assert resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[_spec()]) == resolved
    assert pull("tiny", None, env, endpoint=hub.url, registry=[_spec()]) == resolved  # pinned + complete
    assert len(hub.requests) == before


def test_cut_connection_is_resumed_with_a_range_request(env: dict[str, str]) -> None:
    files = _repo_files(big=True)
    data = files["onnx/decoder_model_merged_quantized.onnx"]
    with FakeHub() as hub:
        hub.add_commit(REPO, COMMIT, files)
        hub.cut_next(data, times=1)
        resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert (resolved.dir / "onnx/decoder_model_merged_quantized.onnx").read_bytes() == data
    digest = sha256(data)
    gets = [r for r in hub.requests if r.method == "GET" and r.path == f"/cdn/{digest}"]
    assert len(gets) == 2
    assert gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    assert int(gets[1].range[len("bytes="):].split("-")[0]) > 0  # continued, not restarted


def test_partial_download_survives_a_failed_pull_and_the_next_pull_resumes_it(env: dict[str, str]) -> None:
    files = _repo_files(big=True)
    data = files["onnx/decoder_model_merged_quantized.onnx"]
    with FakeHub() as hub:
        hub.add_commit(REPO, COMMIT, files)
        _fail_then_resume(hub, env, data)


def _fail_then_resume(hub: FakeHub, env: dict[str, str], data: bytes) -> None:
    hub.cut_next(data, times=50)  # every attempt of this pull dies before the end of the body
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    text = _assert_one_line(info.value)
    assert "capwatch models pull tiny" in text and "--model DIR" in text
    model_dir = models_root(env) / "tiny" / COMMIT
    assert not _marker(model_dir, "int8").exists()
    with pytest.raises(ModelError):
        resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[_spec()])
    hub.cut_next(data, times=0)
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert (resolved.dir / "onnx/decoder_model_merged_quantized.onnx").read_bytes() == data
    last_get = [r for r in hub.requests if r.method == "GET" and r.path == f"/cdn/{sha256(data)}"][-1]
    assert last_get.range is not None and not last_get.range.startswith("bytes=0-")


def test_wrong_checksum_is_rejected_deleted_and_nothing_is_cached(hub: FakeHub, env: dict[str, str]) -> None:
    data = _repo_files()["onnx/encoder_model_quantized.onnx"]
    hub.corrupt(data, served=b"\0" * len(data))
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    text = _assert_one_line(info.value)
    assert "checksum mismatch" in text and "onnx/encoder_model_quantized.onnx" in text
    home = models_root(env) / "tiny"
    assert not (home / COMMIT / "onnx/encoder_model_quantized.onnx").exists()
    assert not (home / ".staging").exists()
    assert not _marker(home / COMMIT, "int8").exists()
    leftovers = [p for p in home.rglob("*") if p.is_file() and p.read_bytes() == b"\0" * len(data)]
    assert leftovers == []
    with pytest.raises(ModelError):
        resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[_spec()])


def test_small_file_is_checked_against_the_git_blob_sha1_the_hub_reports(hub: FakeHub, env: dict[str, str]) -> None:
    hub.corrupt_file(REPO, "config.json", served=b'{"model_type": "evil-twin-of-the-config"}')
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert "config.json" in _assert_one_line(info.value)
    assert not (models_root(env) / "tiny" / COMMIT / "config.json").exists()


def test_registry_pin_that_disagrees_with_the_hub_stops_before_downloading(hub: FakeHub, env: dict[str, str]) -> None:
    path = "onnx/encoder_model_quantized.onnx"
    spec = _spec(int8_pins={path: (120_000, "0" * 64)})
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[spec])
    assert "registry pins" in _assert_one_line(info.value)
    assert hub.count("GET", f"/cdn/{sha256(_repo_files()[path])}") == 0


def test_registry_pin_that_matches_is_accepted(hub: FakeHub, env: dict[str, str]) -> None:
    path = "onnx/encoder_model_quantized.onnx"
    data = _repo_files()[path]
    spec = _spec(int8_pins={path: (len(data), sha256(data))})
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[spec])
    assert (resolved.dir / path).read_bytes() == data


def test_missing_file_is_a_clean_error_naming_repo_file_and_revision(env: dict[str, str]) -> None:
    files = _repo_files()
    del files["onnx/decoder_model_merged_quantized.onnx"]
    with FakeHub() as hub:
        hub.add_commit(REPO, COMMIT, files)
        with pytest.raises(ModelError) as info:
            pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    text = _assert_one_line(info.value)
    assert REPO in text and "onnx/decoder_model_merged_quantized.onnx" in text and COMMIT[:12] in text
    assert "404" in text
    assert not _marker(models_root(env) / "tiny" / COMMIT, "int8").exists()


def test_unknown_repository_and_revision_are_clean_errors(hub: FakeHub, env: dict[str, str]) -> None:
    with pytest.raises(ModelError) as info:
        pull("ghost", "int8", env, endpoint=hub.url, registry=[_spec(name="ghost", repo="capwatch-test/ghost")])
    assert "capwatch-test/ghost" in _assert_one_line(info.value)
    other = hashlib.sha1(b"no such commit").hexdigest()
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec(other)])
    text = _assert_one_line(info.value)
    assert "revision" in text and other in text


def test_optional_file_absent_from_the_repository_does_not_fail_the_pull(env: dict[str, str]) -> None:
    files = _repo_files()
    del files["tokenizer_config.json"]
    with FakeHub() as hub:
        hub.add_commit(REPO, COMMIT, files)
        resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert not (resolved.dir / "tokenizer_config.json").exists()
    assert resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[_spec()]).dir == resolved.dir


def test_offline_mode_never_touches_the_network(hub: FakeHub, env: dict[str, str]) -> None:
    offline = {**env, "CAPWATCH_OFFLINE": "1", "HF_ENDPOINT": hub.url}
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", offline, endpoint=hub.url, registry=[_spec()])
    assert "offline" in _assert_one_line(info.value)
    with pytest.raises(ModelError):
        resolve_model(ModelConfig(name="tiny", precision="int8"), offline, download=True, registry=[_spec()])
    assert hub.requests == []
    # once cached, offline use works and still makes no request
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    seen = len(hub.requests)
    assert resolve_model(ModelConfig(name="tiny", precision="int8"), offline, download=True,
                         registry=[_spec()]) == resolved
    assert pull("tiny", "int8", offline, endpoint=hub.url, registry=[_spec()]) == resolved
    assert len(hub.requests) == seen


def test_no_network_is_one_line_saying_how_to_get_the_model(env: dict[str, str]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ModelError) as info:
        pull("tiny", "int8", env, endpoint=f"http://127.0.0.1:{port}", registry=[_spec()])
    text = _assert_one_line(info.value)
    assert "capwatch models pull tiny" in text and str(models_root(env)) in text and "--model DIR" in text


def test_resolve_model_download_pulls_when_not_cached(hub: FakeHub, env: dict[str, str]) -> None:
    with_endpoint = {**env, "HF_ENDPOINT": hub.url}
    resolved = resolve_model(ModelConfig(name="tiny", precision="int8"), with_endpoint, download=True,
                             registry=[_spec()])
    assert _marker(resolved.dir, "int8").is_file()


def test_resolve_model_not_cached_error_is_one_line_with_the_fix(env: dict[str, str]) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(name="tiny", precision="fp32"), env, registry=[_spec()])
    text = _assert_one_line(info.value)
    assert "capwatch models pull tiny --precision fp32" in text and "--model DIR" in text
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(name="tiny", precision="fp16"), env, registry=[_spec()])
    assert "fp16" in _assert_one_line(info.value)
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(name="nope"), env, registry=[_spec()])
    assert "tiny" in _assert_one_line(info.value)


def test_resolve_model_uses_a_local_directory_as_is(tmp_path: Path, env: dict[str, str]) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    resolved = resolve_model(ModelConfig(dir=model_dir, precision="fp32"), env)
    assert (resolved.dir, resolved.model_id, resolved.revision, resolved.name) == (model_dir, "my-model", None, None)
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(dir=tmp_path / "missing"), env)
    assert "does not exist" in _assert_one_line(info.value)


def test_copied_cache_directory_keeps_repo_and_commit_when_used_as_model_dir(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    copied = resolve_model(ModelConfig(dir=resolved.dir, precision="int8"), env)
    assert (copied.model_id, copied.revision) == (REPO, COMMIT)


def test_precision_with_a_missing_file_is_not_used(hub: FakeHub, env: dict[str, str]) -> None:
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    (resolved.dir / "onnx/decoder_model_merged_quantized.onnx").unlink()
    with pytest.raises(ModelError):
        resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[_spec()])
    # pulling again repairs it, fetching only what is missing
    before = len(hub.requests)
    pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    data = _repo_files()["onnx/decoder_model_merged_quantized.onnx"]
    fetched = {r.path for r in hub.requests[before:] if r.method == "GET"}
    assert fetched == {f"/{REPO}/resolve/{COMMIT}/onnx/decoder_model_merged_quantized.onnx", f"/cdn/{sha256(data)}"}
    assert resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[_spec()]).dir == resolved.dir


def test_second_precision_reuses_verified_shared_files(hub: FakeHub, env: dict[str, str]) -> None:
    pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    config_gets = hub.count("GET", f"/{REPO}/resolve/{COMMIT}/config.json")
    resolved = pull("tiny", "fp32", env, endpoint=hub.url, registry=[_spec()])
    assert hub.count("GET", f"/{REPO}/resolve/{COMMIT}/config.json") == config_gets
    assert (resolved.dir / "onnx/encoder_model.onnx").read_bytes() == _repo_files()["onnx/encoder_model.onnx"]
    statuses = list_models(env, registry=[_spec()])
    assert statuses[0].cached_precisions == ("int8", "fp32")


def test_branch_revision_is_stored_under_the_commit_it_resolved_to(hub: FakeHub, env: dict[str, str]) -> None:
    spec = _spec("main")
    first = pull("tiny", "int8", env, endpoint=hub.url, registry=[spec])
    assert first.dir.name == COMMIT and first.revision == COMMIT
    hub.add_commit(REPO, COMMIT2, _repo_files(seed=10))  # main moves on
    second = pull("tiny", "int8", env, endpoint=hub.url, registry=[spec])
    assert second.dir.name == COMMIT2
    assert (second.dir / "onnx/encoder_model_quantized.onnx").read_bytes() == _repo_files(10)[
        "onnx/encoder_model_quantized.onnx"]
    assert resolve_model(ModelConfig(name="tiny", precision="int8"), env, registry=[spec]).dir == second.dir


def test_list_models_reports_cached_precisions_and_bytes(hub: FakeHub, env: dict[str, str]) -> None:
    other = _spec(name="other", repo="capwatch-test/other")
    assert [s.cached_precisions for s in list_models(env, registry=[_spec(), other])] == [(), ()]
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    tiny, untouched = list_models(env, registry=[_spec(), other])
    assert (tiny.name, tiny.repo, tiny.family, tiny.default) == ("tiny", REPO, "vision-encoder-decoder", True)
    assert tiny.cached_precisions == ("int8",)
    on_disk = sum(p.stat().st_size for p in resolved.dir.rglob("*") if p.is_file())
    assert tiny.bytes_on_disk >= on_disk > 200_000
    assert untouched.cached_precisions == () and untouched.bytes_on_disk == 0


def test_model_info_for_a_registry_name_and_for_a_directory(hub: FakeHub, env: dict[str, str]) -> None:
    bare = model_info("tiny", env, registry=[_spec()])
    assert bare.dir is None and bare.repo == REPO and bare.precisions == ()
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    info = model_info("tiny", env, registry=[_spec()])
    assert isinstance(info, ModelInfo)
    assert info.dir == resolved.dir and info.commit == COMMIT
    assert info.model_type == "vision-encoder-decoder" and info.family == "vision-encoder-decoder"
    (int8,) = info.precisions
    assert int8.precision == "int8" and int8.complete and int8.verified
    assert dict(int8.files) == {"onnx/decoder_model_merged_quantized.onnx": 90_000,
                                "onnx/encoder_model_quantized.onnx": 120_000}
    assert info.tokenizer == "tokenizer.json (BPE, byte-level)"
    assert dict(info.special_tokens) == {"bos_token_id": 7, "eos_token_id": 7, "pad_token_id": 7,
                                         "decoder_start_token_id": 7}
    assert info.image_size == (32, 32)
    assert dict(info.generation) == {"num_beams": 2, "max_length": 9}
    json.dumps(info.to_dict())  # JSON-ready for `models info --json`
    # any directory, e.g. a copy with an extra fp32 graph and no marker for it
    (resolved.dir / "onnx" / "encoder_model.onnx").write_bytes(b"x" * 10)
    by_dir = model_info(str(resolved.dir), env)
    fp32 = next(p for p in by_dir.precisions if p.precision == "fp32")
    assert not fp32.complete and not fp32.verified
    with pytest.raises(ModelError) as info_err:
        model_info(str(resolved.dir / "nope"), env, registry=[_spec()])
    assert "tiny" in _assert_one_line(info_err.value)


def test_model_info_reports_broken_json_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError) as info:
        model_info(str(tmp_path), env)
    assert "config.json" in _assert_one_line(info.value)


def test_cache_dir_comes_from_the_environment(tmp_path: Path) -> None:
    assert models_root({"CAPWATCH_CACHE_DIR": str(tmp_path / "c")}) == tmp_path / "c" / "models"
    assert os.sep in str(models_root({}))


def test_progress_is_reported_while_a_large_file_arrives(env: dict[str, str]) -> None:
    files = _repo_files(big=True)
    calls: list[tuple[str, int, int]] = []
    with FakeHub() as hub:
        hub.add_commit(REPO, COMMIT, files)
        pull("tiny", "int8", env, endpoint=hub.url, progress=lambda *a: calls.append(a), registry=[_spec()])
    done = [d for p, d, t in calls if p == "onnx/decoder_model_merged_quantized.onnx" and t == BIG]
    assert done[0] == 0 and done[-1] == BIG
    assert len(done) >= 4  # some calls while the body was still arriving, not just start and end
    assert done == sorted(done)


def test_server_that_ignores_range_still_yields_a_correct_file(env: dict[str, str]) -> None:
    files = _repo_files(big=True)
    data = files["onnx/decoder_model_merged_quantized.onnx"]
    with FakeHub(honour_range=False) as hub:
        hub.add_commit(REPO, COMMIT, files)
        hub.cut_next(data, times=1)
        resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
        assert any(hub.ranges())  # it did ask to resume ...
    assert (resolved.dir / "onnx/decoder_model_merged_quantized.onnx").read_bytes() == data  # ... and coped


def test_token_goes_to_the_hub_but_never_to_the_cdn(env: dict[str, str]) -> None:
    with FakeHub() as cdn, FakeHub(cdn=cdn) as hub:
        hub.add_commit(REPO, COMMIT, _repo_files())
        pull("tiny", "int8", {**env, "HF_TOKEN": "hf_secret"}, endpoint=hub.url, registry=[_spec()])
        assert hub.requests and all(r.authorization == "Bearer hf_secret" for r in hub.requests)
        assert cdn.count("GET", "/cdn/") == 2
        assert all(r.authorization is None for r in cdn.requests)


def test_server_errors_are_retried(hub: FakeHub, env: dict[str, str]) -> None:
    hub.fail_next(503, times=2)
    resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert _marker(resolved.dir, "int8").is_file()
    hub.fail_next(503, times=50)
    with pytest.raises(ModelError) as info:
        pull("tiny", "fp32", env, endpoint=hub.url, registry=[_spec()])
    assert "HTTP 503" in _assert_one_line(info.value)


def test_model_info_reads_a_florence_layout(tmp_path: Path, env: dict[str, str]) -> None:
    config = {"model_type": "florence2", "text_config": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                                                          "decoder_start_token_id": 2}}
    generation = {"num_beams": 3, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2,
                  "max_length": 1025, "early_stopping": True}
    preprocessor = {"size": {"height": 768, "width": 768},
                    "task_prompts_without_inputs": {"<CAPTION>": "What does the image describe?"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    for graph in ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged"):
        (onnx / f"{graph}_fp16.onnx").write_bytes(b"1" * 10)
        (onnx / f"{graph}_q4.onnx").write_bytes(b"1" * 5)  # a variant capwatch does not run: not listed
    (onnx / "vision_encoder_quantized.onnx").write_bytes(b"1" * 7)  # int8 present but incomplete
    info = model_info(str(tmp_path), env)
    assert (info.name, info.family, info.model_type, info.dir) == (None, "florence2", "florence2", tmp_path)
    assert {p.precision: (p.complete, p.bytes) for p in info.precisions} == {"fp16": (True, 40), "int8": (False, 7)}
    assert dict(info.special_tokens) == {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                                         "decoder_start_token_id": 2, "forced_bos_token_id": 0,
                                         "forced_eos_token_id": 2}
    assert info.image_size == (768, 768)
    assert dict(info.generation)["num_beams"] == 3 and dict(info.generation)["early_stopping"] is True
    assert dict(info.task_prompts) == {"<CAPTION>": "What does the image describe?"}
    assert info.tokenizer == "vocab.json + merges.txt (BPE)"


def test_a_pulled_model_captions_exactly_like_its_source_directory(env: dict[str, str]) -> None:
    """End to end: the engine's tiny fixture model served by the fake hub, pulled, then opened by the engine."""
    np = pytest.importorskip("numpy")
    from capwatch.models.captioner import open_captioner

    source = Path(__file__).parent / "fixtures" / "models" / "vit-gpt2-tiny-greedy"
    names = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
             "onnx/encoder_model_quantized.onnx", "onnx/decoder_model_merged_quantized.onnx"]
    files = {name: (source / name).read_bytes() for name in names}
    with FakeHub() as hub:
        hub.add_commit(REPO, COMMIT, files)  # no tokenizer_config.json: optional
        resolved = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    pixels = np.stack(list(np.load(source / "pixel_values.npz").values()))
    config = ModelConfig(dir=resolved.dir, precision="int8", threads=1)
    with open_captioner(resolved.dir, config, model_id=resolved.model_id, revision=resolved.revision) as pulled, \
            open_captioner(source, ModelConfig(dir=source, precision="int8", threads=1)) as original:
        assert [r.token_ids for r in pulled.caption_pixels(pixels)] == [
            r.token_ids for r in original.caption_pixels(pixels)]


def test_a_per_graph_precision_pulls_each_graph_at_its_own_precision(hub: FakeHub, env: dict[str, str]) -> None:
    files = _repo_files()
    config = ModelConfig(name="tiny", precision="int8", graph_precision={"encoder_model": "fp32"})
    pulled = pull("tiny", "int8+encoder_model=fp32", env, endpoint=hub.url, registry=[_spec()])
    assert pulled.precision == "int8+encoder_model=fp32"
    assert (pulled.dir / "onnx/encoder_model.onnx").read_bytes() == files["onnx/encoder_model.onnx"]
    assert (pulled.dir / "onnx/decoder_model_merged_quantized.onnx").read_bytes() == \
        files["onnx/decoder_model_merged_quantized.onnx"]
    assert not (pulled.dir / "onnx/encoder_model_quantized.onnx").exists()
    assert not (pulled.dir / "onnx/decoder_model_merged.onnx").exists()
    assert _marker(pulled.dir, "int8+encoder_model=fp32").is_file()
    before = len(hub.requests)
    assert resolve_model(config, env, registry=[_spec()]) == pulled
    assert len(hub.requests) == before
    # the plain int8 set is another precision: only its missing graph is downloaded
    int8 = pull("tiny", "int8", env, endpoint=hub.url, registry=[_spec()])
    assert hub.count("GET", f"/{REPO}/resolve/{COMMIT}/onnx/decoder_model_merged_quantized.onnx") == 1
    assert (int8.dir / "onnx/encoder_model_quantized.onnx").is_file()


def test_auto_precision_takes_the_registry_models_default_mix(hub: FakeHub, env: dict[str, str]) -> None:
    spec = dataclasses.replace(_spec(), default_graph_precision=(("encoder_model", "fp32"),))
    env = {**env, "HF_ENDPOINT": hub.url}
    resolved = resolve_model(ModelConfig(name="tiny"), env, download=True, registry=[spec])
    assert resolved.precision == "int8+encoder_model=fp32"
    assert (resolved.dir / "onnx/encoder_model.onnx").is_file()
    # a configured graph_precision replaces the default mix
    own = resolve_model(ModelConfig(name="tiny", graph_precision={"decoder_model_merged": "fp32"}), env,
                        download=True, registry=[spec])
    assert own.precision == "int8+decoder_model_merged=fp32"


def test_a_graph_the_model_does_not_have_is_a_one_line_error(env: dict[str, str]) -> None:
    config = ModelConfig(name="tiny", graph_precision={"vision_encoder": "fp32"})
    with pytest.raises(ModelError) as caught:
        resolve_model(config, env, registry=[_spec()])
    assert "has no graph 'vision_encoder'" in _assert_one_line(caught.value)
    assert "encoder_model" in str(caught.value)
