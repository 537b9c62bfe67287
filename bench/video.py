"""Video benchmark: what one video costs to caption, and what writing its caption costs next to a plain copy.

    python bench/video.py                       # a 60 s 4K clip made once with ffmpeg into bench/_work/video
    python bench/video.py --model DIR --rounds 3

1. Per-video cost: decode (PyAV: seek to keyframes over the duration, decode one frame each, scale, measure) plus
   captioning the chosen frames (the representative one with a caption, the others for keywords), against the
   anchor of one photo: a 3840x2160 JPEG of the same scene decoded and captioned. The model is ``--model`` (default:
   the tiny test model in tests/fixtures, which makes the caption cheap: with a real model the caption part grows
   and the ratio shrinks towards 1 + extra frames).
2. Write time of the caption into the MP4 (capwatch.write_caption: read, rewrite moov/uuid, media copied
   kernel-side, fsync, exchange) against a plain copy of the file (copy_file_range to a temp file, fsync, rename:
   the floor of any rewrite), for ``moov`` at the end and at the front (+faststart), side by side, as ratios.

The box is shared (2 cores, other jobs running): take the ratios, not the absolute times, and run it twice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capwatch.config import MetadataConfig, ModelConfig  # noqa: E402
from capwatch.metadata import Journal, Provenance, write_caption  # noqa: E402
from capwatch.models.captioner import DescribeOptions, open_captioner  # noqa: E402
from capwatch.models.frames import choose_frames  # noqa: E402
from capwatch.models.preprocess import load_image  # noqa: E402

WORK = REPO / "bench" / "_work" / "video"
PROV = Provenance("bench/model", None, "2026-01-01T00:00:00Z")


def make_clip(path: Path, *, faststart: bool, seconds: int) -> Path:
    """A 4K H.264 + AAC clip (testsrc2, keyframe every second as phones record), made once."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=3840x2160:rate=30:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
           "-crf", "28", "-g", "30", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"]
    if faststart:
        cmd += ["-movflags", "+faststart"]
    subprocess.run([*cmd, str(path)], check=True)
    return path


def _best(times: list[float]) -> float:
    return min(times)


def per_video_cost(clip: Path, model: Path, rounds: int) -> None:
    still = WORK / "still.jpg"
    if not still.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", "30", "-i", str(clip), "-frames:v", "1", "-q:v", "2",
                        str(still)], check=True)
    options = DescribeOptions(keywords=True)
    with open_captioner(model, ModelConfig(dir=model, precision="fp32")) as captioner:
        captioner.caption_batch([load_image(still)])  # load the model before timing
        video_decode, video_caption, photo = [], [], []
        chosen = None
        for _ in range(rounds):
            start = time.perf_counter()
            chosen = choose_frames(clip)
            decoded = time.perf_counter()
            import numpy as np

            pixels = np.stack([captioner.preprocess_image(f.image) for f in chosen.chosen])
            captioner.describe_pixels(pixels[:1], options)
            if len(pixels) > 1:
                captioner.describe_pixels(pixels[1:], DescribeOptions(caption=False, keywords=True))
            video_decode.append(decoded - start)
            video_caption.append(time.perf_counter() - decoded)
            start = time.perf_counter()
            captioner.describe_pixels(captioner.preprocess_image(load_image(still))[None], options)
            photo.append(time.perf_counter() - start)
    assert chosen is not None
    total = _best([d + c for d, c in zip(video_decode, video_caption, strict=True)])
    print(f"per-video cost, {clip.name} ({clip.stat().st_size / 1e6:.0f} MB, 60 s 4K H.264), model {model.name}:")
    print(f"  decode + choose   {_best(video_decode) * 1000:8.0f} ms  ({chosen.sampled} frames sampled, "
          f"{len(chosen.chosen)} chosen, {len(chosen.rejected)} rejected)")
    print(f"  frames captioned  {_best(video_caption) * 1000:8.0f} ms")
    print(f"  video total       {total * 1000:8.0f} ms")
    print(f"  one 4K JPEG       {_best(photo) * 1000:8.0f} ms  (decode + caption: the anchor)")
    print(f"  ratio             {total / _best(photo):8.2f}x a photo")


def _plain_copy(src: Path) -> float:
    tmp = src.with_name(src.name + ".copy.tmp")
    start = time.perf_counter()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        while remaining:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
            if n == 0:
                break
            remaining -= n
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, src)
    fd = os.open(src.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def write_cost(clips: dict[str, Path], rounds: int) -> None:
    print("caption write vs a plain copy (copy_file_range + fsync + rename), best of", rounds)
    for label, clip in clips.items():
        ours, copies = [], []
        for number in range(rounds):
            target = WORK / "write" / clip.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip, target)
            copies.append(_plain_copy(target))
            start = time.perf_counter()
            result = write_caption(target, f"a test pattern, round {number}", PROV, MetadataConfig(),
                                   journal=Journal(WORK / "journal"))
            ours.append(time.perf_counter() - start)
            assert result.written == ("xmp",), result
        print(f"  {label:<16} capwatch {_best(ours) * 1000:7.1f} ms   copy {_best(copies) * 1000:7.1f} ms   "
              f"ratio {_best(ours) / _best(copies):5.2f}x   (median ratio "
              f"{statistics.median(ours) / statistics.median(copies):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "tests" / "fixtures" / "models" / "vit-gpt2-tiny-greedy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    end = make_clip(WORK / f"clip-{args.seconds}s-moov-end.mp4", faststart=False, seconds=args.seconds)
    front = make_clip(WORK / f"clip-{args.seconds}s-faststart.mp4", faststart=True, seconds=args.seconds)
    print("(shared, noisy box: compare the ratios, run twice)")
    per_video_cost(end, args.model, args.rounds)
    write_cost({"moov at the end": end, "moov in front": front}, args.rounds)


if __name__ == "__main__":
    main()
