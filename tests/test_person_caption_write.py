"""write_caption(provenance=None): a person's words (an edit in `capwatch serve`) go through the same safe write
path, carry no capwatch provenance, read back as a person's in capwatch and in exiftool, and are never replaced."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from capwatch.config import MetadataConfig
from capwatch.metadata import Provenance, read_snapshot, write_caption

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
OURS = Provenance("some-model", "abc123", "2025-01-01T00:00:00Z")


def _image(path: Path) -> Path:
    fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF"}[path.suffix]
    Image.new("RGB", (40, 30), (120, 60, 200)).save(path, fmt)
    return path


def _tags(path: Path) -> dict[str, str]:
    out = subprocess.run(["exiftool", "-j", "-G1", "-a", "-XMP-dc:Description", "-XMP-capwatch:all",
                          "-ImageDescription", str(path)], capture_output=True, text=True, check=True).stdout
    return {k: str(v) for k, v in json.loads(out)[0].items() if k != "SourceFile"}


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.webp", "photo.tif"])
def test_a_persons_words_replace_ours_without_provenance(tmp_path: Path, name: str) -> None:
    path = _image(tmp_path / name)
    write_caption(path, "a purple square", OURS, MetadataConfig())
    assert read_snapshot(path).metadata.description.kind == "ours"  # type: ignore[union-attr]
    result = write_caption(path, "Our first flat, 2009", None, MetadataConfig(), force=True)
    assert result.written and result.snapshot is not None
    desc = result.snapshot.metadata.description
    assert desc is not None and desc.kind == "human" and desc.text == "Our first flat, 2009"
    target = path if name != "photo.tif" else tmp_path / "photo.tif.xmp"  # TIFF captions live in a sidecar
    tags = _tags(target)
    assert tags["XMP-dc:Description"] == "Our first flat, 2009"
    assert not [k for k in tags if k.startswith("XMP-capwatch")], tags
    # From now on capwatch keeps them: a model's caption is not written over them.
    before = path.read_bytes()
    kept = write_caption(path, "a purple square", OURS, MetadataConfig())
    assert not kept.written and "kept" in (kept.skipped or "") and path.read_bytes() == before
