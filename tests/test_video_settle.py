"""A large video copied slowly (a copy that stalls longer than settle_seconds on a network share) is not handed to
the model half-written: the daemon's settler waits until the file's boxes reach its end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from video_helpers import FFMPEG, make_video

from capwatch.daemon.settle import FileState, Settler
from capwatch.metadata.mp4 import looks_complete

pytestmark = pytest.mark.skipif(not FFMPEG, reason="ffmpeg makes the videos")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _state(path: Path) -> FileState | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileState(st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("faststart", [False, True], ids=["moov at the end", "moov in front"])
def test_a_stalled_copy_of_a_video_waits_until_it_is_whole(faststart: bool, tmp_path: Path) -> None:
    source = make_video(tmp_path / "source.mp4", seconds=3, faststart=faststart)
    data = source.read_bytes()
    target = tmp_path / "library" / "clip.mp4"
    target.parent.mkdir()
    clock = Clock()
    settler = Settler(2.0, clock=clock, temp_name=lambda name: False, complete=looks_complete)
    # The copy writes 60 % and then stalls for a minute (far beyond settle_seconds).
    target.write_bytes(data[: len(data) * 6 // 10])
    settler.changed(target, _state(target))
    assert not looks_complete(target)
    for _ in range(30):
        clock.now += 2.0
        assert settler.poll(_state).ready == ()
    assert target in settler
    # The copy finishes: the next check hands it on.
    with open(target, "ab") as f:
        f.write(data[len(data) * 6 // 10 :])
    assert looks_complete(target)
    settler.changed(target, _state(target), closed=True)
    clock.now += 2.0
    assert settler.poll(_state).ready == (target,)


def test_a_video_that_never_completes_is_handed_on_after_the_patience(tmp_path: Path) -> None:
    source = make_video(tmp_path / "source.mov", seconds=2)
    target = tmp_path / "broken.mov"
    target.write_bytes(source.read_bytes()[:-200])
    clock = Clock()
    settler = Settler(2.0, clock=clock, temp_name=lambda name: False, complete=looks_complete,
                      incomplete_patience_seconds=60.0)
    settler.changed(target, _state(target))
    ready: tuple[Path, ...] = ()
    waited = 0.0
    while not ready and waited < 200:
        clock.now += 2.0
        waited += 2.0
        ready = settler.poll(_state).ready
    assert ready == (target,) and 60.0 <= waited < 70.0


def test_images_and_finished_videos_look_complete(tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    assert looks_complete(image)
    assert looks_complete(make_video(tmp_path / "whole.mov", seconds=1))
