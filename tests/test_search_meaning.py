"""Search by meaning through the real CLI on real files with the tiny SigLIP fixture: embeddings made by scan,
caption and recaption (a person's photo too, a captioned library without captioning again), search --by, the
JSON fields, filters on meaning hits, similar and duplicates, and the one-line errors."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CliRunner, assert_one_line_error

FIXTURES = Path(__file__).parent / "fixtures"
CAPTIONER = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
EMBEDDER = FIXTURES / "models" / "siglip-tiny"


def _make_library(root: Path) -> Path:
    """astronaut (+ a copy, a re-encode, a half-size PNG, a slightly cropped 'burst' shot), chelsea (cat) in a
    sub-folder, coffee."""
    lib = root / "lib"
    (lib / "cats").mkdir(parents=True)
    photos = FIXTURES / "photos"
    shutil.copy(photos / "astronaut.jpg", lib / "astronaut.jpg")
    shutil.copy(photos / "astronaut.jpg", lib / "astronaut-copy.jpg")
    with Image.open(photos / "astronaut.jpg") as im:
        im.save(lib / "astronaut-q60.jpg", quality=60)
        im.resize((im.width // 2, im.height // 2)).save(lib / "astronaut-half.png")
        im.crop((10, 10, im.width - 10, im.height - 10)).save(lib / "astronaut-burst.jpg", quality=90)
    shutil.copy(photos / "chelsea.jpg", lib / "cats" / "chelsea.jpg")
    shutil.copy(photos / "coffee.jpg", lib / "coffee.jpg")
    return lib


@pytest.fixture
def env() -> dict[str, str]:
    return {"CAPWATCH_EMBED_MODEL": str(EMBEDDER), "CAPWATCH_MODEL": str(CAPTIONER)}


@pytest.fixture
def scanned(tmp_path: Path, run_cli: CliRunner, env: dict[str, str]) -> tuple[Path, Path]:
    lib = _make_library(tmp_path)
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", lib, env=env)
    assert result.code == 0, result.err
    return lib, db


def _vectors(db: Path) -> dict[str, np.ndarray]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT i.path, v.vector FROM image_vectors AS v JOIN images AS i ON i.id = v.image_id")
    found = {path: np.frombuffer(blob, dtype=np.float32) for path, blob in rows}
    conn.close()
    return found


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _embedder():  # type: ignore[no-untyped-def]
    from capwatch.models.embedding import EmbedModelFiles, ImageTextEmbedder

    return ImageTextEmbedder(EmbedModelFiles(dir=EMBEDDER, source="siglip-tiny", revision=None, precision="auto",
                                             name=None))


# -- embeddings where images are read -----------------------------------------------------------------------


def test_scan_embeds_every_image_from_the_pixels_it_captions(scanned: tuple[Path, Path]) -> None:
    lib, db = scanned
    vectors = _vectors(db)
    assert sorted(vectors) == sorted(str(p) for p in lib.rglob("*") if p.is_file())
    from capwatch.models.preprocess import load_image

    embedder = _embedder()
    expected = embedder.embed_images([load_image(lib / "coffee.jpg")])[0]
    # The same decode gives the same vector as embedding the file alone (within float noise).
    assert float(vectors[str(lib / "coffee.jpg")] @ expected) == pytest.approx(1.0, abs=1e-5)


def test_scan_fills_in_embeddings_of_a_captioned_library_without_captioning_again(
        tmp_path: Path, run_cli: CliRunner, env: dict[str, str]) -> None:
    lib = _make_library(tmp_path)
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "scan", lib, env={**env, "CAPWATCH_EMBED_MODEL": "off"}).code == 0
    assert _vectors(db) == {}
    before = {p: p.stat().st_mtime_ns for p in lib.rglob("*.*")}
    rows = sqlite3.connect(db).execute("SELECT path, caption, captioned_at FROM images ORDER BY path").fetchall()
    again = run_cli("--db", db, "scan", lib, env=env)
    assert again.code == 0, again.err
    assert "0 captioned, 7 embedded" in again.out
    assert len(_vectors(db)) == 7
    assert sqlite3.connect(db).execute("SELECT path, caption, captioned_at FROM images ORDER BY path").fetchall() \
        == rows
    assert {p: p.stat().st_mtime_ns for p in lib.rglob("*.*")} == before  # no file written again
    third = run_cli("--db", db, "scan", lib, env=env)
    assert "embedded" not in third.out  # nothing left to fill in
    status = json.loads(run_cli("--db", db, "status", "--json", env=env).out)
    assert status["embedded"] == 7 and status["images"] == 7


def test_a_persons_photo_is_embedded_and_their_description_kept(tmp_path: Path, run_cli: CliRunner,
                                                                env: dict[str, str]) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    photo = lib / "mine.jpg"
    shutil.copy(FIXTURES / "photos" / "chelsea.jpg", photo)
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=my cat Chelsea", str(photo)],
                   check=True)
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", lib, env=env)
    assert result.code == 0, result.err
    assert list(_vectors(db)) == [str(photo)]
    row = sqlite3.connect(db).execute("SELECT caption, source FROM images").fetchone()
    assert row == ("my cat Chelsea", "human")


def test_caption_and_recaption_store_embeddings(tmp_path: Path, run_cli: CliRunner, env: dict[str, str]) -> None:
    photo = tmp_path / "coffee.jpg"
    shutil.copy(FIXTURES / "photos" / "coffee.jpg", photo)
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "caption", photo, env=env).code == 0
    assert list(_vectors(db)) == [str(photo)]
    sqlite3.connect(db, isolation_level=None).execute("DELETE FROM image_vectors")
    result = run_cli("--db", db, "recaption", "--from-model", CAPTIONER.name, tmp_path, env=env)
    assert result.code == 0, result.err
    assert list(_vectors(db)) == [str(photo)]


# -- search -----------------------------------------------------------------------------------------------------


def test_search_json_has_similarity_as_the_cosine_of_the_text_and_image_embeddings(
        scanned: tuple[Path, Path], run_cli: CliRunner, env: dict[str, str]) -> None:
    _lib, db = scanned
    result = run_cli("--db", db, "search", "a cat on a sofa", "--json", "--limit", "50", env=env)
    assert result.code == 0, result.err
    rows = _lines(result.out)
    assert len(rows) == 7  # every image is somewhere in the meaning ranking
    embedder = _embedder()
    text = embedder.embed_texts(["a cat on a sofa"])[0]
    vectors = _vectors(db)
    for row in rows:
        assert {"path", "caption", "score", "source", "model", "taken_at", "similarity", "match"} <= set(row)
        assert row["similarity"] == pytest.approx(float(vectors[str(row["path"])] @ text), abs=1e-4)
        assert row["match"] in ("words", "meaning", "both")
    scores = [float(r["score"]) for r in rows]  # type: ignore[arg-type]
    assert scores == sorted(scores, reverse=True)
    by_meaning = _lines(run_cli("--db", db, "search", "a cat on a sofa", "--by", "meaning", "--json",
                                env=env).out)
    sims = [float(r["similarity"]) for r in by_meaning]  # type: ignore[arg-type]
    assert sims == sorted(sims, reverse=True) and {r["match"] for r in by_meaning} == {"meaning"}


def test_search_by_words_only_has_null_similarity_and_words_match(scanned: tuple[Path, Path], run_cli: CliRunner,
                                                                  env: dict[str, str]) -> None:
    lib, db = scanned
    rows = _lines(run_cli("--db", db, "search", "path:chelsea", "--by", "words", "--json", env=env).out)
    assert [(r["path"], r["similarity"], r["match"]) for r in rows] == [(str(lib / "cats" / "chelsea.jpg"), None,
                                                                        "words")]


def test_a_word_hit_found_by_meaning_too_is_both_and_the_others_are_by_meaning(
        scanned: tuple[Path, Path], run_cli: CliRunner, env: dict[str, str]) -> None:
    lib, db = scanned
    rows = _lines(run_cli("--db", db, "search", "coffee", "--json", "--limit", "10", env=env).out)
    matches = {str(r["path"]): r["match"] for r in rows}
    assert matches[str(lib / "coffee.jpg")] == "both"  # "coffee" in its path, and within the meaning ranking
    assert {m for p, m in matches.items() if p != str(lib / "coffee.jpg")} == {"meaning"}
    text = run_cli("--db", db, "search", "coffee", "--limit", "10", env=env).out
    assert text.count("by meaning (similarity") == len(rows) - 1


def test_filters_apply_to_meaning_hits(scanned: tuple[Path, Path], run_cli: CliRunner, env: dict[str, str]) -> None:
    lib, db = scanned
    inside = _lines(run_cli("--db", db, "search", "animal", "--in", lib / "cats", "--json", env=env).out)
    assert [r["path"] for r in inside] == [str(lib / "cats" / "chelsea.jpg")]
    none = run_cli("--db", db, "search", "animal", "--since", "2100", "--json", env=env)
    assert none.code == 0 and none.out == ""
    humans = run_cli("--db", db, "search", "animal", "--source", "human", "--json", env=env)
    assert humans.out == ""  # every caption here is the model's
    fielded = _lines(run_cli("--db", db, "search", "animal", "path:astronaut", "--by", "meaning", "--json",
                             env=env).out)
    assert fielded and all("astronaut" in str(r["path"]) for r in fielded)
    excluded = _lines(run_cli("--db", db, "search", "animal", "-astronaut", "--by", "meaning", "--json",
                              env=env).out)
    assert excluded and not any("astronaut" in str(r["path"]) for r in excluded)


def test_without_an_embedding_model_both_is_words_and_meaning_is_a_one_line_error(
        scanned: tuple[Path, Path], run_cli: CliRunner, env: dict[str, str]) -> None:
    _lib, db = scanned
    off = {**env, "CAPWATCH_EMBED_MODEL": "off"}
    words = run_cli("--db", db, "search", "path:coffee", "--json", env=off)
    assert words.code == 0 and words.err == ""
    assert [r["match"] for r in _lines(words.out)] == ["words"]
    quiet = run_cli("--db", db, "search", "coffee", env=off)
    assert quiet.code == 0 and quiet.err == ""
    told = run_cli("--db", db, "-v", "search", "coffee", env=off)
    assert told.err.count("words only") == 1
    line = assert_one_line_error(run_cli("--db", db, "search", "coffee", "--by", "meaning", env=off))
    assert "meaning" in line
    missing = {**env, "CAPWATCH_EMBED_MODEL": str(FIXTURES / "models" / "nope")}
    assert run_cli("--db", db, "search", "coffee", env=missing).code == 0
    assert_one_line_error(run_cli("--db", db, "search", "coffee", "--by", "meaning", env=missing))
    other = {**env, "CAPWATCH_EMBED_MODEL": str(FIXTURES / "models" / "clip-tiny")}  # no vectors of this one
    assert "no image in the index has an embedding" in assert_one_line_error(
        run_cli("--db", db, "search", "coffee", "--by", "meaning", env=other))
    assert_one_line_error(run_cli("--db", db, "search", "kw:coffee", "--by", "meaning", env=env))
    assert_one_line_error(run_cli("--db", db, "search", "coffee", "--by", "sound", env=env))


# -- similar ----------------------------------------------------------------------------------------------------


def test_similar_lists_the_most_alike_first_and_leaves_the_file_out(scanned: tuple[Path, Path],
                                                                     run_cli: CliRunner, env: dict[str, str]) -> None:
    lib, db = scanned
    result = run_cli("--db", db, "similar", lib / "astronaut.jpg", "--json", "--limit", "4", env=env)
    assert result.code == 0, result.err
    rows = _lines(result.out)
    assert [set(r) for r in rows] == [{"path", "similarity", "caption"}] * 4
    assert str(lib / "astronaut.jpg") not in [r["path"] for r in rows]
    assert {str(r["path"]) for r in rows} == {str(lib / f"astronaut-{s}") for s in
                                              ("copy.jpg", "q60.jpg", "half.png", "burst.jpg")}
    sims = [float(r["similarity"]) for r in rows]  # type: ignore[arg-type]
    assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(1.0, abs=1e-4)


def test_similar_embeds_a_file_that_is_not_indexed(scanned: tuple[Path, Path], tmp_path: Path, run_cli: CliRunner,
                                                    env: dict[str, str]) -> None:
    lib, db = scanned
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(FIXTURES / "photos" / "coffee.jpg", outside)
    rows = _lines(run_cli("--db", db, "similar", outside, "--json", "--limit", "1", env=env).out)
    assert rows[0]["path"] == str(lib / "coffee.jpg") and float(rows[0]["similarity"]) > 0.9999  # type: ignore


def test_similar_errors_are_one_line(scanned: tuple[Path, Path], tmp_path: Path, run_cli: CliRunner,
                                     env: dict[str, str]) -> None:
    lib, db = scanned
    assert_one_line_error(run_cli("--db", db, "similar", tmp_path / "missing.jpg", env=env))
    (tmp_path / "not-an-image.jpg").write_text("hello")
    assert_one_line_error(run_cli("--db", db, "similar", tmp_path / "not-an-image.jpg", env=env))
    empty = tmp_path / "empty.db"
    run_cli("--db", empty, "status", env=env)
    assert_one_line_error(run_cli("--db", empty, "similar", lib / "coffee.jpg", env=env))


# -- duplicates -------------------------------------------------------------------------------------------------


def test_duplicates_groups_copies_reencodes_resizes_and_a_burst_but_not_other_photos(
        scanned: tuple[Path, Path], run_cli: CliRunner, env: dict[str, str]) -> None:
    lib, db = scanned
    result = run_cli("--db", db, "duplicates", "--json", env=env)
    assert result.code == 0, result.err
    groups = _lines(result.out)
    astronauts = sorted(str(p) for p in lib.glob("astronaut*"))
    assert [g["paths"] for g in groups] == [astronauts]
    assert 0.95 <= float(groups[0]["similarity"]) < 0.999  # type: ignore[arg-type]  # the burst shot is the lowest


def test_a_stricter_threshold_leaves_the_burst_shot_out(scanned: tuple[Path, Path], run_cli: CliRunner,
                                                        env: dict[str, str]) -> None:
    lib, db = scanned
    groups = _lines(run_cli("--db", db, "duplicates", lib, "--threshold", "0.995", "--json", env=env).out)
    assert [g["paths"] for g in groups] == [sorted(str(p) for p in lib.glob("astronaut*") if "burst" not in p.name)]
    assert float(groups[0]["similarity"]) >= 0.995  # type: ignore[arg-type]
    inside = run_cli("--db", db, "duplicates", lib / "cats", "--json", env=env)
    assert inside.code == 0 and inside.out == ""
    text = run_cli("--db", db, "duplicates", lib, "--threshold", "0.995", env=env).out
    assert text.splitlines()[0].startswith("4 images, similarity")
    assert_one_line_error(run_cli("--db", db, "duplicates", lib / "nowhere", env=env))
    assert_one_line_error(run_cli("--db", db, "duplicates", "--threshold", "2", env=env))


# -- the query's text embedding from a running daemon ------------------------------------------------------------


def test_a_running_daemon_embeds_the_query_and_the_answer_is_the_same(
        scanned: tuple[Path, Path], tmp_path: Path, run_cli: CliRunner, env: dict[str, str]) -> None:
    import os
    import sys
    import time

    from capwatch.daemon.textserver import ask, socket_path
    from tests.conftest import isolated_env

    lib, db = scanned
    alone = _lines(run_cli("--db", db, "search", "a cat on a sofa", "--by", "meaning", "--json", env=env).out)
    daemon = subprocess.Popen([sys.executable, "-m", "capwatch", "--db", str(db), "watch", str(lib)],
                              env={**isolated_env(tmp_path), **env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while ask(db, "probe") is None:
            assert daemon.poll() is None and time.monotonic() < deadline, "the daemon never answered"
            time.sleep(0.2)
        assert socket_path(db).stat().st_mode & 0o077 == 0  # only the daemon's user may ask
        answer = ask(db, "a cat on a sofa", nearest=3)
        assert answer is not None and answer[2] is not None
        assert [s for _, s in answer[2]] == pytest.approx([r["similarity"] for r in alone[:3]], abs=1e-5)
        asked = run_cli("--db", db, "-v", "search", "a cat on a sofa", "--by", "meaning", "--json", env=env)
        assert asked.code == 0, asked.err
        assert "came from the running daemon" in asked.err
        rows = _lines(asked.out)
        assert [r["path"] for r in rows] == [r["path"] for r in alone]
        assert [r["similarity"] for r in rows] == pytest.approx([r["similarity"] for r in alone], abs=1e-5)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert not socket_path(db).exists()
    # No daemon: the search loads the model itself, and the answer is the same.
    again = run_cli("--db", db, "-v", "search", "a cat on a sofa", "--by", "meaning", "--json", env=env)
    assert "running daemon" not in again.err.replace("no text embedding from a running daemon", "")
    assert [r["path"] for r in _lines(again.out)] == [r["path"] for r in alone]


def test_capwatch_serve_answers_query_embeddings_while_it_runs_and_removes_its_socket(
        scanned: tuple[Path, Path], tmp_path: Path, run_cli: CliRunner, env: dict[str, str]) -> None:
    import time

    from capwatch.daemon.textserver import ask, socket_path
    from tests.web_helpers import serving

    lib, db = scanned
    alone = _lines(run_cli("--db", db, "search", "a cat on a sofa", "--by", "meaning", "--json", env=env).out)
    config = tmp_path / "config.toml"
    config.write_text(f'[library]\nroots = ["{lib}"]\n[index]\npath = "{db}"\n')
    with serving(tmp_path, config, env=env):
        deadline = time.monotonic() + 120
        while ask(db, "probe") is None:
            assert time.monotonic() < deadline, "capwatch serve never answered on the query socket"
            time.sleep(0.2)
        asked = run_cli("--db", db, "-v", "search", "a cat on a sofa", "--by", "meaning", "--json", env=env)
        assert asked.code == 0, asked.err
        assert "came from the running daemon" in asked.err
        rows = _lines(asked.out)
        assert [r["path"] for r in rows] == [r["path"] for r in alone]
        assert [r["similarity"] for r in rows] == pytest.approx([r["similarity"] for r in alone], abs=1e-5)
        # The answer covers the results: neither numpy nor the model layer is loaded by the search process.
        timed = run_cli("--db", db, "-v", "search", "a cat", "--by", "meaning", "--limit", "3", "--json",
                        env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
        assert timed.code == 0 and "came from the running daemon" in timed.err, timed.err
        loaded = {line.rsplit("|", 1)[-1].strip() for line in timed.err.splitlines() if line.startswith("import time")}
        assert "capwatch.cli.find" in loaded
        assert "numpy" not in loaded and "onnxruntime" not in loaded, sorted(loaded)
    assert not socket_path(db).exists()


def test_a_scan_prepares_the_text_graph_the_next_search_loads(scanned: tuple[Path, Path], tmp_path: Path,
                                                              run_cli: CliRunner, env: dict[str, str]) -> None:
    _, db = scanned
    derived = tmp_path / "home" / ".cache" / "capwatch" / "derived"
    optimised = [p for p in derived.iterdir() if "-optimized-" in p.name and not p.name.endswith(".failed")]
    assert len(optimised) == 1  # the embedder's text graph, as onnxruntime optimises it, made by the scan
    assert (optimised[0] / "graph.ort-optimized.onnx").is_file()
    made = sorted(p.name for p in derived.iterdir())
    result = run_cli("--db", db, "search", "a cat", "--by", "meaning", env=env)
    assert result.code == 0, result.err
    assert sorted(p.name for p in derived.iterdir()) == made  # the search found it made: nothing new


def test_a_search_keeps_the_codes_in_the_cache_and_the_next_one_after_a_scan_sees_the_new_photos(
        scanned: tuple[Path, Path], tmp_path: Path, run_cli: CliRunner, env: dict[str, str]) -> None:
    lib, db = scanned
    codes = tmp_path / "home" / ".cache" / "capwatch" / "codes"
    first = run_cli("--db", db, "search", "a cat", "--by", "meaning", "--json", env=env)
    assert first.code == 0, first.err
    kept = list(codes.glob("*.codes"))
    assert len(kept) == 1
    made = kept[0].stat().st_mtime_ns
    again = run_cli("--db", db, "search", "a cat", "--by", "meaning", "--json", env=env)
    assert again.out == first.out and kept[0].stat().st_mtime_ns == made  # mapped as it was
    shutil.copy(lib / "coffee.jpg", lib / "coffee-again.jpg")
    assert run_cli("--db", db, "scan", lib, env=env).code == 0
    after = _lines(run_cli("--db", db, "search", "a cat", "--by", "meaning", "--json", env=env).out)
    assert str(lib / "coffee-again.jpg") in {r["path"] for r in after}  # the new photo's code was read
    assert kept[0].stat().st_mtime_ns != made
