"""The job queue and pipeline: ordering, de-duplication, backpressure, in-flight parking, clean stops."""

from __future__ import annotations

import threading
from pathlib import Path

from capwatch.pipeline import JobQueue

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
