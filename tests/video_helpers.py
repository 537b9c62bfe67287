"""Videos made by ffmpeg in the test run (H.264 + AAC), and the independent checks run on them: ffmpeg's
framemd5 of every stream, exiftool's tags and validation."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

FFMPEG = shutil.which("ffmpeg")
EXIFTOOL = shutil.which("exiftool")


def make_video(path: Path, *, seconds: float = 2.0, size: str = "320x240", faststart: bool = False,
               audio: bool = True, source: str = "testsrc", extra: tuple[str, ...] = ()) -> Path:
    """An H.264 (+ AAC) video from an ffmpeg test source; ``faststart`` puts ``moov`` in front of ``mdat``.
    The container follows the suffix (.mp4, .m4v, .mov)."""
    assert FFMPEG is not None
    cmd = [FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"{source}=size={size}:rate=25:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", "-shortest"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25", *extra]
    if faststart:
        cmd += ["-movflags", "+faststart"]
    subprocess.run([*cmd, str(path)], check=True, timeout=120)
    return path


def scenes_video(path: Path, *sources: str, seconds: float = 1.5, extra: tuple[str, ...] = ()) -> Path:
    """A video of several lavfi sources one after the other (keyframe every 0.5 s), by default three whose
    frames differ; ``extra`` goes to ffmpeg before the output."""
    assert FFMPEG is not None
    sources = sources or ("testsrc", "rgbtestsrc", "smptebars")
    cmd = [FFMPEG, "-v", "error", "-y"]
    for source in sources:
        joint = ":" if "=" in source else "="
        cmd += ["-f", "lavfi", "-i", f"{source}{joint}size=320x240:rate=24:duration={seconds}"]
    inputs = "".join(f"[{i}]" for i in range(len(sources)))
    cmd += ["-filter_complex", f"{inputs}concat=n={len(sources)}:v=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-g", "12", *extra, str(path)]
    subprocess.run(cmd, check=True, timeout=120)
    return path


def top_boxes(path: Path) -> list[tuple[str, int, int]]:
    """(type, offset, size) of every top-level box."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, btype = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        out.append((btype.decode("latin-1"), pos, size))
        pos += size
    return out


def framemd5(path: Path) -> dict[str, list[str]]:
    """ffmpeg's per-packet MD5 of every stream (``-c copy``: the compressed samples, not decoded pictures)."""
    assert FFMPEG is not None
    out = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-map", "0", "-c", "copy", "-f", "framemd5", "-"],
                         check=True, capture_output=True, timeout=120).stdout.decode()
    streams: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        streams.setdefault(fields[0], []).append(",".join(fields[1:]))
    return streams


def exiftool(*args: str | Path) -> str:
    assert EXIFTOOL is not None
    return subprocess.run([EXIFTOOL, *map(str, args)], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def all_tags(path: Path) -> dict[str, list[str]]:
    """``exiftool -a -G1 -s`` as {"[Group] Tag": [values]}, without the file system's own tags."""
    tags: dict[str, list[str]] = {}
    for line in exiftool("-a", "-G1", "-s", path).splitlines():
        if line.startswith("[System]") or line.startswith("[ExifTool]"):
            continue
        key, _, value = line.partition(":")
        tags.setdefault(" ".join(key.split()), []).append(value.strip())
    return tags


def validate(path: Path) -> tuple[str, int]:
    """exiftool -validate's verdict and its number of warnings."""
    out = exiftool("-validate", "-warning", "-a", "-s3", path).splitlines()
    verdict = out[0] if out else ""
    return verdict, len(out) - 1
