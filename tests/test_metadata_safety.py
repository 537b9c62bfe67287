"""Bad input and failures: one-line errors, originals byte-identical, no temp files left behind."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import metadata_corpus as mc
import pytest

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import Journal, Provenance, is_temp_file, write_caption
from capwatch.metadata.atomic import FileChanged, replace_file
from capwatch.metadata.identity import identify

PROV = Provenance("tiny/model", None, "2026-03-01T12:00:00Z")
CAPTION = "a lighthouse on a cliff"
REPO = Path(__file__).resolve().parent.parent


def _truncated_jpeg(p: Path) -> Path:
    mc.make_jpeg(p)
    p.write_bytes(p.read_bytes()[:-200])
    return p


def _garbage_after_eoi(p: Path) -> Path:
    mc.make_jpeg(p)
    p.write_bytes(p.read_bytes() + b"this is not an image, just junk appended by a broken tool" * 3)
    return p


def _duplicate_exif(p: Path) -> Path:
    mc.make_jpeg(p)
    mc.jpeg_insert_segment(p, 0xE1, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    mc.jpeg_insert_segment(p, 0xE1, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    return p


def _duplicate_xmp(p: Path) -> Path:
    mc.make_jpeg(p)
    packet = mc.xmp_packet('<rdf:Description rdf:about=""/>')
    for _ in range(2):
        mc.jpeg_insert_segment(p, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet)
    return p


def _zero_bytes(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _png_bad_crc(p: Path) -> Path:
    mc.make_png(p)
    data = bytearray(p.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip a byte of image data: the chunk CRC no longer matches
    p.write_bytes(bytes(data))
    return p


def _webp_wrong_riff_size(p: Path) -> Path:
    mc.make_webp(p)
    data = bytearray(p.read_bytes())
    struct.pack_into("<I", data, 4, len(data) + 100)
    p.write_bytes(bytes(data))
    return p


def _xmp_segment(p: Path, xml: bytes) -> Path:
    mc.make_jpeg(p)
    mc.jpeg_insert_segment(p, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xml)
    return p


def _malformed_xmp(p: Path) -> Path:
    return _xmp_segment(p, b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><unclosed></x:xmpmeta>')


def _xxe_xmp(p: Path) -> Path:
    return _xmp_segment(p, b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                           b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&e;</x:xmpmeta>')


def _entity_bomb_xmp(p: Path) -> Path:
    lol = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10 if i else "lol"}">' for i in range(10))
    return _xmp_segment(p, f'<?xml version="1.0"?><!DOCTYPE x [{lol}]><x>&l9;</x>'.encode())


BAD: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "truncated-jpeg": ("bad.jpg", _truncated_jpeg),
    "garbage-after-eoi": ("bad.jpg", _garbage_after_eoi),
    "duplicate-app1-exif": ("bad.jpg", _duplicate_exif),
    "duplicate-app1-xmp": ("bad.jpg", _duplicate_xmp),
    "zero-bytes": ("bad.jpg", _zero_bytes),
    "png-bad-crc": ("bad.png", _png_bad_crc),
    "webp-wrong-riff-size": ("bad.webp", _webp_wrong_riff_size),
    "malformed-xmp": ("bad.jpg", _malformed_xmp),
    "xxe-xmp": ("bad.jpg", _xxe_xmp),
    "entity-expansion-xmp": ("bad.jpg", _entity_bomb_xmp),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_error_and_the_file_is_untouched(case: str, tmp_path: Path) -> None:
    name, build = BAD[case]
    path = build(tmp_path / name)
    before = path.read_bytes()
    with pytest.raises(MetadataError) as info:
        write_caption(path, CAPTION, PROV, MetadataConfig(), force=True)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [name]


def test_known_trailers_after_eoi_are_kept_byte_identical(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "mpf.jpg")
    second = mc.make_jpeg(tmp_path / "second.jpg").read_bytes()
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(100)
    for trailer in (second, video):
        path.write_bytes(mc.make_jpeg(tmp_path / "base.jpg").read_bytes() + trailer)
        write_caption(path, CAPTION, PROV, MetadataConfig(), force=True)
        assert path.read_bytes().endswith(trailer)
        assert mc.exif_fields(path)["XMP-dc:Description"] == CAPTION


def test_wrong_extension_is_handled_by_content(tmp_path: Path) -> None:
    png_named_jpg = tmp_path / "photo.jpg"
    png_named_jpg.write_bytes(mc.make_png(tmp_path / "x.png").read_bytes())
    assert write_caption(png_named_jpg, CAPTION, PROV, MetadataConfig()).written == ("exif", "xmp")
    assert png_named_jpg.read_bytes().startswith(b"\x89PNG")
    assert mc.exif_fields(png_named_jpg)["XMP-dc:Description"] == CAPTION


def test_file_changed_or_vanished_before_replace_is_left_alone(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "a.jpg")
    journal = Journal(tmp_path / "journal")
    stale = identify(path)
    changed = path.read_bytes() + b"\x00"
    path.write_bytes(changed)
    with pytest.raises(FileChanged) as info:
        replace_file(path, b"new content", stale, journal=journal)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == changed and set(os.listdir(tmp_path)) - {"journal"} == {"a.jpg"}
    current = identify(path)
    path.unlink()
    with pytest.raises(FileChanged):
        replace_file(path, b"new content", current, journal=journal)
    assert set(os.listdir(tmp_path)) - {"journal"} == set() and journal.pending() == []


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_disk_full_during_write_leaves_the_original_and_no_temp(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "a.jpg")
    before = path.read_bytes()
    # RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk fails with ENOSPC.
    proc = _run(f"""
        import resource, signal
        from pathlib import Path
        from capwatch.config import MetadataConfig
        from capwatch.errors import MetadataError
        from capwatch.metadata import Provenance, write_caption
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, {len(before) // 2}))
        try:
            write_caption(Path({str(path)!r}), "caption", Provenance("m", None, "t"), MetadataConfig())
        except MetadataError as exc:
            print("ERROR", exc)
    """)
    assert proc.stdout.startswith("ERROR") and proc.stdout.count("\n") == 1, proc.stderr
    assert "space" in proc.stdout
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.jpg"]


@pytest.mark.parametrize("hard_link", [False, True])
def test_kill_9_mid_write_keeps_the_original_and_recovery_removes_leftovers(tmp_path: Path, hard_link: bool) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    path = mc.make_jpeg(photos / "a.jpg")
    if hard_link:
        os.link(path, photos / "link.jpg")
    journal = Journal(tmp_path / "journal")
    before = path.read_bytes()
    names_before = sorted(os.listdir(photos))
    proc = _run(f"""
        import os, signal
        from pathlib import Path
        from capwatch.metadata import Journal
        from capwatch.metadata.atomic import replace_file
        from capwatch.metadata.identity import identify
        path = Path({str(path)!r})
        replace_file(path, b"new bytes" * 1000, identify(path), journal=Journal(Path({str(journal.directory)!r})),
                     before_commit=lambda p: os.kill(os.getpid(), signal.SIGKILL))
    """)
    assert proc.returncode == -9
    assert path.read_bytes() == before
    leftovers = [n for n in os.listdir(photos) if is_temp_file(n)]
    assert len(leftovers) == 1 and leftovers[0].startswith(".a.jpg.capwatch-")
    assert len(journal.pending()) == 1
    if hard_link:
        # Dying half-way through the in-place write: part of the new content is in the file.
        path.write_bytes(b"new bytes" * 300 + before[2700:])
    report = journal.recover()
    assert report.settled == 1 and report.removed == 1
    assert sorted(os.listdir(photos)) == names_before
    assert path.read_bytes() == before
    if hard_link:
        assert report.restored == (str(path),)
        assert (photos / "link.jpg").read_bytes() == before
    assert journal.pending() == []


def test_recovery_leaves_live_writers_and_unregistered_files_alone(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    path = mc.make_jpeg(photos / "a.jpg")
    journal = Journal(tmp_path / "journal")
    # A name that looks like ours but that no journal entry registered: not provably ours, never deleted.
    stray = photos / f".a.jpg.capwatch-{os.getpid() + 1}-0123abcd.tmp"
    stray.write_bytes(b"not registered")
    entry = journal.create(photos / "b.jpg.xmp", photos / ".b.jpg.xmp.capwatch-1-89abcdef.tmp")
    with entry:
        live = photos / ".b.jpg.xmp.capwatch-1-89abcdef.tmp"
        live.write_bytes(b"being written")
        report = journal.recover()  # the entry is locked by this (live) writer
        assert report.live == 1 and report.removed == 0
        assert live.exists() and stray.exists() and path.exists()
    assert journal.pending() == []
    assert is_temp_file(stray.name) and not is_temp_file("a.jpg")
    assert Journal(tmp_path / "missing").recover().settled == 0
