"""The job queue and pipeline: ordering, de-duplication, backpressure, in-flight parking, clean stops."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from capwatch.daemon.pipeline import JobQueue

A, B, C, D = (Path(f"/lib/{n}.jpg") for n in "abcd")


def test_live_jobs_are_taken_before_backfill() -> None:
    q = JobQueue(10)
    stop = threading.Event()
    assert q.put_backfill(A, stop)
    assert q.put_backfill(B, stop)
    assert q.put_live(C)
    assert q.take_batch(2, 0.0, stop) == [C, A]
    assert q.take_batch(2, 0.0, stop) == [B]


def test_a_path_is_queued_once_and_a_live_event_promotes_backfill() -> None:
    q = JobQueue(10)
    stop = threading.Event()
    q.put_backfill(A, stop)
    q.put_backfill(A, stop)
    q.put_backfill(B, stop)
    q.put_live(B)
    q.put_live(B)
    assert q.depth() == (1, 1, 0)
    assert q.take_batch(10, 0.0, stop) == [B, A]


def test_a_change_while_in_flight_is_parked_and_requeued_after_done() -> None:
    q = JobQueue(10)
    stop = threading.Event()
    q.put_live(A)
    assert q.take_batch(5, 0.0, stop) == [A]
    assert q.put_live(A)  # changed again (our own write, or the user's) while being processed
    assert len(q) == 0  # not taken twice at the same time
    q.done([A])
    assert q.take_batch(5, 0.0, stop) == [A]


def test_full_queue_refuses_live_and_blocks_backfill_until_there_is_room() -> None:
    q = JobQueue(2)
    stop = threading.Event()
    assert q.put_live(A) and q.put_live(B)
    assert q.put_live(C) is False
    assert q.free() == 0
    done = threading.Event()

    def producer() -> None:
        q.put_backfill(D, stop)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.3)  # blocked: backpressure instead of growing memory
    assert q.take_batch(1, 0.0, stop) == [A]
    assert done.wait(10)
    thread.join(10)
    assert q.take_batch(5, 0.0, stop) == [B, D]


def test_stop_releases_a_blocked_backfill_put_and_take() -> None:
    q = JobQueue(1)
    stop = threading.Event()
    q.put_live(A)
    q.take_batch(1, 0.0, stop)  # A in flight, queue empty
    q.put_live(B)  # full again
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(q.put_backfill(C, stop))),
    ]
    for t in threads:
        t.start()
    stop.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert results == [False]
    assert q.take_batch(1, 0.0, stop) == []


def test_take_batch_waits_for_the_batch_to_fill() -> None:
    q = JobQueue(10)
    stop = threading.Event()
    q.put_live(A)
    timer = threading.Timer(0.05, lambda: q.put_live(B))
    timer.start()
    batch = q.take_batch(2, 30.0, stop)  # returns as soon as the batch is full, far before the 30 s bound
    timer.join()
    assert batch == [A, B]


def test_a_lone_job_is_not_kept_waiting_for_a_batch_when_nothing_else_is_coming() -> None:
    q = JobQueue(10)
    stop = threading.Event()
    q.put_live(A)
    got: list[list[Path]] = []
    thread = threading.Thread(target=lambda: got.append(q.take_batch(8, 600.0, stop, lambda: False)))
    thread.start()
    thread.join(30)  # far below the 600 s batch wait: returned because nothing else was coming
    assert got == [[A]]


def test_discard_removes_a_waiting_path_only() -> None:
    q = JobQueue(10)
    stop = threading.Event()
    q.put_live(A)
    q.put_backfill(B, stop)
    assert q.discard(B) is True
    assert q.discard(C) is False
    assert q.take_batch(5, 0.0, stop) == [A]
    assert q.discard(A) is False  # in flight: not ours to drop
    assert q.is_busy(A)
    q.done([A])
    assert not q.is_busy(A)


def test_backfill_leaves_room_for_live_events() -> None:
    q = JobQueue(8)
    stop = threading.Event()
    for i in range(6):
        assert q.put_backfill(Path(f"/lib/b{i}.jpg"), stop)
    finished = threading.Event()
    thread = threading.Thread(target=lambda: (q.put_backfill(Path("/lib/b6.jpg"), stop), finished.set()))
    thread.start()
    assert not finished.wait(0.3)  # the last quarter is reserved for live events
    assert q.put_live(A) and q.put_live(B)
    assert q.take_batch(2, 0.0, stop) == [A, B]
    stop.set()
    thread.join(10)
    assert q.depth()[1] == 6


# -- the whole daemon with the tiny captioning model --------------------------------------------------------------

import shutil  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from daemon_helpers import IMAGES, MODELS, rows, wait_until, write_config  # noqa: E402

from capwatch.config import load_config  # noqa: E402
from capwatch.daemon.service import read_live_state, run_daemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    root = tmp_path / "photos"
    root.mkdir()
    db = tmp_path / "index.db"
    config = load_config(write_config(tmp_path / "config.toml", db=db, roots=[root],
                                      model_dir=MODELS / "vit-gpt2-tiny-greedy", settle=0.3))
    stop = threading.Event()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(run_daemon(config, None, stop_event=stop)), daemon=True)
    thread.start()
    wait_until(lambda: read_live_state(db) or not thread.is_alive(), what="daemon start")
    try:
        yield root, db
    finally:
        stop.set()
        thread.join(60)
    assert result == [0]


def _state(db: Path) -> dict[str, object]:
    return read_live_state(db) or {}


def _idle(db: Path) -> bool:
    """True once a live-state snapshot taken *after* this call started shows nothing left to do."""
    first = _state(db).get("updates", 0)

    def fresh_and_idle() -> bool:
        s = _state(db)
        return bool(s) and s["updates"] > first + 1 and s["queue"] == 0 and s["in_flight"] == 0 \
            and s["settling"] == 0

    return bool(wait_until(fresh_and_idle, what="an idle daemon"))


def test_a_dropped_image_is_captioned_written_and_searchable_once(daemon: tuple[Path, Path]) -> None:
    root, db = daemon
    shutil.copyfile(IMAGES / "blobs.jpg", root / "blobs.jpg")
    wait_until(lambda: rows(db).get(str(root / "blobs.jpg"), ("",))[0] == "captioned", what="captioned")
    caption = rows(db)[str(root / "blobs.jpg")][1]
    # Our own write comes back as file events; it must be recognised (same fingerprint), not captioned again.
    wait_until(lambda: _state(db).get("unchanged", 0) >= 1, what="own write recognised")
    _idle(db)
    assert _state(db)["captioned"] == 1
    written = subprocess.run(["exiftool", "-s3", "-XMP-dc:Description", str(root / "blobs.jpg")],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert written == caption
    from capwatch.library.index import Index
    from capwatch.library.search import make_filters, parse_query

    word = caption.split()[0]
    with Index.open(db) as index:
        hits = index.search(parse_query(word), make_filters())
    assert str(root / "blobs.jpg") in {h.path for h in hits}


def test_a_renamed_captioned_image_keeps_its_caption_without_a_new_run(daemon: tuple[Path, Path]) -> None:
    root, db = daemon
    shutil.copyfile(IMAGES / "gradient.jpg", root / "a.jpg")
    wait_until(lambda: rows(db).get(str(root / "a.jpg"), ("",))[0] == "captioned", what="captioned")
    _idle(db)
    before = rows(db)[str(root / "a.jpg")]
    (root / "a.jpg").rename(root / "b.jpg")
    wait_until(lambda: str(root / "b.jpg") in rows(db) and str(root / "a.jpg") not in rows(db), what="moved")
    _idle(db)
    assert rows(db)[str(root / "b.jpg")] == before
    assert _state(db)["captioned"] == 1


def test_a_file_replaced_while_waiting_is_processed_once_in_its_final_state(daemon: tuple[Path, Path]) -> None:
    root, db = daemon
    target = root / "photo.jpg"
    # A slow copy: first half, then (within the settle time) the rest replaced by a different image.
    data = (IMAGES / "blobs.jpg").read_bytes()
    with open(target, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        tmp = root / ".photo.jpg.Xy12Ab"  # rsync-style temp name, renamed over the half-written file
        shutil.copyfile(IMAGES / "gradient.jpg", tmp)
        os.replace(tmp, target)
    wait_until(lambda: rows(db).get(str(target), ("",))[0] == "captioned", what="captioned")
    _idle(db)
    state = _state(db)
    assert state["captioned"] == 1 and state["errors"] == 0
    from PIL import Image

    with Image.open(target) as image, Image.open(IMAGES / "gradient.jpg") as original:
        assert image.tobytes() == original.tobytes()
