"""Camera and software filler in ImageDescription: a table of real-world samples, and words people wrote.

Filler (``embedded``) is searchable but replaced by a caption; a person's words (``human``) are kept. Taking filler
for a person's words means the file is never captioned; the opposite overwrites what someone wrote. Samples come
from camera test files (exif-samples, exiftool's and PhotoPrism's lists of maker defaults) and from software that
writes its own data into the tag (tifffile, ImageJ, Micro-Manager, PHP GD, LEAD Tools).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from capwatch.metadata import read_metadata
from capwatch.metadata.boilerplate import is_boilerplate
from tests.conftest import CliRunner

# (description, make, model, software): what real files hold.
FILLER: list[tuple[str, str | None, str | None, str | None]] = [
    # Maker defaults, with and without the camera's own tags beside them.
    ("<KENOX S630  / Samsung S630>", None, None, None),
    ("<KENOX S630  / Samsung S630>", "Samsung Techwin", "S630", None),
    ("<KENOX S630  / Samsung S630>", "Samsung Techwin", "<KENOX S630  / Samsung S630>", None),
    ("<Digimax i5, Samsung #1>", None, None, None),
    ("<Digimax i50 MP3, Samsung #1 MP3>", "Samsung Techwin", "<Digimax i50 MP3, Samsung #1 MP3>", "GIMP 2.4.5"),
    ("<Samsung D70 / VLUU D70 / Kenox D70>", None, None, None),
    ("<SAMSUNG DIGITAL CAMERA>", None, None, None),
    ("OLYMPUS DIGITAL CAMERA", "OLYMPUS IMAGING CORP.", "E-P3", "Version 1.3"),
    ("OLYMPUS DIGITAL CAMERA         ", None, None, None),
    ("SANYO DIGITAL CAMERA", "SANYO Electric Co.,Ltd.", "SR6", "V06P-74"),
    ("KONICA MINOLTA DIGITAL CAMERA", "KONICA MINOLTA", "DiMAGE Z3", None),
    ("MINOLTA DIGITAL CAMERA", None, None, None),
    ("KODAK Digital Still Camera", None, None, None),
    ("SONY DSC", "SONY", "DSC-W55", None),
    ("SAMSUNG CAMERA PICTURES", None, None, None),
    ("Exif_JPEG_PICTURE", None, None, None),
    ("Exif_JPEG_422", None, None, None),
    ("Digital Camera", None, None, None),
    ("DCIM", None, None, None),
    ("DCIM\\100MEDIA\\DJI_0042.JPG", None, None, None),
    ("default", None, None, None),
    ("Picture", None, None, None),
    ("AppleMark", None, None, None),
    ("DVC 10.1 HDMI", None, None, None),
    ("qrf", None, None, None),
    ("fshbty", None, None, None),
    ("WWL", "WWL", "ION230", None),
    ("Gran Turismo 5", "Polyphony Digital Inc.", "Gran Turismo 5", "PMB Service Uploader"),
    ("NIKON D750", None, None, None),
    ("Nikon COOLPIX P6000", None, None, None),
    ("Canon PowerShot S40", None, None, None),
    ("Canon EOS 5D Mark II", "Canon", "Canon EOS 5D Mark II", None),
    ("EOS 5D", "Canon", "Canon EOS 5D", None),
    ("iPhone 12 Pro", "Apple", "iPhone 12 Pro", "14.4"),
    ("Canon  /  Canon EOS 40D", "Canon", "Canon EOS 40D", None),
    ("[Canon EOS 40D]", "Canon", "Canon EOS 40D", None),
    ("GIMP 2.4.5", "Canon", "Canon EOS 40D", "GIMP 2.4.5"),
    # Software signatures.
    ("Created with GIMP", None, None, None),
    ("Created by Imlib", None, None, None),
    ("LEAD Technologies Inc. V1.01", None, None, None),
    ("CREATOR: gd-jpeg v1.0 (using IJG JPEG v62), quality = 90", None, None, None),
    ("Processed with VSCO with a6 preset", None, None, None),
    ("Created with The GIMP", None, None, None),
    ("Intel(R) JPEG Library, version 1,5,4,36", None, None, None),
    ("Handmade Software, Inc. Image Alchemy v1.11", None, None, None),
    ("File written by Adobe Photoshop 4.0", None, None, None),
    ("Optimized by JPEGmini 3.14.14.72670860 0x5a08c2a1", None, None, None),
    # Technical strings: tifffile, ImageJ, Micro-Manager, OME, exiftool's binary placeholders.
    ("shape=(512, 512, 3)", None, None, "tifffile.py"),
    ("shape=(1, 512, 512)", None, None, None),
    ('{"shape": [512, 512, 3]}', None, None, "tifffile.py"),
    ('{"shape": [2, 256, 256], "axes": "ZYX", "spacing": 0.5}', None, None, None),
    ("ImageJ=1.52a\nimages=3\nchannels=3\nmode=composite\nunit=micron\nloop=false\n", None, None, None),
    ("ImageJ=1.11a", None, None, None),
    ("charset=Ascii", None, None, None),
    ('{"Summary": {"Prefix": "img", "Frames": 1}, "ChannelIndex": 0}', None, None, None),
    ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
     "<Image ID=\"Image:0\"/></OME>", None, None, None),
    ("(Binary data 2048 bytes, use -b option to extract)", None, None, None),
    ("3264x2448", None, None, None),
    ("2019:05:01 12:00:00", None, None, None),
]

# Words people wrote: short ones, ones that mention a camera, a maker, a software or a key word.
PEOPLE: list[tuple[str, str | None, str | None, str | None]] = [
    ("Mum", None, None, None),
    ("Sunset", None, None, None),
    ("DSC party at Kenox's", None, None, None),
    ("Shape of water", None, None, None),
    ("shape of the bay at low tide", None, None, "tifffile.py"),
    ("Sony", None, None, None),
    ("Leica", None, None, None),
    ("Apple", None, None, None),
    ("Fuji 2019", "FUJIFILM", "X-T3", None),
    ("Olympus mountain at dawn", "OLYMPUS IMAGING CORP.", "E-M10", None),
    ("A dog on a beach", "Canon", "EOS", None),
    ("My new Nikon D750", None, None, None),
    ("Samsung Galaxy S21 launch party", None, None, None),
    ("Canon in D at the wedding", "Canon", "Canon EOS R5", None),
    ("Created by Mum at the kitchen table", None, None, None),
    ("Made with love by Grandma", None, None, None),
    ("Edited in the car on the way home", None, None, None),
    ("E=mc2 on the blackboard", None, None, None),
    ("Score=3:1 at half time", None, None, None),
    ("Me=happy", None, None, None),
    ("Edited in Lightroom on the train", None, None, None),
    ("{Mum} and [Dad]", None, None, None),
    ("[Draft] beach day", None, None, None),
    ("<3 Mum", None, None, None),
    ("Picture day at school", None, None, None),
    ("Camera club outing", None, None, None),
    ("1st birthday", None, None, None),
    ("Arion ater", "Canon", "Canon EOS-1D Mark IV", "Adobe Photoshop Lightroom 4.0 (Macintosh)"),
    ("El cielo sobre Berlin (Heaven above Berlin)", "Canon", "Canon PowerShot G9", "GIMP 2.6.11"),
    ("Grandma's 80th birthday in the garden", None, None, None),
    ("Oma", "NIKON CORPORATION", "NIKON D750", None),
]


@pytest.mark.parametrize(("text", "make", "model", "software"), FILLER)
def test_camera_and_software_filler_is_recognised(text: str, make: str | None, model: str | None,
                                                   software: str | None) -> None:
    assert is_boilerplate(text, make=make, model=model, software=software) is True


@pytest.mark.parametrize(("text", "make", "model", "software"), PEOPLE)
def test_words_people_wrote_are_never_taken_for_filler(text: str, make: str | None, model: str | None,
                                                       software: str | None) -> None:
    assert is_boilerplate(text, make=make, model=model, software=software) is False


def _tiff(path: Path, description: str, **tags: str) -> Path:
    ids = {"make": 271, "model": 272, "software": 305}
    info = {270: description, **{ids[k]: v for k, v in tags.items()}}
    Image.new("RGB", (16, 16), (90, 120, 200)).save(path, tiffinfo=info)
    return path


def test_files_with_filler_are_read_as_boilerplate_and_wait_for_a_caption(run_cli: CliRunner,
                                                                          tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    _tiff(library / "scope.tif", "shape=(16, 16, 3)", software="tifffile.py")
    _tiff(library / "kenox.tif", "<KENOX S630  / Samsung S630>", make="Samsung Techwin", model="S630")
    _tiff(library / "mum.tif", "Mum", make="Samsung Techwin", model="S630")
    kinds = {p.name: read_metadata(p).description for p in sorted(library.iterdir())}
    assert {name: d.kind if d else None for name, d in kinds.items()} == {
        "kenox.tif": "boilerplate", "mum.tif": "human", "scope.tif": "boilerplate"}

    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", library, "--no-caption")
    assert result.code == 0, result.err
    status = json.loads(run_cli("--db", db, "status", "--json").out)
    # The two files with filler are waiting for a caption; the person's "Mum" is kept as it is.
    assert (status["pending"], status["described"]) == (2, 1)
    assert (status["by_source"]["embedded"], status["by_source"]["human"]) == (2, 1)
