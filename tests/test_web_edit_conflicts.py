"""A caption saved from the page is an optimistic transaction: words written into the file after the page was
loaded (or while no daemon kept the index up to date) are never overwritten; a conflict page shows both texts and
lets the person choose. A real `capwatch serve` on 127.0.0.1, exiftool as the other writer and as the reader."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from capwatch.library.index import Index
from capwatch.library.scan import reconcile
from capwatch.metadata import Provenance, write_caption
from tests.web_helpers import RED_CAPTION, Library, Served, build_library, start_serve, write_config

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
B_WORDS = "Grandma's cat Mimi on the red bike"


class Forms(HTMLParser):
    """The POST forms of a page: [(action, {name: value})] of their hidden inputs, plus whether a textarea."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and a.get("method") == "post":
            self.forms.append((a["action"], {}))
        elif tag == "input" and self.forms and a.get("type") == "hidden":
            self.forms[-1][1][a["name"]] = a.get("value", "")


def forms_of(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = Forms()
    parser.feed(html)
    return parser.forms


def choice_form(html: str, choice: str) -> tuple[str, dict[str, str]]:
    found = [(action, fields) for action, fields in forms_of(html) if fields.get("choice") == choice]
    assert len(found) == 1, (choice, forms_of(html))
    return found[0]


def fields(path: Path, *extra: str) -> dict[str, str]:
    """EXIF, XMP and IPTC description as exiftool reads them (and the ``extra`` tags)."""
    out = subprocess.run(["exiftool", "-j", "-G1", "-a", "-IFD0:ImageDescription", "-XMP-dc:Description",
                          "-IPTC:Caption-Abstract", *(f"-{t}" for t in extra), str(path)],
                         capture_output=True, text=True, check=True).stdout
    return {k: str(v) for k, v in json.loads(out)[0].items() if k != "SourceFile"}


def exiftool_writes(path: Path, text: str, *tags: str) -> None:
    subprocess.run(["exiftool", "-q", "-overwrite_original", *(f"-{t}={text}" for t in tags), str(path)],
                   check=True)


ALL = ("EXIF:ImageDescription", "XMP-dc:Description", "IPTC:Caption-Abstract")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Library, Served]]:
    lib = build_library(tmp_path)
    # red.jpg gets IPTC too (a person's keyword), then capwatch's caption again so all three places hold it.
    red = lib.path("red.jpg")
    exiftool_writes(red, "bike", "IPTC:Keywords")
    write_caption(red, RED_CAPTION, Provenance("vit-gpt2-tiny-greedy", None, "2024-05-01T10:00:00Z"),
                  lib.config.metadata)
    with Index.open(lib.config.index_path()) as index:
        reconcile(lib.config.library.roots[0], lib.config, index)
    assert fields(red, "XMP-capwatch:Source") == {
        "IFD0:ImageDescription": RED_CAPTION, "XMP-dc:Description": RED_CAPTION, "IPTC:Caption-Abstract": RED_CAPTION,
        "XMP-capwatch:Source": "capwatch"}
    server = start_serve(tmp_path, write_config(lib, tmp_path))
    try:
        yield lib, server
    finally:
        server.stop()


def edit_form(html: str) -> tuple[str, dict[str, str]]:
    (found,) = [(a, f) for a, f in forms_of(html) if a.endswith("/caption")]
    return found


def test_words_written_after_the_page_loaded_are_kept_and_shown_beside_mine(served: tuple[Library, Served]) -> None:
    lib, server = served
    red, row = lib.path("red.jpg"), lib.ids["red.jpg"]
    page = server.get(f"/photo/{row}")
    assert page.status == 200
    action, form = edit_form(page.text)
    # Person B writes while A's page is open (exiftool, as any other program would).
    exiftool_writes(red, B_WORDS, *ALL)
    b_bytes = red.read_bytes()
    # A client that sends only the caption (a script, an old page) is checked against what the page shows.
    bare = server.post(action, {"csrf": form["csrf"], "caption": "overwrite"})
    assert bare.status == 409 and red.read_bytes() == b_bytes
    answer = server.post(action, {**form, "caption": "A red bicycle, summer 2020"})
    assert answer.status == 409, answer.text
    assert fields(red) == {"IFD0:ImageDescription": B_WORDS, "XMP-dc:Description": B_WORDS,
                           "IPTC:Caption-Abstract": B_WORDS}
    assert red.read_bytes() == b_bytes
    html = answer.text
    assert "Grandma&#39;s cat Mimi on the red bike" in html and "A red bicycle, summer 2020" in html
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, "no inline script (the CSP forbids it)"
    for choice in ("keep", "mine", "edit"):
        target, hidden = choice_form(html, choice)
        assert target == f"/photo/{row}/caption" and hidden["csrf"] == form["csrf"]
    # The same form sent again is still checked against what its page showed.
    assert server.post(action, {**form, "caption": "again"}).status == 409
    assert red.read_bytes() == b_bytes


def test_a_stale_index_is_no_licence_to_overwrite(served: tuple[Library, Served]) -> None:
    lib, server = served
    red, row = lib.path("red.jpg"), lib.ids["red.jpg"]
    # Lightroom writes while no daemon runs: the index still says capwatch's caption, and so does the page.
    exiftool_writes(red, B_WORDS, "XMP-dc:Description")
    page = server.get(f"/photo/{row}")
    assert RED_CAPTION in page.text
    action, form = edit_form(page.text)
    answer = server.post(action, {**form, "caption": "mine"})
    assert answer.status == 409, answer.text
    assert fields(red)["XMP-dc:Description"] == B_WORDS
    # The conflict taught the index what the file holds: the photo page shows B's words now.
    assert "Grandma&#39;s cat Mimi" in server.get(f"/photo/{row}").text


def test_a_persons_words_in_one_field_only_are_not_lost(served: tuple[Library, Served]) -> None:
    lib, server = served
    red, row = lib.path("red.jpg"), lib.ids["red.jpg"]
    action, form = edit_form(server.get(f"/photo/{row}").text)
    # Only IPTC changes (a non-MWG tool); EXIF and XMP still hold capwatch's caption.
    exiftool_writes(red, B_WORDS, "IPTC:Caption-Abstract")
    answer = server.post(action, {**form, "caption": "mine"})
    assert answer.status == 409 and "IPTC Caption-Abstract" in answer.text
    assert fields(red)["IPTC:Caption-Abstract"] == B_WORDS


def test_conflict_choices_keep_edit_and_replace_which_is_checked_again(served: tuple[Library, Served]) -> None:
    lib, server = served
    red, row = lib.path("red.jpg"), lib.ids["red.jpg"]
    action, form = edit_form(server.get(f"/photo/{row}").text)
    exiftool_writes(red, B_WORDS, *ALL)
    conflict = server.post(action, {**form, "caption": "Anna's words"}).text

    # Keep theirs: nothing written, the page says so.
    before = red.read_bytes()
    target, hidden = choice_form(conflict, "keep")
    kept = server.post(target, hidden)
    assert kept.status == 303 and kept.headers["location"] == f"/photo/{row}?done=kept"
    assert red.read_bytes() == before

    # Edit again: the photo page with my draft, the file's words listed, and a form that carries them.
    target, hidden = choice_form(conflict, "edit")
    again = server.post(target, hidden)
    assert again.status == 200 and "Anna&#39;s words</textarea>" in again.text
    assert 'id="in-file"' in again.text and "Grandma&#39;s cat Mimi" in again.text
    assert red.read_bytes() == before

    # Replace with mine, but a third writer got there first: a new conflict, C's words kept.
    target, hidden = choice_form(conflict, "mine")
    exiftool_writes(red, "C was here", "XMP-dc:Description")
    second = server.post(target, hidden)
    assert second.status == 409 and "C was here" in second.text
    assert fields(red)["XMP-dc:Description"] == "C was here"

    # Replace with mine from the page that showed C's words too: written everywhere, as a person's words.
    target, hidden = choice_form(second.text, "mine")
    done = server.post(target, hidden)
    assert done.status == 303 and done.headers["location"] == f"/photo/{row}?done=saved"
    assert fields(red, "XMP-capwatch:Source") == {
        "IFD0:ImageDescription": "Anna's words", "XMP-dc:Description": "Anna's words",
        "IPTC:Caption-Abstract": "Anna's words"}  # and no capwatch provenance: a person's words

    # And "edit again" then save goes through when nobody wrote meanwhile.
    action, form = edit_form(again.text)
    exiftool_writes(red, "D's words", *ALL)
    assert server.post(action, {**form, "caption": "late"}).status == 409
    assert fields(red)["XMP-dc:Description"] == "D's words"


def test_an_unchanged_file_is_saved_from_the_page(served: tuple[Library, Served]) -> None:
    lib, server = served
    red, row = lib.path("red.jpg"), lib.ids["red.jpg"]
    action, form = edit_form(server.get(f"/photo/{row}").text)
    answer = server.post(action, {**form, "caption": "Anna's red bike"})
    assert answer.status == 303, answer.text
    assert fields(red) == {"IFD0:ImageDescription": "Anna's red bike", "XMP-dc:Description": "Anna's red bike",
                           "IPTC:Caption-Abstract": "Anna's red bike"}
    # Editing a person's words again from the page that shows them: no force needed, none used.
    action, form = edit_form(server.get(f"/photo/{row}").text)
    assert server.post(action, {**form, "caption": "Anna's old red bike"}).status == 303
    assert fields(red)["XMP-dc:Description"] == "Anna's old red bike"


def test_a_caption_xml_cannot_hold_is_refused_naming_the_character(served: tuple[Library, Served]) -> None:
    lib, server = served
    red, row = lib.path("red.jpg"), lib.ids["red.jpg"]
    before = red.read_bytes()
    action, form = edit_form(server.get(f"/photo/{row}").text)
    for bad, name in (("a cat \uffff on a mat", "U+FFFF"), ("a cat \ufffe", "U+FFFE")):
        answer = server.post(action, {**form, "caption": bad})
        assert answer.status == 422, answer.text
        assert name in answer.text and "malformed" not in answer.text
    assert red.read_bytes() == before
