"""Captions in the user's languages end to end: `capwatch caption` with ``[language]``, the tiny captioner and the
tiny Marian fixture (tests/fixtures/models/marian-tiny-en-xx), real files, exiftool and exiv2 as independent readers.

The translations themselves are checked token for token against transformers in test_marian.py; here they must be
exactly what the Translator gives for the English caption, and land where readers look.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from capwatch.config import Config, LanguageConfig, ModelConfig
from capwatch.errors import ConfigError
from capwatch.models.languages import Translations
from capwatch.models.marian import Translator
from tests.conftest import FIXTURES, CliRunner

CAPTIONER = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
MARIAN = FIXTURES / "models" / "marian-tiny-en-xx"
needs_tools = pytest.mark.skipif(shutil.which("exiftool") is None or shutil.which("exiv2") is None,
                                 reason="exiftool and exiv2 are the independent readers")


def make_image(path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), (40, 120, 200)).save(path, format=fmt)
    return path


def write_config(tmp_path: Path, *, captions: list[str], default: str = "en", extra: str = "") -> Path:
    config = tmp_path / "capwatch.toml"
    models = ", ".join(f'{lang} = "{MARIAN}"' for lang in dict.fromkeys([*captions, default]) if lang != "en")
    config.write_text(f"[language]\ncaptions = {json.dumps(captions)}\ndefault = \"{default}\"\n"
                      f"models = {{ {models} }}\n{extra}", encoding="utf-8")
    return config


def caption_json(run_cli: CliRunner, config: Path, db: Path, *files: Path, args: tuple[str, ...] = ()
                 ) -> list[dict[str, Any]]:
    result = run_cli("--config", config, "--db", db, "--model", CAPTIONER, "caption", "--json", *args, *files)
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def exiftool(path: Path, *tags: str) -> dict[str, Any]:
    out = subprocess.run(["exiftool", "-j", "-G1", "-struct", *tags, str(path)], capture_output=True, text=True,
                         check=True).stdout
    return {k: v for k, v in json.loads(out)[0].items() if k != "SourceFile"}


def exiv2_descriptions(path: Path) -> str:
    return subprocess.run(["exiv2", "-px", "-K", "Xmp.dc.description", str(path)], capture_output=True,
                          text=True, check=False).stdout


def translate(text: str) -> str:
    return Translator(MARIAN, precision="fp32", idle_unload_seconds=0).translate([text])[0].text


@needs_tools
@pytest.mark.parametrize(("name", "fmt", "where"), [("a.jpg", "JPEG", None), ("b.png", "PNG", None),
                                                    ("c.webp", "WEBP", None), ("d.tif", "TIFF", "d.tif.xmp")])
def test_caption_in_each_language_is_written_and_read_back(run_cli: CliRunner, tmp_path: Path, name: str,
                                                          fmt: str, where: str | None) -> None:
    image = make_image(tmp_path / "photos" / name, fmt)
    config = write_config(tmp_path, captions=["de", "fr"], default="de")
    (row,) = caption_json(run_cli, config, tmp_path / "index.db", image)
    english = row["captions"]["en"]
    german = translate(english)
    assert row["captions"] == {"en": english, "de": german, "fr": german}  # one fixture model for both
    assert row["caption"] == german and row["error"] is None and row["written"]
    target = image.parent / where if where else image
    tags = exiftool(target, "-XMP-dc:Description", "-XMP-dc:Description-en", "-XMP-dc:Description-de",
                    "-XMP-dc:Description-fr")
    assert tags["XMP-dc:Description"] == german  # x-default: the default language
    assert tags["XMP-dc:Description-en"] == english
    assert tags["XMP-dc:Description-de"] == german and tags["XMP-dc:Description-fr"] == german
    listed = exiv2_descriptions(target)
    assert 'lang="en"' in listed and 'lang="de"' in listed and 'lang="x-default"' in listed
    if where is None:
        assert exiftool(image, "-EXIF:ImageDescription")["IFD0:ImageDescription"] == german


@needs_tools
def test_a_persons_language_item_stays_and_only_capwatchs_are_rewritten(run_cli: CliRunner,
                                                                        tmp_path: Path) -> None:
    image = make_image(tmp_path / "photos" / "p.jpg", "JPEG")
    db = tmp_path / "index.db"
    config = write_config(tmp_path, captions=["de", "fr"])
    (first,) = caption_json(run_cli, config, db, image)
    # A person corrects the French item and adds a Spanish one with exiftool.
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description-fr=Mon chien à la plage",
                    "-XMP-dc:Description-es=Mi perro", str(image)], check=True)
    (again,) = caption_json(run_cli, config, db, image, args=("--force",))
    assert again["error"] is None and again["written"]
    tags = exiftool(image, "-XMP-dc:Description-fr", "-XMP-dc:Description-es", "-XMP-dc:Description-de",
                    "-XMP-dc:Description")
    assert tags["XMP-dc:Description-fr"] == "Mon chien à la plage"
    assert tags["XMP-dc:Description-es"] == "Mi perro"
    assert tags["XMP-dc:Description-de"] == first["captions"]["de"]
    assert tags["XMP-dc:Description"] == first["captions"]["en"]
    recorded = exiftool(image, "-XMP-capwatch:all")
    assert "Mon chien" not in json.dumps(recorded, ensure_ascii=False)  # the person's item is not recorded as ours


@needs_tools
def test_every_language_is_searchable_and_search_json_gives_the_default_language(run_cli: CliRunner,
                                                                                 tmp_path: Path) -> None:
    image = make_image(tmp_path / "photos" / "s.jpg", "JPEG")
    db = tmp_path / "index.db"
    config = write_config(tmp_path, captions=["de"], default="de")
    (row,) = caption_json(run_cli, config, db, image)
    for language in ("en", "de"):
        text = row["captions"][language]
        word = max(re.findall(r"[^\W_]+", text), key=len)
        found = run_cli("--config", config, "--db", db, "search", word, "--json")
        assert found.code == 0, found.err
        hits = [json.loads(line) for line in found.out.splitlines()]
        assert [h["path"] for h in hits] == [str(image)], (language, word)
        assert hits[0]["caption"] == row["captions"]["de"]


def test_language_config_is_checked(tmp_path: Path) -> None:
    from capwatch.config import load_config_file

    bad = tmp_path / "bad.toml"
    bad.write_text('[language]\ncaptions = ["German"]\n')
    with pytest.raises(ConfigError, match=r"language\.captions"):
        load_config_file(bad)
    bad.write_text('[language]\ncaptions = ["de"]\nmodels = { fr = "x" }\n')
    with pytest.raises(ConfigError, match=r"language\.models\.fr"):
        load_config_file(bad)
    good = tmp_path / "good.toml"
    good.write_text('[language]\ncaptions = ["de", "fr"]\ndefault = "fr"\n')
    loaded = load_config_file(good).language
    assert loaded.languages == ("en", "fr", "de") and loaded.translated == ("fr", "de")


def test_unknown_language_without_a_model_is_one_line_error(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_image(tmp_path / "x.jpg", "JPEG")
    config = tmp_path / "c.toml"
    config.write_text('[language]\ncaptions = ["tlh"]\n')
    result = run_cli("--config", config, "--db", tmp_path / "i.db", "--model", CAPTIONER, "caption", image)
    assert result.code != 0
    assert "tlh" in result.err and "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_keyword_labels_are_translated_once_into_the_default_language() -> None:
    config = Config(model=ModelConfig(idle_unload_seconds=0),
                    language=LanguageConfig(captions=("de",), default="de", models={"de": str(MARIAN)}))
    translations = Translations(config, {})
    first = translations.keywords(["dog", "beach", "dog"])
    direct = Translator(MARIAN, precision="fp32").translate(["dog", "beach"])
    assert first == tuple(dict.fromkeys(t.text.rstrip(".") or label for t, label in zip(direct, ["dog", "beach"],
                                                                                      strict=True)))
    assert dict(translations._labels["de"]) == {"dog": first[0], "beach": first[-1]}
    translations.translators["de"].close()
    translations.translators["de"] = None  # type: ignore[assignment]  # a second lookup must not need the model
    assert translations.keywords(["beach", "dog"]) == (first[-1], first[0])


@needs_tools
def test_changing_the_languages_retranslates_on_recaption_model_changed(run_cli: CliRunner,
                                                                        tmp_path: Path) -> None:
    image = make_image(tmp_path / "photos" / "r.jpg", "JPEG")
    db = tmp_path / "index.db"
    (row,) = caption_json(run_cli, write_config(tmp_path, captions=["de"]), db, image)
    assert set(row["captions"]) == {"en", "de"}
    config = write_config(tmp_path, captions=["de", "fr"])
    result = run_cli("--config", config, "--db", db, "--model", CAPTIONER, "recaption", "--model-changed")
    assert result.code == 0, result.err
    assert "1 captioned again" in result.out or "1 files: 1" in result.out, result.out
    assert exiftool(image, "-XMP-dc:Description-fr")["XMP-dc:Description-fr"] == row["captions"]["de"]
    again = run_cli("--config", config, "--db", db, "--model", CAPTIONER, "recaption", "--model-changed")
    assert "0 files to caption again" in again.out


@needs_tools
def test_hierarchical_keywords_are_written_under_the_parent_keeping_a_persons(tmp_path: Path) -> None:
    from capwatch.config import MetadataConfig
    from capwatch.metadata.records import Provenance
    from capwatch.metadata.writer import write_caption

    image = make_image(tmp_path / "h.jpg", "JPEG")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-lr:HierarchicalSubject=Places|Paris|Café",
                    "-XMP-digiKam:TagsList=People/Anna", str(image)], check=True)
    person = {k: [v] if isinstance(v, str) else v
              for k, v in exiftool(image, "-XMP-lr:HierarchicalSubject", "-XMP-digiKam:TagsList").items()}
    config = MetadataConfig(keyword_parent="capwatch|auto")
    provenance = Provenance("m", None, "2026-01-01T00:00:00Z")
    write_caption(image, "A dog", provenance, config, keywords=["dog", "beach"])
    tags = exiftool(image, "-XMP-lr:HierarchicalSubject", "-XMP-digiKam:TagsList", "-XMP-dc:Subject")
    assert tags["XMP-lr:HierarchicalSubject"] == ["Places|Paris|Café", "capwatch|auto|dog", "capwatch|auto|beach"]
    assert tags["XMP-digiKam:TagsList"] == ["People/Anna", "capwatch/auto/dog", "capwatch/auto/beach"]
    assert tags["XMP-dc:Subject"] == ["dog", "beach"]
    write_caption(image, "A cat", provenance, config, keywords=["cat"])
    tags = exiftool(image, "-XMP-lr:HierarchicalSubject", "-XMP-digiKam:TagsList")
    assert tags["XMP-lr:HierarchicalSubject"] == [*person["XMP-lr:HierarchicalSubject"], "capwatch|auto|cat"]
    assert tags["XMP-digiKam:TagsList"] == [*person["XMP-digiKam:TagsList"], "capwatch/auto/cat"]
    packet = subprocess.run(["exiftool", "-b", "-XMP", str(image)], capture_output=True, check=True).stdout
    assert "<rdf:li>Places|Paris|Café</rdf:li>".encode() in packet
    assert "hierarchicalSubject" in subprocess.run(["exiv2", "-px", str(image)], capture_output=True, text=True,
                                                   check=False).stdout


def _served_in_three_languages(tmp_path: Path) -> tuple[Path, int, Any]:
    """A photo whose caption capwatch wrote in de (the default), en and fr, indexed, and the page's ServeSettings."""
    from capwatch.config import IndexConfig, LibraryConfig, MetadataConfig, RootConfig
    from capwatch.library.index import Index
    from capwatch.library.scan import reconcile
    from capwatch.metadata.records import Provenance
    from capwatch.metadata.writer import write_caption
    from capwatch.models.captioner import open_captioner
    from capwatch.web.app import ServeSettings

    root = tmp_path / "photos"
    image = make_image(root / "red.jpg", "JPEG")
    write_caption(image, "Ein roter Apfel", Provenance("m", None, "2026-01-01T00:00:00Z"), MetadataConfig(),
                  languages={"en": "A red apple", "de": "Ein roter Apfel", "fr": "Une pomme rouge"})
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=tmp_path / "i.db"),
                    model=ModelConfig(dir=CAPTIONER, precision="fp32"),
                    language=LanguageConfig(captions=("fr",), default="de"))
    with Index.open(tmp_path / "i.db") as index:
        reconcile(config.library.roots[0], config, index)
        (row_id,) = index.ids_for([str(image)]).values()
    settings = ServeSettings(config=config, csrf="c" * 32, cache_dir=tmp_path / "cache",
                             open_captioner=lambda: open_captioner(CAPTIONER, config.model), live_state=lambda: None)
    return image, row_id, settings


@needs_tools
def test_web_page_lists_the_languages_and_an_edit_writes_only_that_item(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from capwatch.config import MetadataConfig
    from capwatch.metadata.records import Provenance
    from capwatch.metadata.writer import write_caption
    from capwatch.web.app import create_app
    from tests.web_helpers import csrf_of

    image, row_id, settings = _served_in_three_languages(tmp_path)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8765", follow_redirects=False) as client:
        page = client.get(f"/photo/{row_id}").text
        assert 'lang="de">Ein roter Apfel' in page
        assert 'id="language-en"' in page and 'id="language-fr"' in page and 'id="language-de"' not in page
        answer = client.post(f"/photo/{row_id}/caption",
                             data={"csrf": csrf_of(page), "caption": "Une pomme bien rouge", "language": "fr"})
        assert answer.status_code == 303, answer.text
    tags = exiftool(image, "-XMP-dc:Description", "-XMP-dc:Description-fr", "-XMP-dc:Description-en",
                    "-XMP-capwatch:all")
    assert tags["XMP-dc:Description-fr"] == "Une pomme bien rouge"
    assert tags["XMP-dc:Description"] == "Ein roter Apfel" and tags["XMP-dc:Description-en"] == "A red apple"
    assert tags["XMP-capwatch:Source"] == "capwatch"  # the caption shown is still capwatch's
    assert "pomme" not in json.dumps(tags.get("XMP-capwatch:Captions"), ensure_ascii=False)  # fr is a person's now
    # A later capwatch write in French leaves the person's item alone.
    write_caption(image, "Ein roter Apfel", Provenance("m", None, "2026-01-02T00:00:00Z"), MetadataConfig(),
                  force=True, languages={"en": "A red apple", "de": "Ein roter Apfel", "fr": "Une pomme rouge"})
    assert exiftool(image, "-XMP-dc:Description-fr")["XMP-dc:Description-fr"] == "Une pomme bien rouge"


@needs_tools
def test_a_language_item_written_after_the_page_loaded_is_kept_and_shown_as_a_conflict(tmp_path: Path) -> None:
    import re

    from starlette.testclient import TestClient

    from capwatch.web.app import create_app

    image, row_id, settings = _served_in_three_languages(tmp_path)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8765", follow_redirects=False) as client:
        page = client.get(f"/photo/{row_id}").text
        form = re.search(r'<form[^>]*id="language-fr">(.*?)</form>', page, re.S)
        assert form is not None
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(1)))
        assert fields["language"] == "fr" and fields["shown"]
        # Someone writes the French item with exiftool while the page is open.
        subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description-fr=La pomme de Mamie",
                        str(image)], check=True)
        answer = client.post(f"/photo/{row_id}/caption", data={**fields, "caption": "Une pomme bien rouge"})
        assert answer.status_code == 409, answer.text
        assert "La pomme de Mamie" in answer.text and "Une pomme bien rouge" in answer.text
        assert 'name="language" value="fr"' in answer.text  # "replace with mine" writes the same item
    assert exiftool(image, "-XMP-dc:Description-fr")["XMP-dc:Description-fr"] == "La pomme de Mamie"
    assert exiftool(image, "-XMP-dc:Description")["XMP-dc:Description"] == "Ein roter Apfel"


@needs_tools
def test_keywords_are_written_in_the_default_language(run_cli: CliRunner, tmp_path: Path) -> None:
    florence = FIXTURES / "models" / "florence2-tiny"
    english_copy = make_image(tmp_path / "en" / "k.jpg", "JPEG")
    german_copy = make_image(tmp_path / "de" / "k.jpg", "JPEG")
    plain = tmp_path / "plain.toml"
    plain.write_text("[metadata]\nmax_keywords = 5\n")
    for config, image in ((plain, english_copy), (write_config(tmp_path, captions=[], default="de"), german_copy)):
        result = run_cli("--config", config, "--db", tmp_path / "i.db", "--model", florence, "caption", "--json", image)
        assert result.code == 0, result.err
    english = exiftool(english_copy, "-XMP-dc:Subject").get("XMP-dc:Subject")
    assert english, "the tiny Florence-2 finds objects in this image"
    labels = [english] if isinstance(english, str) else list(english)
    lang = Config(language=LanguageConfig(default="de", models={"de": str(MARIAN)}))
    expected = list(Translations(lang, {}).keywords(labels))
    german = exiftool(german_copy, "-XMP-dc:Subject")["XMP-dc:Subject"]
    assert ([german] if isinstance(german, str) else german) == expected


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_writing_the_same_languages_and_hierarchy_again_changes_nothing(tmp_path: Path, fmt: str) -> None:
    from capwatch.config import MetadataConfig
    from capwatch.metadata.records import Provenance
    from capwatch.metadata.writer import UNCHANGED, write_caption

    image = make_image(tmp_path / f"i.{fmt.lower()}", fmt)
    config = MetadataConfig(keyword_parent="capwatch")
    languages = {"en": "A dog", "de": "Ein Hund", "pt-BR": "Um cachorro"}
    first = write_caption(image, "Ein Hund", Provenance("m", None, "2026-01-01T00:00:00Z"), config,
                          keywords=["Hund"], languages=languages)
    assert first.written
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    again = write_caption(image, "Ein Hund", Provenance("m", None, "2026-02-01T00:00:00Z"), config,
                          keywords=["Hund"], languages=languages)
    assert again.written == () and again.skipped == UNCHANGED
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert again.snapshot is not None and dict(again.snapshot.metadata.captions) == languages


@needs_tools
def test_exif_and_iptc_carry_the_default_language(tmp_path: Path) -> None:
    from capwatch.config import MetadataConfig
    from capwatch.metadata.records import Provenance
    from capwatch.metadata.writer import write_caption

    image = make_image(tmp_path / "iptc.jpg", "JPEG")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-IPTC:Keywords=Urlaub", str(image)], check=True)
    result = write_caption(image, "Ein Hund am Strand", Provenance("m", None, "2026-01-01T00:00:00Z"),
                           MetadataConfig(), languages={"en": "A dog on the beach", "de": "Ein Hund am Strand"})
    assert "iptc" in result.written
    tags = exiftool(image, "-IPTC:Caption-Abstract", "-EXIF:ImageDescription", "-XMP-dc:Description",
                    "-XMP-dc:Description-en")
    assert tags["IPTC:Caption-Abstract"] == tags["IFD0:ImageDescription"] == "Ein Hund am Strand"
    assert tags["XMP-dc:Description"] == "Ein Hund am Strand" and tags["XMP-dc:Description-en"] == "A dog on the beach"
