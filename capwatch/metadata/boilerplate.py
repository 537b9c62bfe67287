"""Recognise descriptions that cameras, phones and software put into files on their own.

Sources for the list: the strings digiKam/gThumb filter out of comments ("OLYMPUS DIGITAL CAMERA", "SONY DSC",
"KONICA MINOLTA DIGITAL CAMERA", "MINOLTA DIGITAL CAMERA", "binary comment"), PhotoPrism's unwanted descriptions
(Samsung, Huawei/Honor scene codes such as "hdrpl" or "btf", "Created by Imlib", KODAK's "Scanner", "DVC 10.1
HDMI", "charset=Ascii"), the camera test files of exif-samples, and values seen in the wild (Samsung/LG
"Exif_JPEG_PICTURE", "<VENDOR> DIGITAL CAMERA", DCIM paths and camera file names). Beyond the list, four general
rules:

* the camera's own names: a description made only of the words of the file's make, model and software, or of a
  maker's or product line's name with a model code ("<KENOX S630  / Samsung S630>", "Nikon COOLPIX P6000"), in
  any order and with any punctuation or brackets;
* software signatures: "Created with GIMP", "File written by Adobe Photoshop 4.0", "CREATOR: gd-jpeg v1.0" (a
  known program, or a version number, after the verb; "Created by Mum" stays a person's);
* technical strings that programs store in the tag: JSON objects, ``key=value`` data (tifffile's
  ``shape=(512, 512, 3)``, ImageJ's ``ImageJ=1.52a`` lines), XML documents (OME), exiftool's binary placeholders,
  pixel dimensions;
* text without a letter (dates, numbers, punctuation).

A maker's name alone ("Sony", "Leica", "Apple") or next to ordinary words ("Olympus mountain at dawn") is a
person's. Such filler is searchable but may be replaced by a caption.
"""

from __future__ import annotations

import json
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
        "DCIM", "Caption", "None", "null", "undefined", "N/A", "AppleMark", "DVC 10.1 HDMI", "ASCII",
        # Huawei / Honor scene and mode codes written into ImageDescription
        "rhdr", "hdrpl", "oznorWO", "frontbhdp", "fbt", "rbt", "ptr", "fbthdr", "btr", "mon", "nor", "dav",
        "mde", "mde_soft", "edf", "btfmdn", "btf", "btfhdr", "frem", "oznor", "rpt", "burst", "sdr_HDRB",
        "cof", "qf", "qrf", "fshbty", "mory", "hdrp", "pnr", "ai", "fhdr",
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
    # Samsung/LG phones: Exif_JPEG_PICTURE, Exif_JPEG_422, "Exif JPEG".
    re.compile(r"^exif[_ ]jpeg([_ ]\w+)?$", re.IGNORECASE),
    # exiftool's placeholders for binary values, copied into the tag by tools that export exiftool's output.
    re.compile(r"^\(binary data \d+ bytes\b|^string with binary data\b", re.IGNORECASE),
    # Signatures of JPEG libraries: Intel's, Image Alchemy's, LEAD Tools'.
    re.compile(r"^(intel\(r\) jpeg library|handmade software, inc\.|lead technologies inc\.)", re.IGNORECASE),
    # Pixel dimensions: 3264x2448, 640 x 480 px.
    re.compile(r"^\d+\s*[x\u00d7*]\s*\d+(\s*(px|pixels))?$", re.IGNORECASE),
    # XML documents: OME-TIFF metadata, other programs' XML.
    re.compile(r"^<\?xml\b|^<ome\b", re.IGNORECASE),
)

#: "Created with X", "File written by X", "Optimized by X": boilerplate when X is a known program or a version
#: number follows; "Created by Mum" or "Made with love" are a person's.
_SIGNATURE = re.compile(
    r"^(?:(?:file|image|photo|picture)\s+)?(?:created|made|generated|written|edited|saved|processed|optimi[sz]ed|"
    r"compressed|converted|exported|produced|encoded|modified)\s+(?:with|by|using)\s+(?:the\s+)?(?P<rest>.+)$|"
    r"^(?:creator|software|generator|producer)\s*:\s*(?P<tool>.+)$",
    re.IGNORECASE | re.DOTALL,
)
_VERSION = re.compile(r"\bv?\d+(?:[.,]\d+)+\b|\bv\d+\b", re.IGNORECASE)
_SOFTWARE = frozenset((
    "gimp", "imlib", "imlib2", "imagemagick", "graphicsmagick", "photoshop", "adobe", "lightroom", "picasa",
    "snapseed", "vsco", "instagram", "canva", "krita", "inkscape", "darktable", "rawtherapee", "digikam", "shotwell",
    "irfanview", "xnview", "acdsee", "paintshop", "pixlr", "picsart", "luminar", "dxo", "iphoto", "jpegmini",
    "jpegoptim", "mozjpeg", "libjpeg", "gd", "pillow", "opencv", "matlab", "imagej", "tifffile", "photoscape",
    "fotor", "facetune", "meitu", "hipstamatic", "microsoft", "gthumb", "hugin", "ptgui", "capture",
))

#: Words of maker names and product lines. A description made of these, model codes and the filler words below is
#: the camera naming itself, when it has a model code ("Samsung S630"), a camera word ("Sony Camera") or Samsung's
#: angle brackets; a maker's name alone ("Sony", "Apple") or with other words is a person's.
_MAKERS = frozenset((
    "acer", "agfa", "agfaphoto", "aiptek", "apple", "asus", "benq", "blackberry", "canon", "casio", "contax",
    "dji", "eastman", "epson", "fuji", "fujifilm", "google", "gopro", "hasselblad", "hewlett", "hmd", "hp", "htc",
    "huawei", "insta360", "jvc", "kenox", "kodak", "konica", "kyocera", "leica", "lenovo", "lg", "minolta",
    "motorola", "nikon", "nokia", "olympus", "oneplus", "oppo", "packard", "panasonic", "pentax", "polaroid",
    "praktica", "realme", "ricoh", "rollei", "samsung", "sanyo", "sony", "toshiba", "vivitar", "xiaomi", "yashica",
    "zeiss", "zte",
    # product lines
    "alpha", "camedia", "coolpix", "cybershot", "digimax", "dimage", "easyshare", "eos", "exilim", "finepix",
    "galaxy", "ipad", "iphone", "ixus", "ixy", "lumia", "lumix", "mavic", "nexus", "optio", "pixel", "powershot",
    "redmi", "vluu", "xperia",
))
#: Words that may stand next to the names above in a maker's string without making it a person's.
_DEVICE_FILLER = frozenset((
    "digital", "camera", "cameras", "still", "dsc", "photo", "photos", "picture", "pictures", "image", "images",
    "corporation", "corp", "co", "ltd", "inc", "company", "imaging", "optical", "electric", "electronics",
    "techwin", "mobile", "phone", "mark", "ii", "iii", "iv", "pro", "plus", "max", "mini", "ultra", "zoom", "hs",
))
_CAMERA_WORDS = frozenset(("digital", "camera", "dsc", "still"))
_WORDS = re.compile(r"[^\W_]+")
_ORDINAL = re.compile(r"^\d+(st|nd|rd|th)$")

#: One ``key=value`` per line (tifffile, ImageJ, Micro-Manager); the key has no spaces.
_KEY_VALUE = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.-]*)\s*=\s*(?P<value>\S.*)$")
#: A value that is data, not words: a number, a bracketed group, a quoted string, a boolean.
_DATA_VALUE = re.compile(r'^(-?\d[\w.:+-]*|\(.*\)|\[.*\]|\{.*\}|"[^"]*"|true|false|none|null)$', re.IGNORECASE)
_TECHNICAL_KEYS = frozenset(("charset", "imagej", "shape", "axes", "unit", "spacing", "images", "channels"))
#: The start of a JSON object, also when the text was cut short: {"key":
_JSON_OBJECT = re.compile(r'^\{\s*"[^"\n]{1,64}"\s*:')


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\x00", " ")
    return " ".join(text.split())


def is_boilerplate(text: str, *, make: str | None = None, model: str | None = None,
                   software: str | None = None) -> bool:
    """True when ``text`` is camera/software filler rather than words a person or capwatch wrote.

    Blank text, known filler strings and patterns, text without any letter, text that only names the camera
    (the file's ``make``/``model``/``software`` words, or a maker with a model code), program signatures and
    technical data (JSON, ``key=value`` lines, XML) count as filler; see the module docstring. Never raises.
    """
    raw = unicodedata.normalize("NFC", text).replace("\x00", " ").strip()
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
    if any(p.match(clean) for p in _PATTERNS):
        return True
    return _names_the_device(folded, device) or _is_signature(clean) or _is_technical(raw)


def _is_code(word: str) -> bool:
    """A model code: letters and digits together (S630, D750, 5D, i50), not an ordinal (1st, 80th)."""
    return (len(word) <= 12 and any(ch.isdigit() for ch in word) and any(ch.isalpha() for ch in word)
            and not _ORDINAL.match(word))


def _names_the_device(folded: str, device: list[str]) -> bool:
    """True when ``folded`` only names the camera: the words of its make/model/software, or a maker's name with a
    model code, a camera word or Samsung's angle brackets, in any order and with any punctuation."""
    words = _WORDS.findall(folded)
    if not words:
        return False
    own = {w for value in device for w in _WORDS.findall(value)}
    if own and all(w in own or w in _DEVICE_FILLER for w in words) and any(w in own for w in words):
        return True
    bracketed = folded.startswith("<") and folded.endswith(">")
    known = _MAKERS | own
    for word in words:
        if not (word in known or word in _DEVICE_FILLER or _is_code(word) or (len(word) == 1 and word.isalpha())
                or (bracketed and word.isdigit())):
            return False
    return any(w in known for w in words) and (
        bracketed or any(_is_code(w) for w in words) or any(w in _CAMERA_WORDS for w in words))


def _is_signature(clean: str) -> bool:
    """True for a program's signature: "Created with GIMP", "Optimized by JPEGmini 3.14", "CREATOR: gd-jpeg v1.0"."""
    match = _SIGNATURE.match(clean)
    if match is None:
        return False
    rest = match.group("rest") or match.group("tool") or ""
    words = _WORDS.findall(rest.casefold())
    return bool(words) and (words[0] in _SOFTWARE or _VERSION.search(rest) is not None)


def _is_technical(raw: str) -> bool:
    """True for data a program stored: a JSON object (or an array of numbers), ``key=value`` lines."""
    if raw[:1] in "{[":
        if _JSON_OBJECT.match(raw):
            return True
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        return isinstance(value, dict) or (isinstance(value, list) and _only_numbers(value))
    lines = [line for line in raw.splitlines() if line.strip()]
    pairs = [_KEY_VALUE.match(line) for line in lines]
    if not lines or not all(pairs):
        return False
    if len(pairs) > 1:
        return True
    pair = pairs[0]
    assert pair is not None
    value = pair.group("value").rstrip()
    return pair.group("key").casefold() in _TECHNICAL_KEYS or _DATA_VALUE.match(value) is not None


def _only_numbers(value: object, depth: int = 0) -> bool:
    """True for a (nested) list of numbers, such as an array shape; lists of words may be someone's keywords."""
    if isinstance(value, list):
        return depth < 8 and all(_only_numbers(v, depth + 1) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)
