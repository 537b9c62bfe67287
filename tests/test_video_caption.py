"""Videos as assets: decoded with PyAV, the representative frame chosen (black, flat and blurred frames skipped),
captioned, written, indexed, searched and counted like photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageFilter
from video_helpers import EXIFTOOL, FFMPEG, exiftool, framemd5, make_video, scenes_video

from capwatch.library.videos import merge_keywords, merge_text
from capwatch.models.frames import BLACK_LUMA, FLAT_STD, Frame, choose, choose_frames, measure
from capwatch.models.preprocess import load_image
from tests.conftest import CliRunner

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not (FFMPEG and EXIFTOOL), reason="ffmpeg makes the videos, exiftool reads them")

MODEL = Path(__file__).parent / "fixtures" / "models" / "vit-gpt2-tiny-greedy"


def test_a_black_fade_in_is_never_the_representative_frame(tmp_path: Path) -> None:
    video = scenes_video(tmp_path / "fade.mp4", "color=c=black", "color=c=black", "testsrc")
    chosen = choose_frames(video)
    assert any(reason == "black" for _, reason in chosen.rejected)
    assert all(frame.at >= 2.9 for frame in chosen.chosen), [f.at for f in chosen.chosen]
    assert chosen.representative.luma > BLACK_LUMA
    assert chosen.duration is not None and 4.4 < chosen.duration < 4.6


def test_flat_title_cards_and_blurred_frames_are_skipped() -> None:
    sharp = Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    blurred = sharp.filter(ImageFilter.GaussianBlur(8))
    flat = Image.new("RGB", (320, 240), (200, 40, 40))
    frames = [Frame(float(i), image, *measure(image)) for i, image in enumerate([flat, blurred, sharp, sharp])]
    assert frames[0].contrast < FLAT_STD
    chosen = choose(frames)
    reasons = dict(chosen.rejected)
    assert reasons == {0.0: "flat", 1.0: "blurred"}
    assert chosen.representative.at in (2.0, 3.0)


def test_the_representative_frame_is_the_one_most_like_the_rest() -> None:
    # Five frames of one scene and one odd frame: the medoid is one of the five, the odd one is an extra frame.
    base = Image.effect_mandelbrot((160, 120), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    scene = [base.rotate(angle) for angle in (0, 1, 2, 3, 4)]
    odd = Image.effect_noise((160, 120), 80).convert("RGB")
    frames = [Frame(float(i), image, *measure(image)) for i, image in enumerate([*scene, odd])]
    chosen = choose(frames, extra=1)
    assert chosen.representative.at < 5.0
    assert [f.at for f in chosen.chosen[1:]] == [5.0]


def test_rotation_metadata_is_honoured(tmp_path: Path) -> None:
    video = make_video(tmp_path / "portrait.mov", size="320x240", audio=False)
    exiftool("-q", "-overwrite_original", "-Rotation=90", video)
    assert load_image(video).size == (240, 320)


def test_a_10_bit_hevc_video_is_decoded_to_8_bit_rgb(tmp_path: Path) -> None:
    video = make_video(tmp_path / "hdr.mp4", size="640x360", audio=False,
                       extra=("-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-tag:v", "hvc1", "-x265-params",
                              "log-level=error"))
    image = load_image(video)
    assert image.mode == "RGB" and image.size == (640, 360)
    assert measure(image)[1] > FLAT_STD


def test_keywords_and_text_of_several_frames_are_merged_once_each() -> None:
    assert merge_keywords(("dog", "ball"), [("Dog", "tree"), None, ("car",)], 4) == ("dog", "ball", "tree", "car")
    assert merge_keywords(None, [None], 5) is None
    assert merge_text(["EXIT\nGate 4", None, "Gate 4\nPlatform 2"]) == "EXIT\nGate 4\nPlatform 2"
    assert merge_text([None, None]) is None


def test_caption_scan_search_status_and_recaption_take_videos(run_cli: CliRunner, tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    end = make_video(library / "beach.mp4")
    fast = make_video(library / "garden.mov", faststart=True)
    streams = {p: framemd5(p) for p in (end, fast)}
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "--model", MODEL, "scan", library)
    assert result.code == 0, result.err
    assert result.out.startswith("2 files (2 videos): 2 new") and "2 captioned" in result.out, result.out
    for video in (end, fast):
        caption = exiftool("-s3", "-XMP-dc:Description", video).strip()
        assert caption
        assert framemd5(video) == streams[video]
    status = json.loads(run_cli("--db", db, "status", "--json").out)
    assert status["images"] == 2 and status["videos"] == 2 and status["videos_captioned"] == 2
    assert "videos 2" in run_cli("--db", db, "status").out
    caption = exiftool("-s3", "-XMP-dc:Description", end).strip()
    word = next("".join(ch for ch in w if ch.isalnum()) for w in caption.split() if any(ch.isalnum() for ch in w))
    found = run_cli("--db", db, "search", word, "--json")
    hits = [json.loads(line) for line in found.out.splitlines()]
    assert str(end) in [h["path"] for h in hits]
    assert {h["media"] for h in hits} == {"video"}
    again = run_cli("--db", db, "--model", MODEL, "recaption", "--model-changed", library)
    assert again.code == 0, again.err
    forced = run_cli("--db", db, "--model", MODEL, "recaption", "--before", "2100-01-01", library)
    assert forced.code == 0, forced.err
    assert "(2 videos)" in forced.out


def test_the_cluster_sends_a_videos_frame_not_the_video_and_it_captions_the_same(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    import numpy as np

    from capwatch.cluster.coordinator import FRAME_SUFFIX, _payload
    from capwatch.config import ModelConfig
    from capwatch.library.process import Job
    from capwatch.metadata import read_snapshot
    from capwatch.models.captioner import open_captioner

    video = make_video(tmp_path / "clip.mov", seconds=3, size="640x480")
    job = Job(str(video), read_snapshot(video), None, index_only=False, human_skip=False)
    item = _payload(job)
    assert item is not None
    name, data = item
    assert name == str(video) + FRAME_SUFFIX and data.startswith(b"\x89PNG")
    # What a worker does with it: decode the bytes under that name's suffix.
    sent = tmp_path / "worker" / Path(name).name
    sent.parent.mkdir()
    sent.write_bytes(data)
    with open_captioner(MODEL, ModelConfig(dir=MODEL, precision="fp32")) as captioner:
        assert np.array_equal(captioner.preprocess_file(sent), captioner.preprocess_file(video))
    # A file that changed since its snapshot is not sent.
    with open(video, "ab") as f:
        f.write(b"\x00\x00\x00\x08free")
    assert _payload(job) is None


@pytest.mark.timeout(60)
def test_a_fifo_named_like_a_video_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    import os

    from capwatch.errors import ImageError

    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        choose_frames(fifo)


def test_frames_are_decoded_from_a_given_descriptor_whatever_the_name_leads_to_now(tmp_path: Path) -> None:
    import os

    video = scenes_video(tmp_path / "fade.mp4", "color=c=black", "testsrc")
    fd = os.open(video, os.O_RDONLY)
    try:
        video.unlink()
        video.write_bytes(b"not a video any more")
        chosen = choose_frames(video, fd=fd)
        assert chosen.representative.luma > BLACK_LUMA and chosen.sampled >= 2
        from capwatch.models.frames import representative_image

        assert representative_image(video, fd=fd).tobytes() == chosen.representative.image.tobytes()
        os.fstat(fd)  # still the caller's, still open
    finally:
        os.close(fd)
