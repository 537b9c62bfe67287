"""kill -9 in the middle of a video write (real processes, killed at random moments once the write has begun):
the video is the old file or the new one, never a mix, and the next writing command's recovery leaves no temp file,
no backup and no journal entry."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from crash_helpers import Writer
from video_helpers import FFMPEG, framemd5, make_video

from capwatch.config import MetadataConfig
from capwatch.metadata import Journal, Provenance, write_caption

PROV = Provenance("tiny/model", "rev1", "2026-03-01T12:00:00Z")
CAPTION = "a test pattern of colour bars"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FFMPEG, reason="ffmpeg makes the videos")]


def _reset(path: Path, content: bytes, mtime_ns: int) -> None:
    with open(path, "r+b") as f:  # in place, so a hard link stays one
        f.write(content)
        f.truncate()
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough (several MB of noise) that a write takes a while; moov in front, so the media moves. Made once
    for both cases: they only read it (each writes its own copies)."""
    return make_video(tmp_path_factory.mktemp("noise") / "source.mov", seconds=3, size="1280x720", faststart=True,
                      extra=("-vf", "noise=alls=60:allf=t", "-crf", "10", "-preset", "ultrafast"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("linked", [False, True], ids=["rename", "in place (hard link)"])
def test_kill_9_during_a_video_write_leaves_the_old_or_the_new_video(linked: bool, source: Path,
                                                                     tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    original = source.read_bytes()
    reference = tmp_path / "reference.mov"
    reference.write_bytes(original)
    began = time.perf_counter()
    write_caption(reference, CAPTION, PROV, MetadataConfig(), journal=Journal(tmp_path / "ref-journal"))
    # Kill moments are spread over about as long as one write takes (the whole window, not only its start).
    span = max(time.perf_counter() - began, 0.005)
    captioned = reference.read_bytes()
    assert captioned != original
    streams = framemd5(source)

    target = videos / "clip.mov"
    target.write_bytes(original)
    names = ["clip.mov"]
    if linked:
        os.link(target, videos / "album.mov")
        names = ["album.mov", "clip.mov"]
    base_mtime = 1_600_000_000_000_000_000
    journal = tmp_path / "journal"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = new = old = 0
    for _attempt in range(120):
        if kills >= 15:
            break
        _reset(target, original, base_mtime)
        writer = Writer(target, journal, CAPTION, PROV)
        proc = writer.go()
        killed = False
        started = time.perf_counter()
        # Kill at a random moment of the write: once its temp file (rename) or backup (in place) appears, or the
        # file itself is touched, within about one write's time.
        while proc.poll() is None:
            busy = any(n.startswith(".clip.mov.capwatch-") for n in os.listdir(videos)) or \
                os.stat(target).st_mtime_ns != base_mtime
            if busy or time.perf_counter() - started > 30:
                deadline = time.perf_counter() + rng.random() * span
                while time.perf_counter() < deadline:
                    pass
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        writer.close()
        if not killed or proc.returncode != -signal.SIGKILL:
            continue
        kills += 1
        Journal(journal).recover()
        content = target.read_bytes()
        assert content in (original, captioned), f"damaged video after kill {kills} (seed {seed})"
        assert sorted(os.listdir(videos)) == names, f"a temp file or backup was left (seed {seed})"
        assert not any(journal.glob("*.json")), "a journal entry was left"
        if linked:
            assert os.stat(target).st_ino == os.stat(videos / "album.mov").st_ino
        if content == captioned:
            new += 1
        else:
            old += 1
    assert kills >= 15, f"only {kills} kills landed in the write (seed {seed})"
    assert new + old == kills
    assert framemd5(target) == streams
    print(f"{kills} kills: {new} complete, {old} original (seed {seed})")
