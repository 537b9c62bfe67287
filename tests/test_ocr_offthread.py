"""rapidocr beside the model runs on a thread of its own (``capwatch-ocr``), fed from the decode-ahead side, and on
the Dask workers of a cluster scan: the text is the same wherever it was read, one file's OCR failure costs that
file's text alone, and with OCR off there is no OCR thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from capwatch.config import Config, ModelConfig, OcrConfig
from capwatch.library.index import Index
from capwatch.library.process import Processor
from capwatch.metadata import read_snapshot
from capwatch.models.captioner import open_captioner
from capwatch.text.rapid import RapidOcrReader
from capwatch.text.reader import TextReader
from capwatch.text.threaded import THREAD_NAME, OffThreadReader
from tests.conftest import CliRunner

pytest.importorskip("rapidocr")

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
PHOTOS = FIXTURES / "photos"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")

pytestmark = [pytest.mark.skipif(not FONT.is_file(), reason="needs fonts-dejavu-core (.ci/run installs it)"),
              pytest.mark.timeout(240)]

SIGNS = {"bakery.jpg": ("CORNER BAKERY", "OPEN 7-19"), "exit.png": ("EXIT 12", "KEEP LEFT"),
         "label.jpg": ("Best before", "2027-03-14")}


def _sign(path: Path, lines: tuple[str, ...], photo: str = "coffee") -> Path:
    with Image.open(PHOTOS / f"{photo}.jpg") as src:
        img = src.convert("RGB").resize((900, 600))
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 40, 860, 300), fill=(250, 245, 230), outline=(40, 40, 40), width=6)
    for number, line in enumerate(lines):
        draw.text((70, 60 + 110 * number), line, fill=(20, 20, 20), font=ImageFont.truetype(str(FONT), 80))
    img.save(path, quality=92) if path.suffix == ".jpg" else img.save(path)
    return path


def _thin(path: Path) -> Path:
    """A real image rapidocr cannot read (its detector's resize fails on 8 px of height) while the captioner can."""
    Image.new("RGB", (4000, 8), (200, 30, 30)).save(path)
    return path


def _settle(paths: list[Path]) -> None:
    # A file changed just now is not read ahead (its stat could miss a change within the same clock tick).
    past = time.time() - 5
    for path in paths:
        os.utime(path, (past, past))
    time.sleep(0.1)


def _library(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [_sign(root / name, lines) for name, lines in SIGNS.items()]
    shutil.copy(PHOTOS / "coffee.jpg", root / "plain.jpg")
    paths.append(root / "plain.jpg")
    _settle(paths)
    return paths


def _config(engine: str) -> Config:
    return Config(model=ModelConfig(dir=MODEL, precision="fp32", threads=1, batch_size=2),
                  ocr=OcrConfig(engine=engine))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The text rapidocr reads in each file when asked directly, on this thread: what every other way must give."""
    root = tmp_path_factory.mktemp("direct")
    reader = RapidOcrReader()
    try:
        return {path.name: reader.read_file(path) for path in _library(root)}
    finally:
        reader.close()


def _ocr_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


class _Watched(RapidOcrReader):
    """The real rapidocr engine, noting the thread each read ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def read_file(self, path: Path) -> str:
        self.threads.append(threading.current_thread().name)
        return super().read_file(path)


def _run(tmp_path: Path, paths: list[Path], *, ahead: bool, watched: _Watched | None = None
         ) -> tuple[dict[str, str | None], Processor]:
    config = _config("rapidocr")
    with Index.open(tmp_path / f"ahead-{ahead}.db") as index:
        processor = Processor(config, index, open_captioner(MODEL, config.model), dry_run=True)
        if watched is not None:
            assert processor.text_reader is not None
            processor.text_reader = OffThreadReader(watched)
        try:
            if ahead:
                processor.decode_ahead(paths)
            outcomes = processor.process_batch(paths)
            assert _ocr_threads(), "no OCR thread while rapidocr reads"
        finally:
            processor.close()
    assert all(o.error is None and o.caption for o in outcomes), outcomes
    return {o.path.name: o.text for o in outcomes}, processor


def test_text_read_ahead_on_the_ocr_thread_equals_text_read_directly(tmp_path: Path, direct: dict[str, str]) -> None:
    paths = _library(tmp_path / "lib")
    watched = _Watched()
    texts, processor = _run(tmp_path, paths, ahead=True, watched=watched)
    assert texts == direct
    assert "BAKERY" in direct["bakery.jpg"] and "EXIT" in direct["exit.png"] and direct["plain.jpg"] == ""
    # Every read ran on the OCR thread, ahead of the model's turn: none on the thread that runs the model.
    assert processor.text_read_ahead == len(paths)
    assert watched.threads and all(name.startswith(THREAD_NAME) for name in watched.threads), watched.threads
    assert threading.current_thread().name not in watched.threads
    assert not _ocr_threads(), "the OCR thread outlived Processor.close()"


def test_text_read_in_turn_without_decode_ahead_equals_text_read_directly(tmp_path: Path,
                                                                          direct: dict[str, str]) -> None:
    paths = _library(tmp_path / "lib")
    watched = _Watched()
    texts, _ = _run(tmp_path, paths, ahead=False, watched=watched)
    assert texts == direct
    assert all(name.startswith(THREAD_NAME) for name in watched.threads), watched.threads


def test_a_file_changed_after_its_text_was_read_ahead_is_read_again(tmp_path: Path, direct: dict[str, str]) -> None:
    paths = _library(tmp_path / "lib")
    config = _config("rapidocr")
    with Index.open(tmp_path / "i.db") as index:
        processor = Processor(config, index, open_captioner(MODEL, config.model), dry_run=True)
        try:
            processor.decode_ahead(paths)
            assert processor.text_reader is not None
            processor.text_reader.submit(lambda engine: None).result()  # the reads queued ahead are done
            _sign(paths[0], ("NEW SIGN",))  # another program replaces the picture meanwhile
            outcomes = processor.process_batch(paths)
        finally:
            processor.close()
    assert outcomes[0].text is not None and "NEW" in outcomes[0].text and "BAKERY" not in outcomes[0].text
    assert [o.text for o in outcomes[1:]] == [direct[p.name] for p in paths[1:]]


def test_a_failing_ocr_on_one_file_does_not_stop_captioning(tmp_path: Path, direct: dict[str, str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    paths = _library(tmp_path / "lib")
    thin = _thin(tmp_path / "lib" / "thin.png")
    _settle([thin])
    with pytest.raises(Exception, match="OCR failed"):
        RapidOcrReader().read_file(thin)  # the failure is rapidocr's own, on a real file
    texts, _ = _run(tmp_path, [paths[0], thin, *paths[1:]], ahead=True)
    assert texts.pop("thin.png") is None
    assert texts == direct
    assert any("no text read" in r.getMessage() and "thin.png" in r.getMessage() for r in caplog.records)


def test_ocr_off_means_no_ocr_thread(tmp_path: Path) -> None:
    paths = _library(tmp_path / "lib")
    config = _config("off")
    with Index.open(tmp_path / "i.db") as index:
        processor = Processor(config, index, open_captioner(MODEL, config.model), dry_run=True)
        try:
            processor.decode_ahead(paths)
            outcomes = processor.process_batch(paths)
            assert processor.text_reader is None and not _ocr_threads()
        finally:
            processor.close()
    assert all(o.caption and o.text is None for o in outcomes)


def test_the_daemon_pipeline_reads_text_on_the_ocr_thread_from_the_decode_ahead_side(
        tmp_path: Path, direct: dict[str, str]) -> None:
    from capwatch.daemon.pipeline import JobQueue, Pipeline

    paths = _library(tmp_path / "lib")
    watched = _Watched()
    made: list[Processor] = []

    def make_processor() -> Processor:
        config = _config("rapidocr")
        processor = Processor(config, Index.open(tmp_path / "i.db"), open_captioner(MODEL, config.model))
        processor.text_reader = OffThreadReader(watched)
        made.append(processor)
        return processor

    queue = JobQueue(64)
    pipeline = Pipeline(queue, make_processor=make_processor, open_index=lambda: Index.open(tmp_path / "i.db"),
                        batch_size=2, batch_wait_seconds=0.0)
    stop = threading.Event()
    for path in paths:
        assert queue.put_backfill(path, stop)
    pipeline.start()
    try:
        deadline = time.monotonic() + 120
        while pipeline.stats().processed < len(paths) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pipeline.stop()
    assert pipeline.stats().processed == len(paths) and pipeline.stats().errors == 0
    # Every text was queued from the prepare thread's decode-ahead call and read on the OCR thread; the model
    # thread (capwatch-model) read none.
    assert made[0].text_read_ahead == len(paths)
    assert watched.threads and all(name.startswith(THREAD_NAME) for name in watched.threads), watched.threads
    assert not _ocr_threads(), "the OCR thread outlived the pipeline"
    with Index.open(tmp_path / "i.db", readonly=True) as index:
        assert {p.name: getattr(index.get(p), "ocr_text", None) for p in paths} == direct


def test_texts_read_ahead_are_bounded_like_decodes(tmp_path: Path) -> None:
    paths = [_sign(tmp_path / f"s{i:02d}.jpg", (f"SIGN {i}",)) for i in range(12)]
    _settle(paths)
    config = _config("rapidocr")  # batch_size 2: at most 8 decodes and 8 texts held
    with Index.open(tmp_path / "i.db") as index:
        processor = Processor(config, index, open_captioner(MODEL, config.model), dry_run=True)
        try:
            processor.decode_ahead(paths)
            assert len(processor.ahead.texts) == len(processor.ahead.pending) == 8
            outcomes = processor.process_batch(paths)
            assert processor.ahead.texts == {}
        finally:
            processor.close()
    assert [o.text for o in outcomes] == [f"SIGN {i}" for i in range(12)]


def test_off_thread_reader_runs_direct_reads_on_its_thread_and_stops_with_close() -> None:
    seen: list[str] = []

    class Engine(TextReader):
        name = "probe"

        def _read(self, image: Image.Image) -> str:
            seen.append(threading.current_thread().name)
            return f"{image.size[0]}x{image.size[1]}"

        def close(self) -> None:
            seen.append("closed")

    reader = OffThreadReader(Engine(4_000_000))
    assert not _ocr_threads()  # no thread before the first read
    assert reader.read(Image.new("RGB", (40, 30))) == "40x30"
    assert seen[0].startswith(THREAD_NAME) and _ocr_threads()
    reader.close()
    assert seen[-1] == "closed" and not _ocr_threads()


# -- a cluster scan: the workers read the text ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0", env={"CAPWATCH_OFFLINE": "1"}) as local:
        yield str(local.scheduler_address)


def test_text_read_on_the_cluster_workers_equals_text_read_locally_and_the_coordinator_reads_none(
        cluster: str, tmp_path: Path, direct: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    from capwatch.cluster import caption_on_cluster, connect, install, model_request

    paths = _library(tmp_path / "lib")
    thin = _thin(tmp_path / "lib" / "thin.png")
    config = _config("rapidocr")
    outcomes: list[Any] = []
    with Index.open(tmp_path / "i.db") as index:
        captioner = open_captioner(MODEL, config.model)
        processor = Processor(config, index, captioner)
        try:
            with connect(cluster, timeout=10) as client:
                request = model_request(captioner, config.model, processor.describe, ocr=config.ocr)
                assert request.ocr == config.ocr
                install(client, request, wait_seconds=30)
                caption_on_cluster(client, processor, [*paths, thin], skip_captioned=True, batches_per_worker=2,
                                   on_outcomes=lambda done, run: outcomes.extend(done))
            # The coordinator never read a text: its OCR thread (started by the first read) never started.
            assert not _ocr_threads()
        finally:
            processor.close()
            captioner.close()
        rows = {p.name: index.get(p) for p in [*paths, thin]}
    texts = {o.path.name: o.text for o in outcomes}
    assert all(o.error is None and o.caption for o in outcomes), outcomes
    assert texts.pop("thin.png") is None  # captioned; its OCR failure on the worker costs its text alone
    assert texts == direct
    assert {name: row.ocr_text for name, row in rows.items() if row is not None and name != "thin.png"} == direct
    assert any("no text read" in r.getMessage() and str(thin) in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def _sign_video(path: Path, work: Path) -> Path:
    """An H.264 video of three signs one after the other (1.5 s each): its chosen frames hold different text."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("needs ffmpeg (.ci/run installs it)")
    scenes = [_sign(work / f"scene{n}.png", lines, photo)
              for n, (lines, photo) in enumerate(((("PLATFORM 9", "NORTH"), "coffee"),
                                                  (("HARBOUR CAFE", "FISH 12"), "astronaut"),
                                                  (("MUSEUM", "EXIT 3"), "coffee")))]
    cmd = [ffmpeg, "-v", "error", "-y"]
    for scene in scenes:
        cmd += ["-loop", "1", "-framerate", "24", "-t", "1.5", "-i", str(scene)]
    inputs = "".join(f"[{n}]" for n in range(len(scenes)))
    cmd += ["-filter_complex", f"{inputs}concat=n={len(scenes)}:v=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-g", "12", str(path)]
    subprocess.run(cmd, check=True, timeout=120)
    return path


def test_a_video_scanned_on_the_cluster_gets_the_text_of_a_local_scan_read_on_the_workers_alone(
        cluster: str, run_cli: CliRunner, tmp_path: Path) -> None:
    # The coordinator sends a video's chosen frames; the workers read the text in each of them (and in the photos)
    # and merge it as a local scan does. The coordinator never opens rapidocr: Python's own import log
    # (-X importtime) of the coordinator's process names no rapidocr module.
    pytest.importorskip("av")
    local = tmp_path / "local"
    local.mkdir()
    _sign_video(local / "signs.mp4", tmp_path)
    _sign(local / "bakery.jpg", SIGNS["bakery.jpg"])
    shutil.copy(PHOTOS / "coffee.jpg", local / "plain.jpg")
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    config = tmp_path / "config.toml"
    config.write_text('[model]\nbatch_size = 2\nthreads = 1\n\n[ocr]\nengine = "rapidocr"\n\n[cluster]\n'
                      "connect_timeout_seconds = 1\nworker_wait_seconds = 30\n")
    at_home = run_cli("--config", config, "--db", tmp_path / "local.db", "--model", MODEL, "scan", local,
                      timeout=240)
    on_cluster = run_cli("--config", config, "--db", tmp_path / "remote.db", "--model", MODEL, "scan", remote,
                         "--cluster", cluster, env={"PYTHONPROFILEIMPORTTIME": "1"}, timeout=240)
    assert at_home.code == on_cluster.code == 0, (at_home.err, on_cluster.err[-3000:])
    imported = [line.rsplit("|", 1)[-1].strip() for line in on_cluster.err.splitlines()
                if line.startswith("import time:")]
    assert "capwatch.cluster.coordinator" in imported  # the import log is there and covers the cluster run
    assert not [name for name in imported if name.split(".")[0] == "rapidocr"], "the coordinator imported rapidocr"

    def texts(db: Path, root: Path) -> dict[str, tuple[str | None, str | None, str | None]]:
        """Per file: caption, the text in the index, the text written into the file."""
        with Index.open(db, readonly=True) as index:
            return {os.path.relpath(r.path, root): (r.caption, r.ocr_text,
                                                    read_snapshot(Path(r.path)).metadata.ocr_text)
                    for r in index.iter_records(root)}

    want, got = texts(tmp_path / "local.db", local), texts(tmp_path / "remote.db", remote)
    assert got == want
    video_text = got["signs.mp4"][1]
    assert video_text is not None
    # Merged over the chosen frames: the text of more than one scene (the representative frame holds one).
    scenes_read = [words for words in ("PLATFORM", "HARBOUR", "MUSEUM") if words in video_text]
    assert len(scenes_read) >= 2, video_text
    assert "BAKERY" in (got["bakery.jpg"][1] or "") and got["plain.jpg"][1] == ""
