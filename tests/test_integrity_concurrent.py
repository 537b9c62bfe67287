"""Writes are transactions against the file as read: concurrent editors driven through the documented hooks
($CAPWATCH_HOOK_BEFORE_WRITE: while the model runs; $CAPWATCH_HOOK_BEFORE_COMMIT: right before the final check
and rename), with the real CLI and daemon in subprocesses and exiftool / sqlite3 as independent readers."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import IMAGES, MODELS, rows, start_daemon, stop_daemon, wait_until, write_config
from metadata_corpus import EXIFTOOL, EXIV2, exiftool, make_tiff, xmp_packet

from tests.conftest import CliResult, CliRunner, assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
MODEL = MODELS / "vit-gpt2-tiny-greedy"
ENV = {"PYTHONPATH": str(REPO)}  # the tree under test, not whatever capwatch is installed

pytestmark = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool is the independent reader")

PREAMBLE = """\
import os, shutil, subprocess, sys
path = sys.argv[-1]
log = {log!r}
n = len(open(log).read().splitlines()) if os.path.exists(log) else 0
if {once!r} and n:
    sys.exit(0)
with open(log, "a") as f:
    f.write(path + "\\n")
"""


def hook(tmp_path: Path, name: str, body: str, *, once: bool = True) -> tuple[str, Path]:
    """A hook command running ``body`` (with ``path``, ``n`` = earlier runs) and the log of its runs."""
    folder = tmp_path / "hooks"
    folder.mkdir(exist_ok=True)
    log = folder / f"{name}.runs"
    script = folder / f"{name}.py"
    script.write_text(PREAMBLE.format(log=str(log), once=once) + body)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}", log


def runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def photo(folder: Path, source: str = "blobs.jpg", name: str = "photo.jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(IMAGES / source, folder / name))


def caption_of(run_cli: CliRunner, tmp_path: Path, source: Path) -> str:
    """The caption the model gives ``source`` (a pristine copy, dry run)."""
    (tmp_path / "pristine").mkdir(exist_ok=True)
    pristine = Path(shutil.copyfile(source, tmp_path / "pristine" / source.name))
    result = run_cli("--model", MODEL, "caption", "--dry-run", "--json", pristine, env=ENV)
    assert result.code == 0, result.err
    return json.loads(result.out)["caption"]


def caption(run_cli: CliRunner, db: Path, *files: Path, env: dict[str, str] | None = None) -> CliResult:
    return run_cli("--db", db, "--model", MODEL, "caption", *files, env={**ENV, **(env or {})})


def tag(path: Path, name: str) -> str | None:
    """One tag as exiftool reads it (``-j -charset UTF8``)."""
    return json.loads(exiftool("-j", "-charset", "UTF8", f"-{name}", path))[0].get(name.split(":")[-1])


def search(run_cli: CliRunner, db: Path, word: str) -> list[dict[str, object]]:
    result = run_cli("--db", db, "search", word, "--json", env=ENV)
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def row(db: Path, path: Path) -> tuple[object, ...] | None:
    """(status, caption, source, fingerprint) of ``path`` read with sqlite3."""
    found = rows(db)
    return found.get(str(path)) or found.get(os.path.realpath(path))


@pytest.mark.parametrize("variable", ["CAPWATCH_HOOK_BEFORE_WRITE", "CAPWATCH_HOOK_BEFORE_COMMIT"])
def test_a_file_replaced_by_rename_while_captioning_gets_the_caption_of_the_new_image(
        run_cli: CliRunner, tmp_path: Path, variable: str) -> None:
    target = photo(tmp_path / "photos")
    new_image = IMAGES / "gradient.jpg"
    command, log = hook(tmp_path, "reexport", f"""
tmp = os.path.join(os.path.dirname(path), ".lightroom-export.tmp")
shutil.copyfile({str(new_image)!r}, tmp)
os.replace(tmp, path)
""")
    expected, old = caption_of(run_cli, tmp_path, new_image), caption_of(run_cli, tmp_path, IMAGES / "blobs.jpg")
    assert expected != old
    db = tmp_path / "index.db"
    result = caption(run_cli, db, target, env={variable: command})
    assert result.code == 0, result.err
    assert tag(target, "XMP-dc:Description") == expected != old
    assert tag(target, "IFD0:ImageDescription") == expected
    assert (row(db, target) or ())[1:3] == (expected, "model")
    assert sorted(p.name for p in target.parent.iterdir()) == ["photo.jpg"]
    assert runs(log) == 1


@pytest.mark.parametrize("variable", ["CAPWATCH_HOOK_BEFORE_WRITE", "CAPWATCH_HOOK_BEFORE_COMMIT"])
def test_a_file_replaced_on_every_attempt_is_left_alone_with_one_error_line(
        run_cli: CliRunner, tmp_path: Path, variable: str) -> None:
    target = photo(tmp_path / "photos")
    last = tmp_path / "last-replacement"
    command, log = hook(tmp_path, "always", f"""
source = [{str(IMAGES / "gradient.jpg")!r}, {str(IMAGES / "blobs.jpg")!r}][n % 2]
tmp = path + ".part"
shutil.copyfile(source, tmp)
os.replace(tmp, path)
shutil.copyfile(source, {str(last)!r})
""", once=False)
    db = tmp_path / "index.db"
    result = caption(run_cli, db, target, env={variable: command})
    line = assert_one_line_error(result, code=1)
    assert "kept changing" in line and str(target) in line, line
    assert target.read_bytes() == last.read_bytes()  # exactly their last version: nothing written
    assert sorted(p.name for p in target.parent.iterdir()) == ["photo.jpg"]  # no .photo.jpg.capwatch-*.tmp
    assert tag(target, "XMP-dc:Description") is None
    assert row(db, target) is None  # nothing recorded either: the next run takes it
    assert runs(log) == 3


PATCH_IN_PLACE = """
st = os.stat(path)
with open(path, "r+b") as f:
    data = f.read()
    f.seek(data.index(b"John Smith"))
    f.write(b"Jane Smith")
os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
after = os.stat(path)
assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
"""


@pytest.mark.parametrize("editor", ["in-place-same-size-and-mtime", "in-place-hard-linked", "exiv2 -k"])
def test_an_edit_keeping_mtime_just_before_the_commit_survives_and_the_caption_is_written(
        run_cli: CliRunner, tmp_path: Path, editor: str) -> None:
    if editor.startswith("exiv2") and EXIV2 is None:
        pytest.skip("exiv2 is not installed")
    target = photo(tmp_path / "photos")
    exiftool("-q", "-overwrite_original", "-Artist=John Smith", "-Make=Canon", target)
    if editor == "in-place-hard-linked":  # a second link: capwatch must edit in place (backup, check, overwrite)
        (tmp_path / "elsewhere").mkdir()
        os.link(target, tmp_path / "elsewhere" / "same.jpg")
    if editor.startswith("exiv2"):
        body, theirs = f"subprocess.run([{EXIV2!r}, '-k', '-M', 'set Exif.Image.Artist Jane Doe', 'mo', path], " \
                       "check=True)\n", "Jane Doe"
    else:
        body, theirs = PATCH_IN_PLACE, "Jane Smith"
    command, log = hook(tmp_path, "editor", body)
    expected = caption_of(run_cli, tmp_path, IMAGES / "blobs.jpg")
    db = tmp_path / "index.db"
    result = caption(run_cli, db, target, env={"CAPWATCH_HOOK_BEFORE_COMMIT": command})
    assert result.code == 0, result.err
    assert tag(target, "IFD0:Artist") == theirs  # their edit survived
    assert tag(target, "IFD0:Make") == "Canon"
    assert tag(target, "XMP-dc:Description") == expected  # and the caption was written on a fresh read
    assert (row(db, target) or ())[1:3] == (expected, "model")
    assert sorted(p.name for p in target.parent.iterdir()) == ["photo.jpg"]
    if editor == "in-place-hard-linked":
        assert (tmp_path / "elsewhere" / "same.jpg").stat().st_ino == target.stat().st_ino
    assert runs(log) == 1


def test_a_description_a_person_writes_while_the_model_runs_is_kept_and_searchable(
        run_cli: CliRunner, tmp_path: Path) -> None:
    target = photo(tmp_path / "photos")
    words = "Grandma's cat on the sofa"
    command, log = hook(tmp_path, "person", f"""
subprocess.run([{EXIFTOOL!r}, "-q", "-overwrite_original", "-P", "-XMP-dc:Description=" + {words!r}, path],
               check=True)
""")
    db = tmp_path / "index.db"
    result = caption(run_cli, db, target, env={"CAPWATCH_HOOK_BEFORE_WRITE": command})
    assert result.code == 0, result.err
    assert tag(target, "XMP-dc:Description") == words
    hits = search(run_cli, db, "Grandma")
    assert [(Path(h["path"]).resolve(), h["caption"], h["source"]) for h in hits] == \
        [(target.resolve(), words, "human")]
    status = run_cli("--db", db, "status", "--json", env=ENV)
    assert status.code == 0, status.err
    assert json.loads(status.out)["errors"] == 0
    assert runs(log) == 1


def description_xmp(words: str) -> bytes:
    return xmp_packet('<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
                      f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{words}</rdf:li></rdf:Alt>'
                      "</dc:description></rdf:Description>") + b"\n"


FIRST_WORDS, SECOND_WORDS, SAME_SIZE_WORDS = "Grandma knitting scarves", "Uncle rowing a boat", \
    "Grandpa mending fishnets"
assert len(FIRST_WORDS) == len(SAME_SIZE_WORDS) != len(SECOND_WORDS)


def edit_sidecar(sidecar: Path, words: str, *, in_place: bool) -> None:
    """A person edits the sidecar: a new file renamed over it, or the same bytes count in place with the old
    mtime put back (only ctime and content move)."""
    data = description_xmp(words)
    if not in_place:
        sidecar.with_name("xmp.part").write_bytes(data)
        os.replace(sidecar.with_name("xmp.part"), sidecar)
        return
    st = sidecar.stat()
    assert st.st_size == len(data)
    with open(sidecar, "r+b") as f:
        f.write(data)
    os.utime(sidecar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (sidecar.stat().st_size, sidecar.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def found_as_human(run_cli: CliRunner, db: Path, word: str, tif: Path) -> bool:
    return [(Path(h["path"]).resolve(), h["source"]) for h in search(run_cli, db, word)] == [(tif.resolve(), "human")]


@pytest.mark.parametrize("second_edit", ["renamed-over-new-size", "in-place-same-size-and-mtime"])
def test_an_edited_sidecar_is_noticed_by_a_later_scan(run_cli: CliRunner, tmp_path: Path, second_edit: str) -> None:
    root = tmp_path / "library"
    root.mkdir()
    tif = make_tiff(root / "x.tif")
    image_before = (tif.read_bytes(), tif.stat().st_mtime_ns)
    db = tmp_path / "index.db"
    scan = ("--db", db, "scan", root, "--no-caption")
    assert run_cli(*scan, env=ENV).code == 0
    assert row(db, tif) is not None and row(db, tif)[1] is None
    sidecar = root / "x.tif.xmp"
    edit_sidecar(sidecar, FIRST_WORDS, in_place=False)
    result = run_cli(*scan, env=ENV)
    assert result.code == 0, result.err
    assert found_as_human(run_cli, db, "knitting", tif)
    in_place = second_edit.startswith("in-place")
    words = SAME_SIZE_WORDS if in_place else SECOND_WORDS
    edit_sidecar(sidecar, words, in_place=in_place)
    result = run_cli(*scan, env=ENV)
    assert result.code == 0, result.err
    assert found_as_human(run_cli, db, words.split()[1], tif)
    assert search(run_cli, db, "knitting") == []
    assert row(db, tif)[1:3] == (words, "human")
    assert (tif.read_bytes(), tif.stat().st_mtime_ns) == image_before  # the image itself never touched


def test_an_edited_sidecar_is_noticed_by_the_daemon(tmp_path: Path) -> None:
    root = tmp_path / "library"
    root.mkdir()
    tif = make_tiff(root / "x.tif")
    db = tmp_path / "index.db"
    config = write_config(tmp_path / "config.toml", db=db, roots=[root])
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, caption=False, log=log, env=ENV)
    try:
        wait_until(lambda: row(db, tif) is not None, what="the TIFF's row")
        sidecar = root / "x.tif.xmp"
        edit_sidecar(sidecar, FIRST_WORDS, in_place=False)
        wait_until(lambda: (row(db, tif) or ())[1:3] == (FIRST_WORDS, "human"), what=f"the sidecar's words\n"
                   f"{log.read_text() if log.exists() else ''}")
        edit_sidecar(sidecar, SAME_SIZE_WORDS, in_place=True)
        wait_until(lambda: (row(db, tif) or ())[1:3] == (SAME_SIZE_WORDS, "human"), what="the in-place edit")
        assert stop_daemon(proc) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_captioning_again_leaves_the_sidecar_byte_identical(run_cli: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    tif = make_tiff(tmp_path / "photos" / "x.tif")
    db = tmp_path / "index.db"
    first = caption(run_cli, db, tif)
    assert first.code == 0, first.err
    sidecar = tif.with_name("x.tif.xmp")
    before = (sidecar.read_bytes(), sidecar.stat().st_ino, sidecar.stat().st_mtime_ns, sidecar.stat().st_ctime_ns)
    assert tag(sidecar, "XMP-dc:Description")
    started = int(time.time())
    wait_until(lambda: int(time.time()) > started, timeout=2, what="the next second")  # a new CreatedAt if rewritten
    second = caption(run_cli, db, tif)
    assert second.code == 0, second.err
    after = (sidecar.read_bytes(), sidecar.stat().st_ino, sidecar.stat().st_mtime_ns, sidecar.stat().st_ctime_ns)
    assert after == before
    assert sorted(p.name for p in tif.parent.iterdir()) == ["x.tif", "x.tif.xmp"]


@pytest.mark.parametrize("name", ["photo.jpg", "photo.tif"])
def test_captioning_a_symlink_writes_the_target_and_the_link_stays(
        run_cli: CliRunner, tmp_path: Path, name: str) -> None:
    real, links = tmp_path / "real", tmp_path / "links"
    links.mkdir()
    real.mkdir()
    target = photo(real, name=name) if name.endswith(".jpg") else make_tiff(real / name)
    link = links / f"link{target.suffix}"
    link.symlink_to(os.path.join("..", "real", name))
    image_bytes = target.read_bytes()
    expected = caption_of(run_cli, tmp_path, target)
    db = tmp_path / "index.db"
    result = caption(run_cli, db, link)
    assert result.code == 0, result.err
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "real", name)
    assert sorted(p.name for p in links.iterdir()) == [link.name]
    if name.endswith(".jpg"):
        assert sorted(p.name for p in real.iterdir()) == [name]
        assert tag(target, "XMP-dc:Description") == expected
    else:
        assert sorted(p.name for p in real.iterdir()) == [name, f"{name}.xmp"]
        assert target.read_bytes() == image_bytes
        assert tag(real / f"{name}.xmp", "XMP-dc:Description") == expected
