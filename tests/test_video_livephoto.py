"""Live Photos and motion photos are one asset: the still is captioned once and found, its motion kept with it in
search and on the page; a motion photo's embedded video survives the caption write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient
from video_helpers import EXIFTOOL, FFMPEG, exiftool, framemd5, make_video

from capwatch.config import Config, IndexConfig, LibraryConfig, MetadataConfig, ModelConfig, RootConfig
from capwatch.library.index import Index
from capwatch.library.livephoto import motion_of, paired_motion_names, still_of
from capwatch.library.search import SearchFilters
from capwatch.metadata import Journal, Provenance, write_caption
from capwatch.models.captioner import open_captioner
from capwatch.web.app import ServeSettings, create_app
from tests.conftest import CliRunner

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not (FFMPEG and EXIFTOOL), reason="ffmpeg makes the videos, exiftool reads them")
MODEL = Path(__file__).parent / "fixtures" / "models" / "vit-gpt2-tiny-greedy"


def _live(folder: Path, stem: str = "IMG_0001") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    still = folder / f"{stem}.JPG"
    Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 50).convert("RGB").save(still, quality=90)
    motion = make_video(folder / f"{stem}.MOV", seconds=1.5)
    return still, motion


def test_pairs_are_found_by_name_in_any_letter_case(tmp_path: Path) -> None:
    still, motion = _live(tmp_path)
    assert motion_of(still) == motion and still_of(motion) == still
    assert motion_of(tmp_path / "other.jpg") is None
    names = ["IMG_1.heic", "img_1.mov", "IMG_2.MOV", "IMG_3.jpg", "IMG_3.mp4", "clip.mov"]
    assert paired_motion_names(names, frozenset({"heic", "jpg", "mov", "mp4"})) == {"img_1.mov", "IMG_3.mp4"}
    # A still capwatch does not look after leaves its video an asset of its own.
    assert paired_motion_names(names, frozenset({"mov"})) == set()


def test_a_live_photo_is_captioned_once_and_found_with_its_motion(run_cli: CliRunner, tmp_path: Path) -> None:
    library = tmp_path / "library"
    still, motion = _live(library)
    alone = make_video(library / "holiday.mov", seconds=1)
    motion_bytes = motion.read_bytes()
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "--model", MODEL, "scan", library)
    assert result.code == 0, result.err
    with Index.open(db, readonly=True) as index:
        paths = sorted(Path(r.path).name for r in index.iter_records(library))
    assert paths == ["IMG_0001.JPG", "holiday.mov"]
    assert motion.read_bytes() == motion_bytes  # the motion is not written to
    caption = exiftool("-s3", "-XMP-dc:Description", still).strip()
    assert caption and alone.exists()
    hits = [json.loads(line) for line in run_cli("--db", db, "search", "path:IMG_0001", "--json").out.splitlines()]
    assert [h["path"] for h in hits] == [str(still)]  # one asset, one hit
    hit = hits[0]
    assert hit["pair"] == str(motion) and hit["media"] == "image"
    # Asked for by name, the motion is still one asset with its still.
    direct = run_cli("--db", db, "--model", MODEL, "caption", "--json", motion)
    (row,) = [json.loads(line) for line in direct.out.splitlines()]
    assert row["written"] == [] and "Live Photo" in row["skipped"] and "IMG_0001.JPG" in row["skipped"]
    assert motion.read_bytes() == motion_bytes


def test_the_photo_page_shows_and_streams_the_motion(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _still, motion = _live(root)
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=tmp_path / "index.db"),
                    model=ModelConfig(dir=MODEL, precision="fp32"))
    from capwatch.library.scan import reconcile

    with Index.open(tmp_path / "index.db") as index:
        reconcile(config.library.roots[0], config, index)
        ids = {Path(r.path).name: i for i, r in index.browse(SearchFilters(), limit=10)}
    assert set(ids) == {"IMG_0001.JPG"}
    settings = ServeSettings(config=config, csrf="c" * 32, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(MODEL, config.model), live_state=lambda: None)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8765") as client:
        row = ids["IMG_0001.JPG"]
        page = client.get(f"/photo/{row}").text
        assert f'src="/live/{row}"' in page and "IMG_0001.MOV" in page
        data = motion.read_bytes()
        part = client.get(f"/live/{row}", headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == data[:100]
        assert part.headers["content-type"] == "video/quicktime"
        motion.unlink()
        assert client.get(f"/live/{row}").status_code == 404


def test_a_motion_photos_embedded_video_survives_the_caption_write(tmp_path: Path) -> None:
    clip = make_video(tmp_path / "clip.mp4", seconds=1)
    still = tmp_path / "still.jpg"
    Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 50).convert("RGB").save(still, quality=90)
    video = clip.read_bytes()
    exiftool("-q", "-overwrite_original", "-XMP-GCamera:MicroVideo=1",
             f"-XMP-GCamera:MicroVideoOffset={len(video)}", still)
    motion_photo = tmp_path / "PXL_0001.MP.jpg"
    motion_photo.write_bytes(still.read_bytes() + video)
    write_caption(motion_photo, "a fractal", Provenance("m", None, "2026-01-01T00:00:00Z"), MetadataConfig(),
                  journal=Journal(tmp_path / ".j"))
    data = motion_photo.read_bytes()
    assert data.endswith(video)
    offset = int(exiftool("-s3", "-XMP-GCamera:MicroVideoOffset", motion_photo).strip())
    embedded = tmp_path / "embedded.mp4"
    embedded.write_bytes(data[len(data) - offset :])
    assert framemd5(embedded) == framemd5(clip)
    assert exiftool("-s3", "-XMP-dc:Description", motion_photo).strip() == "a fractal"


def _apple_still(path: Path, content_id: str) -> Path:
    """A JPEG as an iPhone writes it, as far as pairing goes: Make Apple and an Apple iOS MakerNote holding the
    content identifier (tag 0x0011; exiftool 12.57 calls it MediaGroupUUID)."""
    import struct

    value = content_id.encode("ascii") + b"\x00"
    note = b"Apple iOS\x00" + b"\x00\x01" + b"MM"
    note += struct.pack(">H", 1) + struct.pack(">HHII", 0x0011, 2, len(value), 14 + 2 + 12 + 4)
    note += struct.pack(">I", 0) + value
    exif = Image.Exif()
    exif[0x010F] = "Apple"
    exif.get_ifd(0x8769)[0x927C] = note
    Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 50).convert("RGB").save(path, exif=exif, quality=90)
    return path


def test_a_live_photo_renamed_apart_pairs_by_its_content_identifier(run_cli: CliRunner, tmp_path: Path) -> None:
    import subprocess

    from capwatch.metadata import read_metadata

    library = tmp_path / "library"
    library.mkdir()
    uuid = "5A2B7C3D-1E2F-4A5B-8C9D-0E1F2A3B4C5D"
    still = _apple_still(library / "Beach day.jpg", uuid)
    plain = make_video(tmp_path / "plain.mov", seconds=1)
    motion = library / "IMG_0001 (export).mov"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(plain), "-c", "copy", "-movflags", "use_metadata_tags",
                    "-metadata", f"com.apple.quicktime.content.identifier={uuid}", str(motion)], check=True)
    other = make_video(library / "other.mov", seconds=1)
    # The independent reader sees the same identifier on both sides.
    assert uuid in exiftool("-s3", "-Apple:all", still) and uuid in exiftool("-s3", "-Keys:ContentIdentifier", motion)
    assert read_metadata(still).content_identifier == uuid == read_metadata(motion).content_identifier
    motion_bytes = motion.read_bytes()
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "--model", MODEL, "scan", library)
    assert result.code == 0, result.err
    with Index.open(db, readonly=True) as index:
        assert sorted(Path(r.path).name for r in index.iter_records(library)) == ["Beach day.jpg", "other.mov"]
    assert motion.read_bytes() == motion_bytes
    assert exiftool("-s3", "-XMP-dc:Description", other).strip()


def test_a_live_photo_paired_by_content_identifier_is_shown_together_in_search_and_on_the_page(
        run_cli: CliRunner, tmp_path: Path) -> None:
    import subprocess

    library = tmp_path / "library"
    library.mkdir()
    uuid = "0F1E2D3C-4B5A-4968-8776-A5B4C3D2E1F0"
    still = _apple_still(library / "Beach day.jpg", uuid)
    plain = make_video(tmp_path / "plain.mov", seconds=1)
    motion = library / "IMG_0001 (export).mov"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(plain), "-c", "copy", "-movflags", "use_metadata_tags",
                    "-metadata", f"com.apple.quicktime.content.identifier={uuid}", str(motion)], check=True)
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "--model", MODEL, "scan", library).code == 0
    # Search gives the pair, as for a pair by name (JSON and text).
    hits = [json.loads(line) for line in run_cli("--db", db, "search", "path:Beach", "--json").out.splitlines()]
    assert [(h["path"], h["pair"]) for h in hits] == [(str(still), str(motion))]
    assert "Live Photo with IMG_0001 (export).mov" in run_cli("--db", db, "search", "path:Beach").out
    # The page marks the tile and plays the motion beside the still.
    config = Config(library=LibraryConfig(roots=(RootConfig(library),)), index=IndexConfig(path=db),
                    model=ModelConfig(dir=MODEL, precision="fp32"))
    settings = ServeSettings(config=config, csrf="c" * 32, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(MODEL, config.model), live_state=lambda: None)
    with Index.open(db, readonly=True) as index:
        row = index.ids_for([str(still)])[str(still)]
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8765") as client:
        assert "◉ live" in client.get("/?q=path:Beach").text
        page = client.get(f"/photo/{row}").text
        assert f'src="/live/{row}"' in page and "IMG_0001 (export).mov" in page
        part = client.get(f"/live/{row}", headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == motion.read_bytes()[:100]
        # Gone from disk: no longer shown as a pair.
        motion.unlink()
        assert client.get(f"/live/{row}").status_code == 404
        assert "◉ live" not in client.get("/?q=path:Beach").text
    hits = [json.loads(line) for line in run_cli("--db", db, "search", "path:Beach", "--json").out.splitlines()]
    assert hits[0]["pair"] is None
