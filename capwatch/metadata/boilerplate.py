"""Recognise descriptions that cameras, phones and software put into files on their own.

Sources for the list: the strings digiKam/gThumb filter out of comments ("OLYMPUS DIGITAL CAMERA", "SONY DSC",
"KONICA MINOLTA DIGITAL CAMERA", "MINOLTA DIGITAL CAMERA", "binary comment"), PhotoPrism's unwanted descriptions
(Samsung, Huawei/Honor scene codes such as "hdrpl" or "btf", "Created by Imlib", KODAK's "Scanner"), and values
seen in the wild (Samsung/LG "Exif_JPEG_PICTURE", "<VENDOR> DIGITAL CAMERA", DCIM paths and camera file
names, the camera make/model repeated). Such text is searchable but may be replaced by a caption.
"""

from __future__ import annotations

import re
import unicodedata

_EXACT = frozenset(
    s.casefold()
    for s in (
        "OLYMPUS DIGITAL CAMERA", "SONY DSC", "KONICA MINOLTA DIGITAL CAMERA", "MINOLTA DIGITAL CAMERA",
        "DIGITAL CAMERA", "Exif_JPEG_PICTURE", "Exif JPEG", "binary comment", "SAMSUNG", "SAMSUNG CAMERA PICTURES",
        "<Digimax i5, Samsung #1>", "Created by Imlib", "iClarified", "Scanner", "KODAK Digital Still Camera",
        "EASTMAN KODAK COMPANY", "LEAD Technologies Inc. V1.01", "Default", "Image", "Picture", "Photo",
        "Untitled", "No description", "Description", "Camera", "JPEG", "JPEG image", "Screenshot", "Title",
        "DCIM", "Caption", "None", "null", "undefined", "N/A",
        # Huawei / Honor scene and mode codes written into ImageDescription
        "rhdr", "hdrpl", "oznorWO", "frontbhdp", "fbt", "rbt", "ptr", "fbthdr", "btr", "mon", "nor", "dav",
        "mde", "mde_soft", "edf", "btfmdn", "btf", "btfhdr", "frem", "oznor", "rpt", "burst", "sdr_HDRB",
        "cof", "qf", "mory", "hdrp", "pnr", "ai", "fhdr",
    )
)
_PATTERNS = (
    re.compile(r"^[\w .&-]{0,40}\bdigital (still )?camera$", re.IGNORECASE),
    re.compile(r"^(dcim|[a-z]:)?[\\/]?dcim[\\/]", re.IGNORECASE),
    # Camera / phone file names: IMG_1234, DSC01234.JPG, PXL_20230408_060152625, GOPR2137 ...
    re.compile(
        r"^(img|dsc|dscn|dscf|_dsc|pict|p|gopr|gp|dji|mvimg|pxl|sam|cimg|imag|dcp|pic|photo|vid|mov|wp)"
        r"[_-]?\d[\w-]*(\.(jpe?g|heic|png|tiff?|dng|raw))?$",
        re.IGNORECASE,
    ),
    re.compile(r"^processed with \w+", re.IGNORECASE),
    re.compile(r"^created (with|by) [\w .-]+$", re.IGNORECASE),
)


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\x00", " ")
    return " ".join(text.split())


def is_boilerplate(text: str, *, make: str | None = None, model: str | None = None,
                   software: str | None = None) -> bool:
    """True when ``text`` is camera/software filler rather than words a person or capwatch wrote.

    Blank text, known filler strings and patterns, text without any letter, and text equal to the camera make,
    model, "make model" or the software name count as filler.
    """
    clean = _clean(text)
    if not clean or not any(ch.isalpha() for ch in clean):
        return True
    folded = clean.casefold()
    if folded in _EXACT:
        return True
    device = [_clean(v).casefold() for v in (make, model, software) if v and _clean(v)]
    if make and model:
        device.append(_clean(f"{make} {model}").casefold())
    if folded in device:
        return True
    return any(p.match(clean) for p in _PATTERNS)
