"""Captions in videos: the XMP goes where exiftool puts it (MP4: top-level uuid box; MOV: moov/udta/XMP_), every
media sample stays byte-identical (ffmpeg framemd5 of every stream), no tag is lost, and a person's description
(XMP, QuickTime ©des, Keys:Description) is theirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from video_helpers import EXIFTOOL, FFMPEG, all_tags, exiftool, framemd5, make_video, top_boxes, validate

from capwatch.config import MetadataConfig
from capwatch.metadata import FileChanged, Journal, Provenance, WriteHooks, read_metadata, read_snapshot, write_caption
from capwatch.metadata.mp4 import XMP_UUID

pytestmark = pytest.mark.skipif(not (FFMPEG and EXIFTOOL), reason="ffmpeg makes the videos, exiftool reads them")

PROV = Provenance("tiny/model", "rev1", "2026-03-01T12:00:00Z")
CAPTION = "a test pattern of colour bars with a moving square"
#: The tags a caption write adds or changes: the XMP packet, and where the media now starts when it moved.
CAPTION_GROUPS = ("[XMP-x]", "[XMP-dc]", "[XMP-capwatch]")
POSITION_TAGS = ("[QuickTime] MediaDataOffset",)

VARIANTS = {
    "mp4, moov at the end": ("clip.mp4", {}),
    "mp4, +faststart": ("clip.mp4", {"faststart": True}),
    "m4v": ("clip.m4v", {}),
    "mov, moov at the end": ("clip.mov", {}),
    "mov, +faststart": ("clip.mov", {"faststart": True}),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("videos")
    out = {}
    for number, (label, (name, options)) in enumerate(VARIANTS.items()):
        folder = base / str(number)
        folder.mkdir()
        out[label] = make_video(folder / name, **options)  # type: ignore[arg-type]
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def _write(path: Path, caption: str = CAPTION, *, config: MetadataConfig | None = None, **kwargs: object) -> tuple[
        str, ...]:
    result = write_caption(path, caption, PROV, config or MetadataConfig(), journal=Journal(path.parent / ".j"),
                           **kwargs)  # type: ignore[arg-type]
    return result.written


def _changed_tags(before: dict[str, list[str]], after: dict[str, list[str]]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_caption_is_read_by_exiftool_and_every_stream_is_byte_identical(
        variant: str, originals: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(originals[variant], tmp_path)
    before_tags, before_streams, before_valid = all_tags(path), framemd5(path), validate(path)
    assert _write(path, keywords=["bars", "square"]) == ("xmp",)
    assert exiftool("-s3", "-XMP-dc:Description", path).strip() == CAPTION
    assert exiftool("-s3", "-XMP-dc:Subject", path).strip() == "bars, square"
    after_streams = framemd5(path)
    assert set(after_streams) == set(before_streams) and len(before_streams) == 2
    assert after_streams == before_streams
    changed = _changed_tags(before_tags, all_tags(path))
    assert {t for t in changed if not t.startswith(CAPTION_GROUPS) and t not in POSITION_TAGS} == set()
    verdict, warnings = validate(path)
    assert warnings <= before_valid[1] and (verdict == "OK" or verdict == before_valid[0])
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.text == CAPTION and meta.description.kind == "ours"
    assert (meta.width, meta.height) == (320, 240)


def test_an_mp4_gets_the_xmp_uuid_box_and_a_mov_gets_moov_udta_xmp(originals: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    mp4 = _copy(originals["mp4, moov at the end"], tmp_path)
    _write(mp4)
    data = mp4.read_bytes()
    uuids = [(o, s) for t, o, s in top_boxes(mp4) if t == "uuid"]
    assert len(uuids) == 1 and data[uuids[0][0] + 8 : uuids[0][0] + 24] == XMP_UUID
    (tmp_path / "mov").mkdir()
    mov = _copy(originals["mov, moov at the end"], tmp_path / "mov")
    _write(mov)
    assert [t for t, _, _ in top_boxes(mov)].count("uuid") == 0
    assert "MOV" in exiftool("-s3", "-FileType", mov)
    # exiftool names the group of the packet it read: moov/udta/XMP_ in a MOV
    assert CAPTION in exiftool("-a", "-G1:2", "-XMP:Description", mov)


def test_media_moves_only_when_moov_grows_in_front_of_it_and_chunk_offsets_follow(originals: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    # moov at the end: nothing in front of the media changes
    end = _copy(originals["mov, moov at the end"], tmp_path)
    mdat_before = next(o for t, o, _ in top_boxes(end) if t == "mdat")
    _write(end)
    assert next(o for t, o, _ in top_boxes(end) if t == "mdat") == mdat_before
    # faststart MOV: moov grows in front of mdat, which moves; ffmpeg still reads the same samples
    (tmp_path / "fs").mkdir()
    fast = _copy(originals["mov, +faststart"], tmp_path / "fs")
    before = framemd5(fast)
    mdat_before = next(o for t, o, _ in top_boxes(fast) if t == "mdat")
    _write(fast)
    assert next(o for t, o, _ in top_boxes(fast) if t == "mdat") > mdat_before
    assert framemd5(fast) == before


def test_a_second_caption_reuses_the_padded_box_so_nothing_moves(originals: dict[str, Path], tmp_path: Path) -> None:
    for label in ("mp4, +faststart", "mov, +faststart"):
        folder = tmp_path / label.replace(" ", "_").replace(",", "")
        folder.mkdir()
        path = _copy(originals[label], folder)
        _write(path)
        layout, size = top_boxes(path), path.stat().st_size
        streams = framemd5(path)
        _write(path, "a different caption, a little longer than the first one was", config=MetadataConfig(
            existing="overwrite"))
        assert top_boxes(path) == layout and path.stat().st_size == size
        assert "a little longer" in exiftool("-s3", "-XMP-dc:Description", path)
        assert framemd5(path) == streams


def test_gps_dates_and_quicktime_tags_written_by_exiftool_are_kept(originals: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    for label in ("mp4, +faststart", "mov, +faststart"):
        folder = tmp_path / label.replace(" ", "_").replace(",", "")
        folder.mkdir()
        path = _copy(originals[label], folder)
        exiftool("-q", "-overwrite_original", "-Keys:GPSCoordinates=48.8577, 2.2950, 35",
                 "-QuickTime:CreateDate=2024:05:01 10:20:30", "-Keys:CreationDate=2024:05:01 12:20:30+02:00",
                 "-Keys:Make=Apple", "-Keys:Model=iPhone 15", "-UserData:Artist=Someone", path)
        before = all_tags(path)
        assert any("GPSCoordinates" in k for k in before), before
        streams = framemd5(path)
        assert read_metadata(path).taken_at == "2024-05-01T12:20:30"
        assert _write(path) == ("xmp",)
        after = all_tags(path)
        changed = _changed_tags(before, after)
        assert {t for t in changed if not t.startswith(CAPTION_GROUPS) and t not in POSITION_TAGS} == set()
        assert framemd5(path) == streams
        assert read_metadata(path).taken_at == "2024-05-01T12:20:30"


@pytest.mark.parametrize("tag", ["-XMP-dc:Description=Grandma's 80th birthday",
                                 "-Keys:Description=Grandma's 80th birthday",
                                 "-UserData:Description=Grandma's 80th birthday"])
def test_a_persons_description_is_kept(tag: str, originals: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(originals["mov, +faststart"], tmp_path)
    exiftool("-q", "-overwrite_original", tag, path)
    before = path.read_bytes()
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.kind == "human"
    assert meta.description.text == "Grandma's 80th birthday"
    result = write_caption(path, CAPTION, PROV, MetadataConfig(), journal=Journal(tmp_path / ".j"))
    assert result.written == () and result.skipped is not None and "kept" in result.skipped
    assert path.read_bytes() == before


def test_a_persons_xmp_in_an_mp4_is_merged_not_replaced(originals: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(originals["mp4, +faststart"], tmp_path)
    exiftool("-q", "-overwrite_original", "-XMP-dc:Subject=holiday", "-XMP-xmp:Rating=4", path)
    streams = framemd5(path)
    assert _write(path, keywords=["bars"]) == ("xmp",)
    assert exiftool("-s3", "-XMP-dc:Subject", path).strip() == "holiday, bars"
    assert exiftool("-s3", "-XMP-xmp:Rating", path).strip() == "4"
    assert framemd5(path) == streams
    assert [t for t, _, _ in top_boxes(path)].count("uuid") == 1


def test_video_sidecar_mode_writes_name_ext_xmp_and_leaves_the_video_alone(originals: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    path = _copy(originals["mp4, moov at the end"], tmp_path)
    before = path.read_bytes()
    assert _write(path, config=MetadataConfig(video="sidecar")) == ("sidecar",)
    assert path.read_bytes() == before
    sidecar = tmp_path / "clip.mp4.xmp"
    assert CAPTION in exiftool("-s3", "-XMP-dc:Description", sidecar)
    assert read_metadata(path).description is not None


def test_a_video_changed_by_another_program_during_the_write_is_left_alone(originals: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    path = _copy(originals["mp4, +faststart"], tmp_path)
    snap = read_snapshot(path)

    def edit(target: Path) -> None:
        with open(target, "ab") as f:
            f.write(b"\x00\x00\x00\x08free")

    with pytest.raises(FileChanged):
        write_caption(path, CAPTION, PROV, MetadataConfig(), expected=snap, journal=Journal(tmp_path / ".j"),
                      hooks=WriteHooks(before_commit=edit))
    assert read_metadata(path).description is None
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_fragmented_mp4_whose_media_would_move_gets_a_sidecar_or_an_untouched_layout(tmp_path: Path) -> None:
    path = make_video(tmp_path / "frag.mp4", extra=("-movflags", "+frag_keyframe+empty_moov"))
    streams = framemd5(path)
    written = _write(path)
    assert written in (("xmp",), ("sidecar",))
    assert framemd5(path) == streams
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.text == CAPTION


def test_a_hard_linked_video_is_edited_in_place_and_stays_linked(originals: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(originals["mov, +faststart"], tmp_path)
    link = tmp_path / "album.mov"
    os.link(path, link)
    streams = framemd5(path)
    assert _write(path) == ("xmp",)
    assert os.stat(path).st_ino == os.stat(link).st_ino
    assert framemd5(link) == streams
    assert CAPTION in exiftool("-s3", "-XMP-dc:Description", link)
