"""Group-committed writes: a batch of files written with one journal entry, one fsync pass and one fsync per
directory must land exactly what one-at-a-time writes land, refuse exactly the files that changed, and recover
from a kill at any point."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import metadata_corpus as mc
import pytest
from daemon_helpers import wait_until

from capwatch.config import MetadataConfig
from capwatch.metadata import (
    CaptionWrite,
    FileChanged,
    Journal,
    Provenance,
    WriteResult,
    is_temp_file,
    read_metadata,
    read_snapshot,
    write_caption,
    write_captions,
)
from capwatch.metadata.fsops import exchange
from capwatch.metadata.identity import FileIdentity, fingerprint_file

pytestmark = pytest.mark.skipif(not (mc.EXIFTOOL and mc.EXIV2), reason="exiftool and exiv2 are the reference readers")

REPO = Path(__file__).resolve().parent.parent
PROV = Provenance("tiny/model", "rev1", "2026-03-01T12:00:00Z")
EMBEDDED = MetadataConfig()


def _library(folder: Path) -> list[Path]:
    """One of each kind of write a batch can hold: embedded JPEG/PNG/WebP by rename, a person's description,
    a hard-linked JPEG (edited in place), a TIFF (sidecar), in two directories."""
    sub = folder / "sub"
    sub.mkdir(parents=True)
    files = [mc.make_jpeg(folder / "a.jpg"), mc.make_png(folder / "b.png"), mc.make_webp(sub / "c.webp"),
             mc.make_jpeg(sub / "person.jpg"), mc.make_jpeg(folder / "linked.jpg"), mc.make_tiff(folder / "d.tif")]
    mc.exiftool("-overwrite_original", "-XMP-dc:Description=Grandma's garden, 1987", "-IPTC:Keywords=garden",
                files[3])
    os.link(files[4], folder / "linked-too.jpg")
    return files


def _captions(files: list[Path]) -> list[str]:
    return [f"caption {n} for {p.name} – ü & <b>" for n, p in enumerate(files)]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_group_commit_lands_the_same_bytes_as_one_file_at_a_time(tmp_path: Path) -> None:
    one, group = tmp_path / "one" / "lib", tmp_path / "group" / "lib"
    files_one = _library(one)
    shutil.copytree(one, group)  # the same bytes in both (the hard link is made again below)
    files_group = [group / p.relative_to(one) for p in files_one]
    (group / "linked-too.jpg").unlink()
    os.link(group / "linked.jpg", group / "linked-too.jpg")
    captions = _captions(files_one)

    singles = [write_caption(p, c, PROV, EMBEDDED, journal=Journal(tmp_path / "j1")) for p, c in
               zip(files_one, captions, strict=True)]
    snaps = [read_snapshot(p) for p in files_group]
    batch = write_captions([CaptionWrite(p, c, PROV, s) for p, c, s in zip(files_group, captions, snaps,
                                                                            strict=True)],
                           EMBEDDED, journal=Journal(tmp_path / "j2"))

    assert all(isinstance(r, WriteResult) for r in batch), batch
    assert [(r.written, r.skipped) for r in batch if isinstance(r, WriteResult)] == \
        [(r.written, r.skipped) for r in singles]
    assert _tree(group) == _tree(one)
    assert os.stat(group / "linked.jpg").st_ino == os.stat(group / "linked-too.jpg").st_ino  # still one inode
    assert mc.exiftool("-s3", "-XMP-dc:Description", group / "a.jpg").strip() == captions[0]
    assert mc.exiftool("-s3", "-XMP-dc:Description", group / "sub" / "person.jpg").strip() == \
        "Grandma's garden, 1987"
    assert mc.exiv2_fields(group / "sub" / "c.webp")["Xmp.dc.description"].endswith(captions[2])
    assert not list((tmp_path / "j2").glob("*.json"))
    assert not [p for p in group.rglob("*") if is_temp_file(p.name)]


def test_files_edited_right_before_their_turn_are_left_as_the_editors_made_them_and_the_rest_land(
        tmp_path: Path) -> None:
    files = [mc.make_jpeg(tmp_path / f"{n}.jpg") for n in range(5)]
    replaced, in_place = files[1], files[3]
    edited: dict[Path, bytes] = {}

    def editor(path: Path) -> None:
        # Real edits at the worst moment: every temp file of the group is complete and durable. One editor
        # replaces the file (exiftool); the other patches it in place and puts size and mtime back, so only the
        # ctime and the content tell.
        assert sum(is_temp_file(n) for n in os.listdir(tmp_path)) >= 1
        if path == replaced:
            mc.exiftool("-overwrite_original", "-XMP-dc:Description=Edited by a person", path)
        elif path == in_place:
            st = os.stat(path)
            with open(path, "r+b") as f:
                f.seek(14)
                f.write(b"\x00\x48")  # JFIF density: 72 dpi
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            return
        edited[path] = path.read_bytes()

    from capwatch.metadata import WriteHooks
    snaps = [read_snapshot(p) for p in files]
    results = write_captions([CaptionWrite(p, f"model caption {p.stem}", PROV, s) for p, s in
                              zip(files, snaps, strict=True)],
                             EMBEDDED, journal=Journal(tmp_path / "journal"), hooks=WriteHooks(before_commit=editor))

    assert set(edited) == {replaced, in_place}
    for path in edited:
        assert isinstance(results[files.index(path)], FileChanged)
        assert path.read_bytes() == edited[path]
    for n in (0, 2, 4):
        result = results[n]
        assert isinstance(result, WriteResult) and result.written, result
        assert read_metadata(files[n]).description is not None
        assert mc.exiftool("-s3", "-XMP-dc:Description", files[n]).strip() == f"model caption {n}"
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in files] + ["journal"])
    assert not list((tmp_path / "journal").glob("*.json"))


def test_a_file_changed_since_it_was_read_is_refused_before_the_group_starts(tmp_path: Path) -> None:
    files = [mc.make_jpeg(tmp_path / f"{n}.jpg") for n in range(3)]
    snaps = [read_snapshot(p) for p in files]
    mc.exiftool("-overwrite_original", "-Artist=Someone", files[0])
    before = files[0].read_bytes()
    results = write_captions([CaptionWrite(p, "a caption", PROV, s) for p, s in zip(files, snaps, strict=True)],
                             EMBEDDED, journal=Journal(tmp_path / "journal"))
    assert isinstance(results[0], FileChanged)
    assert files[0].read_bytes() == before
    assert all(isinstance(r, WriteResult) and r.written for r in results[1:])


def test_kill_9_between_two_commits_of_a_group_keeps_the_landed_file_and_recovery_removes_the_rest(
        tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    first, second = mc.make_jpeg(photos / "first.jpg"), mc.make_jpeg(photos / "second.jpg")
    original_second = second.read_bytes()
    ready, journal = tmp_path / "ready", tmp_path / "journal"
    code = f"""
        import pathlib, time
        from capwatch.config import MetadataConfig
        from capwatch.metadata import CaptionWrite, Journal, Provenance, WriteHooks, write_captions
        def hold(path):
            if path.name == "second.jpg":  # the first file has landed; the second's temp file is complete
                pathlib.Path({str(ready)!r}).touch()
                time.sleep(120)
        prov = Provenance("tiny/model", "rev1", "2026-03-01T12:00:00Z")
        write_captions([CaptionWrite(pathlib.Path(p), "a caption " + pathlib.Path(p).name, prov) for p in
                        ({str(first)!r}, {str(second)!r})], MetadataConfig(),
                       journal=Journal(pathlib.Path({str(journal)!r})), hooks=WriteHooks(before_commit=hold))
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            start_new_session=True)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, what="the second commit")
        assert ready.exists(), proc.returncode
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert [n for n in os.listdir(photos) if is_temp_file(n)]  # the second file's temp file is left behind
    assert len(list(journal.glob("*.json"))) == 1

    report = Journal(journal).recover()

    assert report.settled == 1 and report.removed == 1 and not report.kept, report
    assert sorted(os.listdir(photos)) == ["first.jpg", "second.jpg"]
    assert not list(journal.glob("*.json"))
    assert mc.exiftool("-s3", "-XMP-dc:Description", first).strip() == "a caption first.jpg"
    assert second.read_bytes() == original_second


def _identity(path: Path) -> FileIdentity:
    return FileIdentity.of(os.stat(path), fingerprint_file(path))


def test_recovery_resolves_each_file_of_a_group_entry_by_inode(tmp_path: Path) -> None:
    """The three states a kill can leave a member in, in one entry: exchanged but not settled (the temp name holds
    the file we read), not exchanged (the temp name holds ours), another program's file swapped out at that
    instant (it goes back)."""
    names = ("exchanged", "pending", "raced")
    targets = {n: tmp_path / f"{n}.jpg" for n in names}
    temps = {n: tmp_path / f".{n}.jpg.capwatch-1-0000000{i}.tmp" for i, n in enumerate(names)}
    for n in names:
        targets[n].write_bytes(b"old " + n.encode())
    expected = {n: _identity(targets[n]) for n in names}
    journal = Journal(tmp_path / "journal")
    entry = journal.replace_group([(targets[n], temps[n], expected[n]) for n in names])
    for n in names:
        temps[n].write_bytes(b"new " + n.encode())
    entry.note({"temp_inodes": {str(i): [os.stat(temps[n]).st_dev, os.stat(temps[n]).st_ino]
                                for i, n in enumerate(names)}})
    assert exchange(temps["exchanged"], targets["exchanged"])
    # "raced": another program replaced the target just before our exchange, which then swapped its file out.
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"their version")
    os.replace(theirs, targets["raced"])
    assert exchange(temps["raced"], targets["raced"])
    entry.abandon()  # as a kill would

    report = journal.recover()

    assert report.settled == 1 and not report.kept, report
    assert report.restored == (str(targets["raced"]),)
    assert targets["exchanged"].read_bytes() == b"new exchanged"
    assert targets["pending"].read_bytes() == b"old pending"
    assert targets["raced"].read_bytes() == b"their version"
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p.name)]
    assert not list((tmp_path / "journal").glob("*.json"))
