"""Container detection by magic bytes (the extension is only a tie-breaker between TIFF and TIFF-based RAW)."""

from __future__ import annotations

#: TIFF-structured camera RAW extensions; their magic is plain TIFF, only the name tells them apart.
TIFF_RAW_EXTENSIONS = frozenset(
    {"cr2", "nef", "nrw", "arw", "srf", "sr2", "dng", "pef", "srw", "3fr", "iiq", "erf", "mef", "mos", "kdc", "dcr"}
)
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"mif2"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})

#: The first box of a QuickTime file written before ``ftyp`` existed.
QUICKTIME_FIRST_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
VIDEO_FORMATS = frozenset({"mp4", "mov"})
#: Suffixes (lower case, no dot) of the video containers capwatch decodes (MP4/MOV are also told by content; the
#: others FFmpeg opens, and their captions go into sidecars).
VIDEO_SUFFIXES = frozenset({"mp4", "m4v", "mov", "3gp", "mkv", "webm", "avi", "mts", "m2ts"})


def is_video_name(name: str) -> bool:
    """True when the file name ``name`` has a video suffix (VIDEO_SUFFIXES, any case)."""
    dot = name.rfind(".")
    return dot > 0 and name[dot + 1 :].lower() in VIDEO_SUFFIXES

#: How many leading bytes ``detect_format`` wants.
HEAD_SIZE = 64


def detect_format(head: bytes, extension: str = "") -> str:
    """Return the container of a file from its first ``HEAD_SIZE`` bytes.

    One of ``jpeg png webp gif tiff heif avif raw bmp mp4 mov unknown`` (``mp4``: an ISO base media file with
    any other brand, e.g. isom, mp42, M4V; ``mov``: QuickTime, brand ``qt  `` or an old file without ``ftyp``).
    ``extension`` (without dot, any case) only decides whether a plain TIFF structure is a camera RAW. Never raises.
    """
    ext = extension.lower().lstrip(".")
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        if head[8:10] == b"CR" or ext in TIFF_RAW_EXTENSIONS:
            return "raw"
        return "tiff"
    # Olympus ORF ("IIRO", "IIRS", "MMOR") and Panasonic RW2 ("IIU\0") are TIFF with a private magic number.
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00"):
        return "raw"
    if head.startswith(b"FUJIFILMCCD-RAW") or head.startswith(b"FOVb"):
        return "raw"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"crx ":
            return "raw"
        if brand in AVIF_BRANDS:
            return "avif"
        if brand in HEIF_BRANDS - {b"mif1", b"msf1", b"mif2"}:
            return "heif"
        # Generic major brands (mif1/msf1) say "some HEIF image"; the compatible brands say which codec.
        compatible = head[16:HEAD_SIZE]
        if any(compatible[i : i + 4] in AVIF_BRANDS for i in range(0, len(compatible) - 3, 4)):
            return "avif"
        if any(compatible[i : i + 4] in HEIF_BRANDS for i in range(0, len(compatible) - 3, 4)):
            return "heif"
        if brand in HEIF_BRANDS:
            return "heif"
        return "mov" if brand == b"qt  " else "mp4"
    if len(head) >= 8 and head[4:8] in QUICKTIME_FIRST_BOXES:
        return "mov"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    return "unknown"
