"""Decoding ahead (Processor.decode_ahead): the next batch is decoded while the model works, and a decode is used
only for the very file the model then captions."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from capwatch.config import Config, ModelConfig
from capwatch.daemon.pipeline import JobQueue, Pipeline
from capwatch.library.index import Index
from capwatch.library.outcomes import clean_caption
from capwatch.library.process import Processor
from capwatch.models.captioner import open_captioner

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
IMAGES = FIXTURES / "images"


def _processor(index: Index) -> Processor:
    config = Config(model=ModelConfig(dir=MODEL, precision="fp32", threads=1, batch_size=2))
    return Processor(config, index, open_captioner(MODEL, config.model), dry_run=True)


def _caption_of(image: Path, tmp_path: Path) -> str:
    with Index.open(tmp_path / "reference.db") as index:
        processor = _processor(index)
        try:
            outcome = processor.process([image])[0]
        finally:
            processor.close()
    assert outcome.caption
    return outcome.caption


def _settle(*paths: Path) -> None:
    # a file changed just now is not decoded ahead (its stat could miss a change in the same clock tick)
    past = time.time() - 5
    for path in paths:
        os.utime(path, (past, past))
    time.sleep(0.1)


def test_captions_with_decoding_ahead_equal_captions_without(tmp_path: Path) -> None:
    names = ["blobs.jpg", "checker.png", "gradient.jpg", "red.png", "oriented.jpg"]
    photos = []
    for name in names:
        shutil.copy(IMAGES / name, tmp_path / name)
        photos.append(tmp_path / name)
    _settle(*photos)
    want = [_caption_of(p, tmp_path) for p in photos]
    with Index.open(tmp_path / "i.db") as index:
        processor = _processor(index)
        try:
            processor.decode_ahead(photos)
            for path in photos:
                assert processor.ahead.pending[str(path)].result() is not None  # decoded ahead, on the decode thread
            got = [o.caption for o in processor.process(photos)]
            assert processor.ahead.pending == {}
        finally:
            processor.close()
    assert got == want
    assert len(set(want)) > 1  # the images give different captions: a mix-up would show


def _caption_after(photo: Path, tmp_path: Path, change: Callable[[], None]) -> str | None:
    """Decode ``photo`` ahead, let ``change`` alter the file, then caption it: the caption the processor writes."""
    with Index.open(tmp_path / "i.db") as index:
        processor = _processor(index)
        try:
            processor.decode_ahead([photo])
            assert processor.ahead.pending[str(photo)].result() is not None
            change()
            return processor.process([photo])[0].caption
        finally:
            processor.close()


def test_a_file_replaced_after_its_decode_is_captioned_as_it_is_now(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    shutil.copy(IMAGES / "checker.png", photo)
    other = tmp_path / "other.jpg"
    shutil.copy(IMAGES / "blobs.jpg", other)
    _settle(photo, other)
    old, new = _caption_of(photo, tmp_path), _caption_of(other, tmp_path)
    assert old != new
    # another program swaps in other content under the same name
    assert _caption_after(photo, tmp_path, lambda: os.replace(other, photo)) == new


def test_a_file_rewritten_in_place_after_its_decode_is_decoded_again(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    shutil.copy(IMAGES / "checker.png", photo)
    _settle(photo)
    new = _caption_of(IMAGES / "red.png", tmp_path)
    assert new != _caption_of(photo, tmp_path)
    st = photo.stat()

    def rewrite() -> None:
        photo.write_bytes((IMAGES / "red.png").read_bytes())  # same inode; mtime put back, as a careless tool might
        os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert _caption_after(photo, tmp_path, rewrite) == new


def test_a_file_changed_just_before_is_not_decoded_ahead(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        processor = _processor(index)
        try:
            # A file changed less than 50 ms before its decode (FileIdentity.settled's smallest margin) is not decoded
            # ahead. An attempt counts only when the whole round trip, from the change to the decode's answer, took
            # less than that (the read then certainly came within it); one slowed down by a busy machine (the model
            # loading, other tests) is tried again with a file changed anew.
            for attempt in range(50):
                photo = tmp_path / f"fresh-{attempt}.png"
                shutil.copy(IMAGES / "checker.png", photo)
                changed = os.stat(photo).st_ctime_ns
                processor.decode_ahead([photo])
                decoded = processor.ahead.pending[str(photo)].result()
                if time.time_ns() - changed < 50_000_000:
                    break
                processor.ahead.pending.pop(str(photo))
                assert decoded is None or decoded.identity.settled  # a decode made must come from a settled file
            else:
                raise AssertionError("no decode ahead answered within 50 ms of the file's change in 50 attempts")
            assert decoded is None
            outcome = processor.process([photo])[0]
        finally:
            processor.close()
    assert outcome.caption == clean_caption(outcome.caption or "")
    assert outcome.error is None


def test_the_daemon_pipeline_decodes_each_batch_while_the_model_works_on_the_one_before(tmp_path: Path) -> None:
    photos = []
    for i, name in enumerate(["blobs.jpg", "checker.png", "gradient.jpg", "red.png", "oriented.jpg", "gray.png"]):
        photos.append(tmp_path / f"{i}-{name}")
        shutil.copy(IMAGES / name, photos[-1])
    _settle(*photos)
    made: list[Processor] = []

    def make_processor() -> Processor:
        made.append(_processor(Index.open(tmp_path / "i.db")))
        return made[0]

    queue = JobQueue(64)
    pipeline = Pipeline(queue, make_processor=make_processor, open_index=lambda: Index.open(tmp_path / "i.db"),
                        batch_size=2, batch_wait_seconds=0.0)
    stop = threading.Event()
    for photo in photos:
        assert queue.put_backfill(photo, stop)
    pipeline.start()
    try:
        deadline = time.monotonic() + 60
        while pipeline.stats().processed < len(photos) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        pipeline.stop()
        made[0].close()
    assert pipeline.stats().processed == len(photos)
    # every batch after the first was handed over while the model still worked on the one before
    assert made[0].decoded_ahead >= 2
    assert made[0].ahead.pending == {}
