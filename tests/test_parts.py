"""capwatch.library.parts: work split into parts run side by side."""

from __future__ import annotations

import threading
import time

import pytest

from capwatch.library.parts import run_parts


def test_every_part_runs_once_part_0_in_the_caller_the_others_on_threads_of_their_own() -> None:
    seen: dict[int, int] = {}
    lock = threading.Lock()
    together = threading.Barrier(4, timeout=10)  # passes only when all four parts run at the same time

    def work(k: int) -> None:
        with lock:
            seen[k] = threading.get_ident()
        together.wait()

    run_parts(4, work, name="test-part")
    assert sorted(seen) == [0, 1, 2, 3]
    assert seen[0] == threading.get_ident() and len(set(seen.values())) == 4


def test_an_error_in_part_0_is_raised_after_the_other_parts_have_ended() -> None:
    ended: list[int] = []

    def work(k: int) -> None:
        if k == 0:
            raise ValueError("part 0")
        time.sleep(0.05)
        ended.append(k)

    with pytest.raises(ValueError, match="part 0"):
        run_parts(3, work, name="test-part")
    assert sorted(ended) == [1, 2]
    assert not [t for t in threading.enumerate() if t.name == "test-part"]
