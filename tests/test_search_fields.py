"""Schema 5 and the search that forgives: keywords and OCR text in the index, word forms (porter), CJK
substrings, OCR substrings (trigrams), query fields, why-it-matched snippets and --sort, through the library and
the real CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capwatch.errors import QueryError
from capwatch.library.index import ImageRecord, Index, clean_keywords
from capwatch.library.migrations import SCHEMA_VERSION
from capwatch.library.search import SearchFilters, parse_query
from tests.conftest import CliRunner, assert_one_line_error


def _rec(path: str, caption: str | None = None, **kw: object) -> ImageRecord:
    base: dict[str, object] = {"size": 1, "mtime_ns": 1_600_000_000 * 10**9, "status": "captioned"}
    base.update(kw)
    return ImageRecord(path=path, caption=caption, **base)  # type: ignore[arg-type]


LIBRARY = [
    _rec("/lib/2019/puppy.jpg", "a puppy runs on the beach", keywords=("dog", "beach, sand; sea"),
         taken_at="2019-06-01T10:00:00"),
    _rec("/lib/2020/sakura.jpg", "日本の桜", keywords=("桜", "京都"), taken_at="2020-04-01T10:00:00"),
    _rec("/lib/2021/street.jpg", "a street at night", ocr_text="EXIT 12A\nPlate AB1234CD",
         taken_at="2021-01-01T10:00:00"),
    _rec("/lib/2022/dogs.jpg", "running dogs in the park", taken_at="2022-01-01T10:00:00"),
    _rec("/lib/2023/kw.jpg", "a quiet lake", keywords=("beach",), model_keywords=("beach",),
         taken_at="2023-01-01T10:00:00"),
    _rec("/lib/2024/long.jpg", "a whiteboard", taken_at="2024-01-01T10:00:00",
         ocr_text="agenda " * 30 + "deadline friday 5pm " + "notes " * 30),
]


@pytest.fixture
def index(tmp_path: Path) -> Index:
    ix = Index.open(tmp_path / "i.db")
    ix.upsert_many(LIBRARY)
    return ix


def _paths(index: Index, query: str, **kw: object) -> list[str]:
    return [h.path for h in index.search(parse_query(query), SearchFilters(), **kw)]  # type: ignore[arg-type]


# -- records ------------------------------------------------------------------------------------------------


def test_keywords_and_ocr_text_round_trip_through_get_and_iter_records(index: Index) -> None:
    record = index.get("/lib/2019/puppy.jpg")
    assert record is not None
    assert record.keywords == ("dog", "beach, sand; sea")  # commas and semicolons are part of a keyword
    assert record.model_keywords == ()
    assert index.get("/lib/2021/street.jpg").ocr_text == "EXIT 12A\nPlate AB1234CD"  # type: ignore[union-attr]
    by_path = {r.path: r for r in index.iter_records("/lib")}
    assert by_path["/lib/2023/kw.jpg"].model_keywords == ("beach",)
    assert by_path["/lib/2020/sakura.jpg"].keywords == ("桜", "京都")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (("a", "b"), ("a", "b")),
        (("two\nlines", " padded ", "tab\there"), ("two lines", "padded", "tab here")),
        (("", "  ", "\n", "kept"), ("kept",)),
        (("dup", "dup"), ("dup", "dup")),
        (("x, y", "a;b"), ("x, y", "a;b")),
        ((), ()),
    ],
)
def test_keywords_are_stored_one_per_line_with_inner_whitespace_collapsed(
        tmp_path: Path, given: tuple[str, ...], stored: tuple[str, ...]) -> None:
    assert clean_keywords(given) == stored
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec("/p/a.jpg", "x", keywords=given))
        assert index.get("/p/a.jpg").keywords == stored  # type: ignore[union-attr]


def test_changing_keywords_and_text_keeps_both_full_text_indexes_in_step(index: Index) -> None:
    index.upsert(_rec("/lib/2021/street.jpg", "a street at night", ocr_text="GATE 7", keywords=("night",)))
    assert _paths(index, "text:AB1234") == []
    assert _paths(index, "text:GATE") == ["/lib/2021/street.jpg"]
    assert _paths(index, "kw:night") == ["/lib/2021/street.jpg"]
    index.remove("/lib/2021/street.jpg")
    assert _paths(index, "text:GATE") == []
    assert _paths(index, "kw:night") == []
    index.upsert(_rec("/lib/2020/sakura.jpg", "a cherry tree"))
    assert _paths(index, "桜") == []
    conn = sqlite3.connect(index.path)
    for table in ("images_fts", "images_ocr_tri"):
        conn.execute(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")


# -- migrations ---------------------------------------------------------------------------------------------


def test_upgrade_from_version_4_makes_old_rows_findable_by_word_form_and_cjk(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=4)
    conn.executemany(
        "INSERT INTO images (path, size, mtime_ns, sort_date, caption, source, status, updated_at, ctime_ns, "
        "sidecars) VALUES (?, 1, 2, '2020-01-01T00:00:00', ?, 'model', 'captioned', 'x', 3, '')",
        [("/lib/a.jpg", "two puppies running"), ("/lib/b.jpg", "日本の桜"), ("/lib/c.jpg", None)],
    )
    conn.close()
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION >= 5
        assert _paths(index, "puppy") == ["/lib/a.jpg"]
        assert _paths(index, "runs") == ["/lib/a.jpg"]
        assert _paths(index, "桜") == ["/lib/b.jpg"]
        old = index.get("/lib/a.jpg")
        assert old is not None and (old.keywords, old.model_keywords, old.ocr_text, old.ctime_ns) == ((), (), None, 3)
        index.upsert(_rec("/lib/c.jpg", None, keywords=("harbour",), ocr_text="PIER 39"))
        assert _paths(index, "kw:harbour") == ["/lib/c.jpg"]
        assert _paths(index, 'text:"R 3"') == ["/lib/c.jpg"]
    tokenizer = sqlite3.connect(db).execute("SELECT sql FROM sqlite_master WHERE name = 'images_fts'").fetchone()[0]
    assert "porter unicode61 remove_diacritics 2" in tokenizer


def test_new_index_has_the_columns_and_both_full_text_tables(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db"):
        pass
    conn = sqlite3.connect(tmp_path / "i.db")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
    assert {"keywords", "model_keywords", "ocr_text"} <= columns
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images_fts", "images_ocr_tri"} <= tables


# -- matching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("puppies", ["/lib/2019/puppy.jpg"]),  # porter: plural finds singular
        ("runs", ["/lib/2019/puppy.jpg", "/lib/2022/dogs.jpg"]),  # "running" and "runs" share a stem
        ('"running"', ["/lib/2022/dogs.jpg"]),  # quoted: exactly this form
        ('"runs on"', ["/lib/2019/puppy.jpg"]),
        ('"running dog"', []),  # the phrase is exact: "dogs" is another form
        ("桜", ["/lib/2020/sakura.jpg"]),  # one CJK character inside a run
        ("本の", ["/lib/2020/sakura.jpg"]),
        ("日本の桜", ["/lib/2020/sakura.jpg"]),
        ("京都", ["/lib/2020/sakura.jpg"]),  # a keyword
        ("caption:京都", []),
        ("kw:京都", ["/lib/2020/sakura.jpg"]),
        ("本桜", []),  # not a substring
        ("kw:dog", ["/lib/2019/puppy.jpg"]),  # keyword only: "dogs" in a caption does not count
        ("kw:beach", ["/lib/2019/puppy.jpg", "/lib/2023/kw.jpg"]),
        ("caption:beach", ["/lib/2019/puppy.jpg"]),
        ("path:2019", ["/lib/2019/puppy.jpg"]),
        ("text:B123", ["/lib/2021/street.jpg"]),  # substring of a plate
        ("text:1234cd", ["/lib/2021/street.jpg"]),  # case does not matter
        ('text:"exit 12"', ["/lib/2021/street.jpg"]),
        ("text:12a", ["/lib/2021/street.jpg"]),
        ("text:12", []),  # two characters: whole words only
        ("exit", ["/lib/2021/street.jpg"]),  # plain words look in the text too
        ("street -text:B123", []),
        ("street -text:ZZZ", ["/lib/2021/street.jpg"]),
        ("text:B123 OR puppies", ["/lib/2019/puppy.jpg", "/lib/2021/street.jpg"]),
        ("text:B123 street", ["/lib/2021/street.jpg"]),
        ("text:B123 -street", []),
        ("title:foo", []),
    ],
)
def test_queries_find_word_forms_cjk_substrings_and_fields(index: Index, query: str, expected: list[str]) -> None:
    assert sorted(_paths(index, query)) == expected


def test_caption_outranks_keyword_and_keyword_outranks_text(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        index.upsert_many([
            _rec("/p/text.jpg", "a photo of a wall", ocr_text="kayak rental"),
            _rec("/p/kw.jpg", "a photo of a wall", keywords=("kayak",)),
            _rec("/p/cap.jpg", "a kayak on a wall"),
            _rec("/p/kayak/path.jpg", "a photo of a wall"),
        ])
        assert _paths(index, "kayak") == ["/p/cap.jpg", "/p/kw.jpg", "/p/text.jpg", "/p/kayak/path.jpg"]


# -- why it matched ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field", "snippet"),
    [
        ("puppies", "caption", "a [puppy] runs on the beach"),
        ("kw:dog", "keywords", "[dog], beach, sand; sea"),
        ("text:B123", "text", "EXIT 12A Plate A[B123]4CD"),
        ("exit", "text", "[EXIT] 12A Plate AB1234CD"),
        ("桜", "caption", "日本の[桜]"),
        ("kw:桜", "keywords", "[桜], 京都"),
        ("path:2019", "path", "/lib/[2019]/puppy.jpg"),
    ],
)
def test_each_hit_says_which_field_matched_with_the_hit_marked(index: Index, query: str, field: str,
                                                              snippet: str) -> None:
    hits = index.search(parse_query(query), SearchFilters())
    assert [(h.field, h.snippet) for h in hits[:1]] == [(field, snippet)]


def test_long_text_snippet_is_cut_around_the_hit(index: Index) -> None:
    for query, marked in (("deadline", "[deadline] friday"), ("text:dline", "dea[dline] friday")):
        (hit,) = index.search(parse_query(query), SearchFilters())
        assert hit.field == "text"
        assert marked in hit.snippet
        assert hit.snippet.startswith("…") and hit.snippet.endswith("…")
        assert len(hit.snippet) < 200


def test_sort_by_date_puts_the_newest_first(index: Index) -> None:
    assert _paths(index, "beach", sort="date") == ["/lib/2023/kw.jpg", "/lib/2019/puppy.jpg"]
    assert _paths(index, "a", sort="date")[0] == "/lib/2024/long.jpg"


# -- parser ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "fts5"),
    [
        ("kw:dog", '({keywords} : "dog")'),
        ("KW:dog", '({keywords} : "dog")'),
        ("caption:beach", '({caption model_caption translations} : "beach")'),
        ("path:2019", '({path} : "2019")'),
        ('kw:"golden retriever"', '({keywords} : "golden retriever")'),
        ("-kw:dog cat", '"cat" NOT ({keywords} : "dog")'),
        ("kw:dog OR cat", '(({keywords} : "dog") OR "cat")'),
        ("kw:do*", '({keywords} : "do"*)'),
        ("桜", '({cjk_caption cjk_keywords cjk_ocr} : "桜")'),
        ("日本の桜", '({cjk_caption cjk_keywords cjk_ocr} : "日 本 の 桜")'),
        ("kw:桜", '({cjk_keywords} : "桜")'),
        ("text:12", '({ocr_text} : "12")'),
        ("title:foo", '"title:foo"'),
        ('title:"a b"', '"title:" AND "a b"'),
        ("12:30", '"12:30"'),
    ],
)
def test_fields_compile_to_column_filters(query: str, fts5: str) -> None:
    assert parse_query(query).fts5 == fts5


@pytest.mark.parametrize(
    ("query", "match", "substring"),
    [
        ("text:B123", None, (('"B123"', None),)),
        ('text:"exit  12"', None, (('"exit 12"', None),)),
        ("text:abc OR dog", None, (('"abc"', '"dog"'),)),
        ("cat text:abc", '"cat"', (('"abc"', None),)),
        ("text:ab", '({ocr_text} : "ab")', ()),
    ],
)
def test_text_terms_of_three_characters_go_to_the_trigram_index(query: str, match: str | None,
                                                                substring: tuple[object, ...]) -> None:
    compiled = parse_query(query).compile()
    assert (compiled.match, compiled.substring_groups) == (match, substring)


@pytest.mark.parametrize(("query", "message"), [("kw:", "kw: needs a word"), ("text:", "text: needs a word"),
                                                ("kw:*", "'*' on its own"), ("kw:!!", "needs a letter or digit"),
                                                ('text:""', "nothing to search for")])
def test_bad_field_queries_are_one_line_errors(query: str, message: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(query)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- through the CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "index.db"
    with Index.open(path) as index:
        index.upsert_many(LIBRARY)
    return path


def test_cli_json_carries_field_and_marked_snippet(run_cli: CliRunner, db: Path) -> None:
    result = run_cli("--db", db, "search", "kw:dog", "--json")
    assert result.code == 0, result.err
    (row,) = [json.loads(line) for line in result.out.splitlines()]
    assert row["path"] == "/lib/2019/puppy.jpg"
    assert (row["field"], row["snippet"]) == ("keywords", "[dog], beach, sand; sea")
    assert {"path", "caption", "score", "source", "model", "taken_at"} <= set(row)


def test_cli_text_output_shows_where_a_non_caption_hit_is(run_cli: CliRunner, db: Path) -> None:
    result = run_cli("--db", db, "search", "text:B123")
    assert result.code == 0, result.err
    assert result.out.splitlines() == ["/lib/2021/street.jpg", "    a street at night",
                                       "    text: EXIT 12A Plate AB1234CD"]
    result = run_cli("--db", db, "search", "桜", "--paths")
    assert result.out.splitlines() == ["/lib/2020/sakura.jpg"]
    result = run_cli("--db", db, "search", "puppies")
    assert result.out.splitlines() == ["/lib/2019/puppy.jpg", "    a puppy runs on the beach"]


def test_cli_sort_date_and_score(run_cli: CliRunner, db: Path) -> None:
    by_date = run_cli("--db", db, "search", "beach", "--sort", "date", "--paths")
    assert by_date.out.splitlines() == ["/lib/2023/kw.jpg", "/lib/2019/puppy.jpg"]
    by_score = run_cli("--db", db, "search", "beach", "--sort", "score", "--paths")
    assert by_score.out.splitlines() == ["/lib/2019/puppy.jpg", "/lib/2023/kw.jpg"]


@pytest.mark.parametrize("args", [["kw:"], ["text:", "dog"], ["kw:*"], ["beach", "--sort", "random"],
                                  ['text:"exit']])
def test_cli_bad_field_queries_exit_2_with_one_line(run_cli: CliRunner, db: Path, args: list[str]) -> None:
    line = assert_one_line_error(run_cli("--db", db, "search", *args))
    assert "fts5" not in line.lower() and "sqlite" not in line.lower()


def test_a_folder_filter_does_not_hide_where_the_query_matched(index: Index) -> None:
    for query, field in (("桜", "caption"), ("kw:京都", "keywords"), ("path:sakura", "path")):
        (hit,) = index.search(parse_query(query), SearchFilters(in_dir="/lib/2020"))
        assert hit.field == field


ROWS = 20_000


def test_migration_5_killed_midway_leaves_schema_4_whole_and_runs_again(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=4)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO images (path, size, mtime_ns, sort_date, caption, status, updated_at) "
        "VALUES (?, 1, 1, '2020-01-01T00:00:00', ?, 'captioned', 'x')",
        ((f"/lib/{i:06d}.jpg", f"photo {i} of a harbour with boats number {i * 7} 日本の桜") for i in range(ROWS)),
    )
    conn.execute("COMMIT")
    conn.close()
    wal = Path(f"{db}-wal")
    start = wal.stat().st_size if wal.exists() else 0
    script = f"from capwatch.library.index import Index; Index.open({str(db)!r})"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        # Kill it while migration 5 is writing (its transaction spills pages into the WAL).
        while child.poll() is None and time.monotonic() < deadline:
            if wal.exists() and wal.stat().st_size > start + 1_000_000:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        child.wait()
    check = sqlite3.connect(db)
    version = check.execute("SELECT max(version) FROM capwatch_migrations").fetchone()[0]
    columns = {r[1] for r in check.execute("PRAGMA table_info(images)")}
    fts = check.execute("SELECT sql FROM sqlite_master WHERE name = 'images_fts'").fetchone()[0]
    assert check.execute("SELECT count(*) FROM images").fetchone()[0] == ROWS
    check.close()
    # All or nothing: schema 4 as it was (the kill came in time, as it does on this machine) or all of 5.
    # (A kill after migration 5 committed may land in a later one: that leaves 5 whole too.)
    assert (min(version, 5), "keywords" in columns, "porter" in fts) in ((4, False, False), (5, True, True))
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        assert len(_paths(index, "boat", limit=3)) == 3
        assert _paths(index, '"number 7"') == ["/lib/000001.jpg"]
        assert len(_paths(index, "桜", limit=3)) == 3
    check = sqlite3.connect(db)
    assert check.execute("SELECT count(*) FROM images WHERE cjk_caption = '日 本 の 桜'").fetchone()[0] == ROWS
    check.close()


def test_cli_unranked_results_score_zero_newest_first(run_cli: CliRunner, db: Path) -> None:
    # A substring ORed with a word has no single bm25 to rank by: newest first, score 0.
    result = run_cli("--db", db, "search", "text:B123 OR puppies", "--json")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["path"] for r in rows] == ["/lib/2021/street.jpg", "/lib/2019/puppy.jpg"]
    assert '"score": -' not in result.out and all(r["score"] == 0.0 for r in rows)
    assert [r["field"] for r in rows] == ["text", "caption"]
