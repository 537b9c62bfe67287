"""Test corpus for capwatch.metadata, built in tmp_path with Pillow + exiftool, and independent reader checks
(exiftool, exiv2, Pillow, and small container walkers written here rather than borrowed from capwatch)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from PIL import Image, ImageSequence

EXIFTOOL = shutil.which("exiftool")
EXIV2 = shutil.which("exiv2")


def exiftool(*args: str | Path) -> str:
    """Run exiftool (one process) and return stdout."""
    assert EXIFTOOL, "exiftool is required"
    out = subprocess.run([EXIFTOOL, *map(str, args)], capture_output=True, text=True, check=False)
    return out.stdout


def exiftool_batch(commands: list[list[str | Path]]) -> None:
    """Run several exiftool commands in ONE process (-execute), which keeps corpus building fast."""
    if not commands:
        return
    args: list[str] = []
    for cmd in commands:
        args += ["-q", "-q", "-overwrite_original", *map(str, cmd), "-execute"]
    assert EXIFTOOL
    subprocess.run([EXIFTOOL, "-@", "-"], input="\n".join(args), text=True, check=True, capture_output=True)


def noise_rgb(size: tuple[int, int] = (64, 48), seed: int = 1) -> Image.Image:
    """A small deterministic image that is not a single colour."""
    w, h = size
    data = bytes(((x * 7 + y * 13 + seed * 31) % 256) for y in range(h) for x in range(w) for _ in range(3))
    return Image.frombytes("RGB", size, data)


def make_jpeg(path: Path, **kwargs: object) -> Path:
    noise_rgb().save(path, "JPEG", quality=90, **kwargs)
    return path


def make_png(path: Path) -> Path:
    noise_rgb().save(path, "PNG")
    return path


def make_webp(path: Path, *, lossless: bool = False, alpha: bool = False) -> Path:
    img = noise_rgb()
    if alpha:
        img = img.convert("RGBA")
        img.putalpha(128)
    img.save(path, "WEBP", lossless=lossless, quality=80)
    return path


def make_animated_webp(path: Path) -> Path:
    frames = [noise_rgb(seed=i) for i in range(3)]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    return path


def make_tiff(path: Path) -> Path:
    noise_rgb().save(path, "TIFF")
    return path


# ------------------------------------------------------------------------------------------------------------
# Independent readers


def exif_fields(path: Path) -> dict[str, object]:
    """ImageDescription / XMP-dc:Description / Caption-Abstract / MWG:Description as exiftool reads them."""
    raw = exiftool("-j", "-G1", "-a", "-charset", "iptc=UTF8", "-IFD0:ImageDescription", "-XMP-dc:Description",
                   "-IPTC:Caption-Abstract", "-IFD0:XPComment", path)
    fields: dict[str, object] = json.loads(raw)[0]
    mwg = json.loads(exiftool("-j", "-use", "MWG", "-MWG:Description", path))[0]
    fields["MWG:Description"] = mwg.get("Description")
    return fields


def exiv2_fields(path: Path) -> dict[str, str]:
    """exiv2 -pa / -px values keyed by exiv2 key (first value of each key)."""
    assert EXIV2, "exiv2 is required"
    out: dict[str, str] = {}
    for flag in ("-pa", "-px"):
        proc = subprocess.run([EXIV2, flag, str(path)], capture_output=True, check=False)
        for line in proc.stdout.decode("utf-8", errors="replace").splitlines():
            parts = line.split(None, 3)
            if len(parts) == 4 and parts[0] not in out:
                out[parts[0]] = parts[3]
    return out


def validate_warnings(path: Path) -> set[str]:
    """The warnings of ``exiftool -validate -warning -a`` as a set of message texts."""
    text = exiftool("-validate", "-warning", "-a", path)
    return {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Warning")}


def decoded_frames(path: Path) -> list[bytes]:
    """Decoded pixels of every frame (Pillow)."""
    with Image.open(path) as img:
        return [frame.convert("RGBA").tobytes() for frame in ImageSequence.Iterator(img)]


def compressed_image_data(data: bytes) -> bytes:
    """The compressed image data by container: JPEG SOS..end, PNG IDAT/fdAT payloads, WebP image chunks."""
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while True:
            marker = data[pos + 1]
            if marker == 0xDA:
                return data[pos:]
            pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    if data.startswith(b"\x89PNG"):
        pos, out = 8, b""
        while pos < len(data):
            length = struct.unpack(">I", data[pos : pos + 4])[0]
            if data[pos + 4 : pos + 8] in (b"IDAT", b"fdAT"):
                out += data[pos + 8 : pos + 8 + length]
            pos += 12 + length
        return out
    if data.startswith(b"RIFF"):
        pos, out = 12, b""
        while pos + 8 <= len(data):
            size = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
            if data[pos : pos + 4] in (b"ALPH", b"VP8 ", b"VP8L", b"ANMF"):
                out += data[pos + 8 : pos + 8 + size]
            pos += 8 + size + (size & 1)
        return out
    raise AssertionError("unknown container")


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def insert_png_chunks_before_iend(path: Path, chunks: bytes) -> None:
    data = path.read_bytes()
    iend = data.rindex(b"IEND") - 4
    path.write_bytes(data[:iend] + chunks + data[iend:])


def jpeg_insert_segment(path: Path, marker: int, body: bytes) -> None:
    """Insert a raw segment right after SOI (for crafting duplicate or hostile segments)."""
    data = path.read_bytes()
    seg = bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body
    path.write_bytes(data[:2] + seg + data[2:])


def xmp_packet(inner_rdf: str) -> bytes:
    """A complete XMP packet around rdf:Description content."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        + inner_rdf
        + '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode("utf-8")


def tiff_with_makernote(order: str = "<") -> tuple[bytes, bytes]:
    """An EXIF TIFF block: IFD0 (Make, Model, ExifIFD pointer) -> ExifIFD (DateTimeOriginal, MakerNote whose
    payload holds absolute offsets into the block, like Olympus/Nikon). Returns (tiff, makernote bytes)."""
    bo = b"II" if order == "<" else b"MM"
    make, model = b"OLYMPUS IMAGING CORP.\x00", b"E-M5\x00\x00"
    # Layout: header(8) | IFD0 @8: 3 entries (2+36+4=42) -> 50 | make @50 | model @72 | ExifIFD @78
    ifd0_off, make_off = 8, 50
    model_off = make_off + len(make)
    exif_off = model_off + len(model)
    exif_ifd_size = 2 + 2 * 12 + 4
    dto_off = exif_off + exif_ifd_size
    dto = b"2021:07:08 09:10:11\x00"
    mn_off = dto_off + len(dto)
    # The maker note points at itself with absolute offsets: moving it would break it.
    makernote = b"OLYMP\x00\x01\x00" + struct.pack(order + "II", mn_off, mn_off + 16) + b"\xde\xad\xbe\xef" * 8
    head = bo + struct.pack(order + "HI", 42, ifd0_off)
    ifd0 = struct.pack(order + "H", 3)
    ifd0 += struct.pack(order + "HHII", 0x010F, 2, len(make), make_off)
    ifd0 += struct.pack(order + "HHII", 0x0110, 2, len(model), model_off)
    ifd0 += struct.pack(order + "HHII", 0x8769, 4, 1, exif_off) + struct.pack(order + "I", 0)
    exif = struct.pack(order + "H", 2)
    exif += struct.pack(order + "HHII", 0x9003, 2, len(dto), dto_off)
    exif += struct.pack(order + "HHII", 0x927C, 7, len(makernote), mn_off) + struct.pack(order + "I", 0)
    tiff = head + ifd0 + make + model + exif + dto + makernote
    assert len(head + ifd0) == make_off and len(head + ifd0 + make + model) == exif_off
    return tiff, makernote
