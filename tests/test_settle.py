"""Settling decisions, driven by an explicit clock and explicit stat results (table-driven)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from capwatch.daemon.settle import FileState, Settler, is_temp_name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Step:
    """One thing that happens: time passes, an event arrives, the file changes on disk, or a poll."""

    at: float  # seconds after the start
    kind: str  # "event" | "closed" | "disk" | "delete" | "poll"
    size: int = 0
    expect_ready: bool = False


P = Path("/lib/a.jpg")


def run(steps: list[Step], settle: float = 2.0) -> list[tuple[float, bool]]:
    clock = Clock()
    start = clock.now
    settler = Settler(settle, clock=clock, temp_name=lambda name: False)
    disk: dict[Path, FileState] = {}

    def stat(path: Path) -> FileState | None:
        return disk.get(path)

    results = []
    for step in steps:
        clock.now = start + step.at
        if step.kind == "disk":
            disk[P] = FileState(step.size, int(clock.now * 1e9))
        elif step.kind == "delete":
            disk.pop(P, None)
        elif step.kind in ("event", "closed"):
            settler.changed(P, disk.get(P), closed=step.kind == "closed")
        elif step.kind == "poll":
            decision = settler.poll(stat)
            results.append((step.at, P in decision.ready))
    return results


CASES = {
    "stable for settle_seconds is ready": [
        Step(0, "disk", 10), Step(0, "event"),
        Step(1.9, "poll"), Step(2.0, "poll", expect_ready=True),
    ],
    "growing file keeps waiting until it stops": [
        Step(0, "disk", 10), Step(0, "event"),
        Step(1.5, "disk", 20), Step(1.5, "event"),
        Step(2.5, "poll"), Step(3.0, "disk", 30), Step(3.0, "event"),
        Step(4.9, "poll"), Step(5.0, "poll", expect_ready=True),
    ],
    "growth without events (polling observer) is seen by stat": [
        Step(0, "disk", 10), Step(0, "event"),
        Step(1.0, "disk", 20),
        Step(2.0, "poll"), Step(3.9, "poll"), Step(4.0, "poll", expect_ready=True),
    ],
    "close after write is the fast path": [
        Step(0, "disk", 10), Step(0, "event"), Step(0.1, "disk", 50), Step(0.1, "closed"),
        Step(0.2, "poll"), Step(0.35, "poll", expect_ready=True),
    ],
    "write after close cancels the fast path": [
        Step(0, "disk", 10), Step(0, "closed"), Step(0.1, "disk", 20), Step(0.1, "event"),
        Step(0.5, "poll"), Step(2.0, "poll"), Step(2.1, "poll", expect_ready=True),
    ],
    "deleted while waiting is never ready": [
        Step(0, "disk", 10), Step(0, "event"), Step(1, "delete"), Step(5, "poll"), Step(10, "poll"),
    ],
    "empty file is not ready": [
        Step(0, "disk", 0), Step(0, "closed"), Step(1, "poll"), Step(5, "poll"),
    ],
    "replaced while waiting is reported once in its final state": [
        Step(0, "disk", 10), Step(0, "event"),
        Step(1.0, "disk", 99), Step(1.0, "closed"),
        Step(1.1, "poll"), Step(1.3, "poll", expect_ready=True), Step(4.0, "poll"), Step(9.0, "poll"),
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_settle_table(name: str) -> None:
    steps = CASES[name]
    got = run(steps)
    want = [(s.at, s.expect_ready) for s in steps if s.kind == "poll"]
    assert got == want


def test_zero_settle_seconds_means_ready_on_first_poll() -> None:
    clock = Clock()
    settler = Settler(0.0, clock=clock, temp_name=lambda n: False)
    state = FileState(5, 1)
    settler.changed(P, state)
    assert settler.poll(lambda p: state).ready == (P,)
    assert len(settler) == 0


def test_rename_into_place_moves_tracking_and_takes_fast_path() -> None:
    clock = Clock()
    settler = Settler(2.0, clock=clock, temp_name=is_temp_name)
    part = Path("/lib/a.jpg.part")
    state = FileState(100, 5)
    assert settler.changed(part, state) is False  # the partial download itself is never tracked
    assert settler.moved(part, P, state) is True
    clock.now += 0.3
    decision = settler.poll(lambda p: state)
    assert decision.ready == (P,)


def test_poll_limit_leaves_the_rest_for_later() -> None:
    clock = Clock()
    settler = Settler(1.0, clock=clock, temp_name=lambda n: False)
    paths = [Path(f"/lib/{i}.jpg") for i in range(5)]
    for p in paths:
        settler.changed(p, FileState(1, 1))
    clock.now += 1.0
    first = settler.poll(lambda p: FileState(1, 1), limit=2)
    second = settler.poll(lambda p: FileState(1, 1))
    assert len(first.ready) == 2
    assert sorted(first.ready + second.ready) == sorted(paths)


def test_next_check_reports_the_earliest_deadline() -> None:
    clock = Clock()
    settler = Settler(2.0, clock=clock, temp_name=lambda n: False)
    assert settler.next_check() is None
    settler.changed(Path("/lib/x.jpg"), FileState(1, 1))
    clock.now += 1
    settler.changed(Path("/lib/y.jpg"), FileState(1, 1), closed=True)
    assert settler.next_check() == pytest.approx(clock.now + 0.25)


def test_forget_under_drops_a_deleted_folder() -> None:
    clock = Clock()
    settler = Settler(2.0, clock=clock, temp_name=lambda n: False)
    settler.changed(Path("/lib/sub/a.jpg"), None)
    settler.changed(Path("/lib/sub/deeper/b.jpg"), None)
    settler.changed(Path("/lib/c.jpg"), None)
    assert settler.forget_under(Path("/lib/sub")) == 2
    assert settler.pending() == [Path("/lib/c.jpg")]


@pytest.mark.parametrize(
    ("name", "temp"),
    [
        ("IMG_0001.jpg", False),
        ("IMG_0001.JPG", False),
        (".hidden.jpg", False),
        ("IMG_0001.jpg.part", True),
        ("photo.JPG.crdownload", True),
        ("photo.jpg.tmp", True),
        ("photo.jpg~", True),
        (".IMG_0001.jpg.a1B2c3", True),  # rsync's in-progress name
        (".IMG_0001.jpg.Xy9_0Q", True),
        ("holiday.jpeg", False),
        ("scan.tiff", False),
    ],
)
def test_temp_names(name: str, temp: bool) -> None:
    assert is_temp_name(name, own_temp=lambda n: False) is temp


def test_temp_names_include_our_own_temp_files() -> None:
    assert is_temp_name("IMG.jpg", own_temp=lambda n: n == "IMG.jpg") is True
