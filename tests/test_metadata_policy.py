"""Whose words win: MetadataConfig.write / existing, force, and the sidecar fallbacks."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import metadata_corpus as mc
import pytest

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import Provenance, read_metadata, write_caption
from tests.conftest import read_only_dir

pytestmark = pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool builds the corpus")
PROV = Provenance("tiny/model", "r1", "2026-03-01T12:00:00Z")
CAPTION = "a brown dog running on the sand"


def _jpeg(tmp_path: Path, name: str, *tags: str) -> Path:
    path = mc.make_jpeg(tmp_path / name)
    if tags:
        mc.exiftool_batch([[*tags, path]])
    return path


def _description(path: Path) -> str | None:
    value = json.loads(mc.exiftool("-j", "-use", "MWG", "-Description", path))[0].get("Description")
    return None if value is None else str(value)


def test_a_persons_description_is_kept_by_default_and_replaced_on_overwrite_or_force(tmp_path: Path) -> None:
    kept = _jpeg(tmp_path, "kept.jpg", "-XMP-dc:Description=Grandma in her garden, 1987")
    before = kept.read_bytes()
    result = write_caption(kept, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped is not None and "existing = keep" in result.skipped
    assert kept.read_bytes() == before
    assert not list(tmp_path.glob("*.xmp"))

    for name, config, force in (("over.jpg", MetadataConfig(existing="overwrite"), False),
                                ("force.jpg", MetadataConfig(), True)):
        path = _jpeg(tmp_path, name, "-XMP-dc:Description=Grandma in her garden, 1987")
        result = write_caption(path, CAPTION, PROV, config, force=force)
        assert result.written == ("exif", "xmp")
        assert _description(path) == CAPTION


def test_boilerplate_and_our_own_captions_are_replaced(tmp_path: Path) -> None:
    junk = _jpeg(tmp_path, "junk.jpg", "-ImageDescription=SONY DSC", "-IPTC:Caption-Abstract=SONY DSC")
    assert write_caption(junk, CAPTION, PROV, MetadataConfig()).written == ("exif", "xmp", "iptc")
    assert _description(junk) == CAPTION
    newer = Provenance("tiny/model", "r2", "2026-04-01T00:00:00Z")
    assert write_caption(junk, "a dog on a beach", newer, MetadataConfig()).written == ("exif", "xmp", "iptc")
    desc = read_metadata(junk).description
    assert desc is not None and (desc.text, desc.kind, desc.provenance) == ("a dog on a beach", "ours", newer)


def test_write_none_touches_nothing(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg")
    before = path.read_bytes()
    result = write_caption(path, CAPTION, PROV, MetadataConfig(write="none"))
    assert result.written == () and result.skipped is not None
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.jpg"]


def test_sidecar_mode_leaves_the_image_alone_and_both_mode_writes_both(tmp_path: Path) -> None:
    side = _jpeg(tmp_path, "side.jpg", "-Make=Canon")
    before = side.read_bytes()
    assert write_caption(side, CAPTION, PROV, MetadataConfig(write="sidecar")).written == ("sidecar",)
    assert side.read_bytes() == before
    assert _description(tmp_path / "side.jpg.xmp") == CAPTION
    desc = read_metadata(side).description
    assert desc is not None and (desc.origin, desc.kind) == ("sidecar", "ours")

    both = _jpeg(tmp_path, "both.jpg")
    assert write_caption(both, CAPTION, PROV, MetadataConfig(write="both")).written == ("exif", "xmp", "sidecar")
    assert _description(both) == CAPTION and _description(tmp_path / "both.jpg.xmp") == CAPTION


def test_xmp_too_large_for_a_jpeg_segment_falls_back_to_a_sidecar(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "big.jpg")
    filler = "x" * 65150
    packet = mc.xmp_packet(
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
        f"<xmp:Label>{filler}</xmp:Label></rdf:Description>"
    )
    assert 65000 < len(packet) <= 65504
    mc.jpeg_insert_segment(path, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet)
    before = path.read_bytes()
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == ("sidecar",)
    assert path.read_bytes() == before
    assert _description(tmp_path / "big.jpg.xmp") == CAPTION


def test_read_only_file_gets_a_sidecar_instead(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "ro.jpg")
    os.chmod(path, 0o444)
    before = path.read_bytes()
    assert write_caption(path, CAPTION, PROV, MetadataConfig()).written == ("sidecar",)
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_read_only_directory_is_a_one_line_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = _jpeg(folder, "a.jpg")
    before = path.read_bytes()
    with read_only_dir(folder):
        with pytest.raises(MetadataError) as info:
            write_caption(path, CAPTION, PROV, MetadataConfig())
        assert "\n" not in str(info.value)
        assert path.read_bytes() == before and os.listdir(folder) == ["a.jpg"]


def test_mode_owner_and_times_are_kept_unless_told_otherwise(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg")
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_123_456_789))
    st = path.stat()
    write_caption(path, CAPTION, PROV, MetadataConfig())
    after = path.stat()
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid, after.st_mtime_ns, after.st_atime_ns) == (
        st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns)
    write_caption(path, "another caption", PROV, MetadataConfig(keep_mtime=False))
    assert path.stat().st_mtime_ns != st.st_mtime_ns


def test_hard_linked_file_is_edited_so_every_link_sees_the_caption(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg")
    other = tmp_path / "b.jpg"
    os.link(path, other)
    inode = path.stat().st_ino
    write_caption(path, CAPTION, PROV, MetadataConfig())
    assert path.stat().st_ino == inode and path.stat().st_nlink == 2
    assert other.read_bytes() == path.read_bytes()
    assert _description(other) == CAPTION
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "b.jpg"]


def test_extended_xmp_and_non_embeddable_containers_use_sidecars(tmp_path: Path) -> None:
    ext = mc.make_jpeg(tmp_path / "ext.jpg")
    mc.jpeg_insert_segment(ext, 0xE1, b"http://ns.adobe.com/xmp/extension/\x00" + b"0" * 32 + bytes(8) + b"<x/>")
    gif = tmp_path / "anim.gif"
    mc.noise_rgb().save(gif)
    for path in (ext, gif):
        before = path.read_bytes()
        assert write_caption(path, CAPTION, PROV, MetadataConfig()).written == ("sidecar",)
        assert path.read_bytes() == before
        assert _description(path.with_name(path.name + ".xmp")) == CAPTION
