"""Schema 6 and the vector store: migrations (from 5, killed midway), storing and replacing vectors, the
two-stage search (sign-bit candidates, exact rescoring) against an exact search, filters, and rank fusion."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from migration_helpers import open_killed_in_migration

from capwatch.library.index import ImageRecord, Index
from capwatch.library.meaning import QueryVector, filter_part, meaning_text
from capwatch.library.meaning import search as meaning_search
from capwatch.library.migrations import MIGRATIONS, SCHEMA_VERSION
from capwatch.library.search import SearchFilters, fuse_rankings, parse_query
from capwatch.library.signbits import STEP, byte_table, hamming, pack_codes, sign_scores
from capwatch.library.vectors import BLOCK, ROW_READERS, VectorError, Vectors

REPO = Path(__file__).resolve().parent.parent


def _rec(path: str, caption: str | None = None, **kw: object) -> ImageRecord:
    base: dict[str, object] = {"size": 1, "mtime_ns": 1_600_000_000 * 10**9, "status": "captioned",
                               "fingerprint": f"fp-{path}"}
    base.update(kw)
    return ImageRecord(path=path, caption=caption, **base)  # type: ignore[arg-type]


def clustered(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.6,
              queries: int | None = None) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres plus a shared offset (image embeddings share a common
    direction), so that near neighbours are many and close: the case where a coarse first stage can miss.
    ``queries=SEED`` draws text-like queries about the same centres instead: another offset (the gap between
    text and image embeddings) and more spread, so every image is far from them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    offset = rng.standard_normal(dim) * 1.5
    if queries is not None:
        rng = np.random.default_rng(queries)
        offset = rng.standard_normal(dim) * 1.5
    x = centres[rng.integers(0, clusters, n)] + offset + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- migrations ---------------------------------------------------------------------------------------------


def test_new_index_has_the_vector_tables_at_schema_6(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        assert index.schema_version() == SCHEMA_VERSION >= 6
    tables = {r[0] for r in sqlite3.connect(tmp_path / "i.db").execute("SELECT name FROM sqlite_master")}
    assert {"image_vectors", "vector_blocks", "vector_models"} <= tables


def test_upgrade_from_version_5_keeps_rows_and_lets_them_get_vectors(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=5)
    conn.execute("INSERT INTO images (path, size, mtime_ns, sort_date, caption, status, updated_at) "
                 "VALUES ('/lib/a.jpg', 1, 1, '2020-01-01T00:00:00', 'a dog', 'captioned', 'x')")
    conn.close()
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        vectors = Vectors(index)
        assert vectors.missing("m") == [("/lib/a.jpg", None)]
        assert vectors.put_many([("/lib/a.jpg", "m", None, [1.0, 0.0, 0.0])]) == 1
        assert vectors.missing("m") == []
        assert [p.path for p in index.search(parse_query("dog"), SearchFilters())] == ["/lib/a.jpg"]


@pytest.mark.parametrize("stop_after", [1, 4, 99])
def test_migration_6_killed_midway_leaves_schema_5_whole_and_runs_again(tmp_path: Path, stop_after: int) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=5)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executemany(
        "INSERT INTO images (path, size, mtime_ns, sort_date, caption, status, updated_at) "
        "VALUES (?, 1, 1, '2020-01-01T00:00:00', ?, 'captioned', 'x')",
        ((f"/lib/{i:04d}.jpg", f"harbour with boats {i}") for i in range(500)),
    )
    conn.close()
    assert open_killed_in_migration(db, 6, stop_after) == -9  # it really died inside migration 6
    check = sqlite3.connect(db)
    assert check.execute("SELECT max(version) FROM capwatch_migrations").fetchone()[0] == 5
    names = {r[0] for r in check.execute("SELECT name FROM sqlite_master")}
    assert not names & {"image_vectors", "vector_blocks", "vector_models", "image_vectors_image_gone"}
    assert check.execute("SELECT count(*) FROM images").fetchone()[0] == 500
    check.close()
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        assert len(index.search(parse_query("boat"), SearchFilters(), limit=3)) == 3
        assert Vectors(index).put_many([("/lib/0001.jpg", "m", None, [0.0, 1.0])]) == 1


def test_every_migration_is_numbered_in_order() -> None:
    assert [m[0] for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


# -- storing ------------------------------------------------------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> Index:
    ix = Index.open(tmp_path / "i.db")
    yield ix
    ix.close()


def test_a_vector_is_stored_exactly_and_found_again(index: Index) -> None:
    index.upsert_many([_rec("/lib/a.jpg", "a dog"), _rec("/lib/b.jpg", "a cat")])
    store = Vectors(index)
    v = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    assert store.put_many([("/lib/a.jpg", "m", "fp-/lib/a.jpg", v), ("/nowhere.jpg", "m", None, v)]) == 1
    np.testing.assert_array_equal(store.vector_of("/lib/a.jpg", "m"), v)
    assert store.vector_of("/lib/a.jpg", "other") is None
    assert store.missing("m") == [("/lib/b.jpg", "fp-/lib/b.jpg")]
    assert [(m.model, m.dim, m.live) for m in store.models()] == [("m", 3, 1)]


def test_a_changed_file_needs_its_vector_again(index: Index) -> None:
    index.upsert(_rec("/lib/a.jpg", "a dog"))
    store = Vectors(index)
    store.put_many([("/lib/a.jpg", "m", "fp-/lib/a.jpg", [1.0, 0.0])])
    index.upsert(_rec("/lib/a.jpg", "a dog", fingerprint="changed"))
    assert store.missing("m") == [("/lib/a.jpg", "changed")]
    assert store.missing("other-model") == [("/lib/a.jpg", "changed")]


def test_a_vector_of_another_width_for_the_same_model_is_refused(index: Index) -> None:
    index.upsert_many([_rec("/lib/a.jpg"), _rec("/lib/b.jpg")])
    store = Vectors(index)
    store.put_many([("/lib/a.jpg", "m", None, [1.0, 0.0])])
    with pytest.raises(VectorError, match="2-d"):
        store.put_many([("/lib/b.jpg", "m", None, [1.0, 0.0, 0.0])])
    assert store.count("m") == 1


def test_deleting_an_image_deletes_its_vector_and_search_never_returns_it(index: Index) -> None:
    index.upsert_many([_rec("/lib/a.jpg"), _rec("/lib/b.jpg")])
    store = Vectors(index)
    store.put_many([("/lib/a.jpg", "m", None, [1.0, 0.0]), ("/lib/b.jpg", "m", None, [0.9, 0.1])])
    index.remove("/lib/a.jpg")
    assert store.count("m") == 1
    assert [store.paths_of([i])[i] for i, _ in store.nearest("m", [1.0, 0.0])] == ["/lib/b.jpg"]


def test_moving_a_file_keeps_its_vector(index: Index) -> None:
    index.upsert(_rec("/lib/a.jpg"))
    store = Vectors(index)
    store.put_many([("/lib/a.jpg", "m", None, [1.0, 0.0])])
    index.move("/lib/a.jpg", "/lib/moved.jpg")
    np.testing.assert_array_equal(store.vector_of("/lib/moved.jpg", "m"), [1.0, 0.0])


def test_replaced_vectors_leave_stale_codes_that_are_rebuilt_away(index: Index) -> None:
    index.upsert_many([_rec(f"/lib/{i}.jpg") for i in range(10)])
    store = Vectors(index)
    rng = np.random.default_rng(1)
    for _ in range(3 * BLOCK // 10 + 20):  # every image re-embedded many times: the blocks fill with stale codes
        store.put_many([(f"/lib/{i}.jpg", "m", None, rng.standard_normal(16)) for i in range(10)])
    conn = index.connection
    entries, live = conn.execute("SELECT entries, live FROM vector_models WHERE model = 'm'").fetchone()
    assert live == 10 and entries <= 2 * live + BLOCK + 10
    query = rng.standard_normal(16)
    near, exact = store.nearest("m", query, limit=10), store.exact_nearest("m", query, limit=10)
    assert [i for i, _ in near] == [i for i, _ in exact]
    assert [s for _, s in near] == pytest.approx([s for _, s in exact], abs=1e-6)


def test_pack_codes_keeps_one_sign_bit_per_dimension_in_whole_words() -> None:
    codes = pack_codes(np.array([[1.0, -1.0, 0.5] + [-1.0] * 67]))
    assert codes.shape == (1, 16) and codes[0, 0] == 0b10100000 and not codes[0, 1:].any()


@pytest.mark.parametrize("width", [8, 16])  # 512 bits; 768 bits padded to 1024
def test_hamming_counts_differing_bits_across_steps_of_rows(width: int) -> None:
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**64, size=(2 * STEP + 5, width), dtype=np.uint64)
    words[3] = ~words[7]  # every bit differs: the largest count, 64 per word
    query = words[7].copy()
    naive = np.unpackbits((words ^ query).view(np.uint8), axis=1).sum(axis=1)
    assert hamming(words, query).tolist() == naive.tolist()


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_hamming_split_across_threads_gives_every_row_its_own_count(workers: int) -> None:
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**64, size=(3 * STEP + 7, 8), dtype=np.uint64)
    query = rng.integers(0, 2**64, size=8, dtype=np.uint64)
    naive = np.unpackbits((words ^ query).view(np.uint8), axis=1).sum(axis=1)
    assert hamming(words, query, workers=workers).tolist() == naive.tolist()
    # Fewer rows than two steps: one part, whatever was asked.
    assert hamming(words[:STEP], query, workers=workers).tolist() == naive[:STEP].tolist()


def test_hamming_split_across_threads_raises_its_error_in_the_caller() -> None:
    words = np.zeros((2 * STEP, 8), dtype=np.uint64)
    with pytest.raises(ValueError):
        hamming(words, np.zeros(9, dtype=np.uint64), workers=2)  # a query of the wrong width


def test_sign_scores_are_the_query_against_the_images_sign_bits() -> None:
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((50, 70)).astype(np.float32)  # 70 bits: the last word is padded
    query = rng.standard_normal(70).astype(np.float32)
    codes = pack_codes(vectors)
    expected = (vectors > 0).astype(np.float32) @ query
    got = sign_scores(byte_table(query, codes.shape[1]), codes)
    assert np.allclose(got, expected, atol=1e-4)


# -- searching ----------------------------------------------------------------------------------------------


def test_two_stage_search_recalls_the_exact_top_10_on_clustered_vectors(index: Index) -> None:
    n, dim = 6000, 512
    data = clustered(n, dim, clusters=40)
    index.upsert_many([_rec(f"/lib/{i:05d}.jpg") for i in range(n)])
    store = Vectors(index)
    store.put_many((f"/lib/{i:05d}.jpg", "m", None, data[i]) for i in range(n))
    queries = clustered(50, dim, clusters=40, spread=2.0, queries=7)  # text-like: far from every image
    found = total = 0
    for q in queries:
        exact = {i for i, _ in store.exact_nearest("m", q, limit=10)}
        approx = store.nearest("m", q, limit=10)
        found += len(exact & {i for i, _ in approx})
        total += 10
        ranked = [s for _, s in approx]
        assert ranked == sorted(ranked, reverse=True)
    assert found / total >= 0.99


def _stored(index: Index, n: int, dim: int = 64, seed: int = 3) -> np.ndarray:
    data = clustered(n, dim, clusters=8, seed=seed)
    index.upsert_many([_rec(f"/lib/{i:05d}.jpg") for i in range(n)])
    Vectors(index).put_many((f"/lib/{i:05d}.jpg", "m", None, data[i]) for i in range(n))
    return data


def test_codes_read_ahead_on_another_thread_give_the_same_answer(index: Index) -> None:
    _stored(index, 2500)
    query = clustered(1, 64, clusters=8, spread=2.0, queries=5)[0]
    ahead = Vectors(index)
    ahead.read_ahead("m")
    ahead.read_ahead("m")  # once per model: a second call starts no second read
    assert [t.name for t in threading.enumerate()].count("capwatch-codes-m") <= 1
    assert ahead.nearest("m", query, limit=10) == Vectors(index).nearest("m", query, limit=10)
    assert not [t for t in threading.enumerate() if t.name == "capwatch-codes-m"]
    # The read-ahead also opened the connections the search's candidates are read with.
    assert 0 < len(index._row_readers or []) <= ROW_READERS


def test_codes_read_ahead_before_another_writer_stored_more_are_read_again(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    with Index.open(db) as writer:
        data = _stored(writer, 2000)
    reader = Index.open(db, readonly=True)
    try:
        vectors = Vectors(reader)
        vectors.read_ahead("m")
        vectors._ahead["m"].join()  # the read-ahead has its (now old) codes
        with Index.open(db) as writer:  # another process stores a copy of the first image (and its vector)
            writer.upsert_many([_rec("/lib/copy.jpg")])
            Vectors(writer).put_many([("/lib/copy.jpg", "m", None, data[0])])
        ids = reader.ids_for(["/lib/00000.jpg", "/lib/copy.jpg"])
        best = vectors.nearest("m", data[0], limit=2)
        assert {i for i, _ in best} == set(ids.values())
        assert [s for _, s in best] == pytest.approx([1.0, 1.0], abs=1e-5)
    finally:
        reader.close()


def test_a_failed_read_ahead_leaves_the_search_to_read_the_codes_itself(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    index = Index.open(db)
    try:
        data = _stored(index, 1500)
        # The file is renamed away under the open index: a new connection (the read-ahead's) cannot open it,
        # the index's own connection still reads it.
        db.rename(tmp_path / "moved.db")
        vectors = Vectors(index)
        vectors.read_ahead("m")
        vectors._ahead["m"].join()
        assert vectors._ahead["m"].codes is None
        assert vectors.nearest("m", data[7], limit=1)[0][1] == pytest.approx(1.0, abs=1e-5)
    finally:
        index.close()


def _counting_block_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from capwatch.library import vectors as vectors_module

    reads: list[str] = []
    real = vectors_module._read_blocks

    def counted(conn: sqlite3.Connection, model: str) -> tuple[np.ndarray, np.ndarray]:
        reads.append(model)
        return real(conn, model)

    monkeypatch.setattr(vectors_module, "_read_blocks", counted)
    return reads


def test_a_one_shot_search_keeps_its_codes_in_a_file_and_the_next_maps_them_instead_of_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, kept = tmp_path / "i.db", tmp_path / "cache" / "codes"
    with Index.open(db) as writer:
        data = _stored(writer, 2500)
    reads = _counting_block_reads(monkeypatch)
    queries = clustered(5, 64, clusters=8, spread=2.0, queries=9)
    with Index.open(db, readonly=True) as reader:
        plain = [Vectors(reader).nearest("m", q, limit=10) for q in queries]
    assert len(reads) == 5 and not kept.exists()  # without a folder: read from the index every time
    with Index.open(db, readonly=True) as reader:
        first = Vectors(reader, codes_dir=kept)
        assert [first.nearest("m", q, limit=10) for q in queries] == plain
    assert len(reads) == 6 and len(list(kept.glob("*.codes"))) == 1
    with Index.open(db, readonly=True) as reader:  # the next process: mapped, not read
        again = Vectors(reader, codes_dir=kept)
        again.read_ahead("m")
        assert [again.nearest("m", q, limit=10) for q in queries] == plain
        assert again.nearest("m", data[11], limit=1)[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(reads) == 6


def test_codes_kept_in_a_file_are_read_again_once_the_vectors_change(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db, kept = tmp_path / "i.db", tmp_path / "codes"
    with Index.open(db) as writer:
        data = _stored(writer, 1500)
    with Index.open(db, readonly=True) as reader:
        Vectors(reader, codes_dir=kept).nearest("m", data[0], limit=1)
    reads = _counting_block_reads(monkeypatch)
    with Index.open(db) as writer:  # another process adds a copy of image 3 (its vector with it)
        writer.upsert_many([_rec("/lib/copy.jpg")])
        Vectors(writer).put_many([("/lib/copy.jpg", "m", None, data[3])])
        copy_id = writer.ids_for(["/lib/copy.jpg"])["/lib/copy.jpg"]
    for _ in range(2):
        with Index.open(db, readonly=True) as reader:
            best = Vectors(reader, codes_dir=kept).nearest("m", data[3], limit=2)
        assert copy_id in {i for i, _ in best}
    assert len(reads) == 1  # read once after the change, mapped the time after


def test_a_damaged_or_foreign_codes_file_is_ignored_and_made_again(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from capwatch.library.codesfile import codes_path

    kept = tmp_path / "codes"
    with Index.open(tmp_path / "a.db") as a:
        data = _stored(a, 1200, seed=3)
    with Index.open(tmp_path / "b.db") as b:
        _stored(b, 1200, seed=4)  # another library, its model named alike, its codes' version alike
    with Index.open(tmp_path / "a.db", readonly=True) as a:
        want = Vectors(a).nearest("m", data[5], limit=5)
    with Index.open(tmp_path / "b.db", readonly=True) as b:
        Vectors(b, codes_dir=kept).nearest("m", data[5], limit=5)
    mine, theirs = codes_path(kept, tmp_path / "a.db", "m"), codes_path(kept, tmp_path / "b.db", "m")
    reads = _counting_block_reads(monkeypatch)
    whole = theirs.read_bytes()
    for damage in (whole, whole[: len(whole) // 2], b"capwatch-codes\n{" + b"\0" * 5000, b""):
        mine.write_bytes(damage)
        with Index.open(tmp_path / "a.db", readonly=True) as a:
            assert Vectors(a, codes_dir=kept).nearest("m", data[5], limit=5) == want
    assert len(reads) == 4  # each time read from the index, and the file written again
    with Index.open(tmp_path / "a.db", readonly=True) as a:
        assert Vectors(a, codes_dir=kept).nearest("m", data[5], limit=5) == want
    assert len(reads) == 4


def test_a_library_that_changed_models_keeps_only_the_new_models_codes_file_and_no_crashed_writes(
        tmp_path: Path) -> None:
    db, kept = tmp_path / "i.db", tmp_path / "codes"
    (kept / "unrelated").mkdir(parents=True)
    crashed, writing = kept / ".abc.codes.41-00ff.tmp", kept / ".abc.codes.42-11ee.tmp"
    crashed.write_bytes(b"half")
    writing.write_bytes(b"half")
    os.utime(crashed, (1_600_000_000, 1_600_000_000))  # a writer that died long ago; the other may be writing
    with Index.open(tmp_path / "other.db") as other:  # another library's file stays
        _stored(other, 300)
    with Index.open(tmp_path / "other.db", readonly=True) as other:
        Vectors(other, codes_dir=kept).nearest("m", np.ones(64, dtype=np.float32), limit=1)
    with Index.open(db) as writer:
        data = _stored(writer, 600)
    with Index.open(db, readonly=True) as reader:
        Vectors(reader, codes_dir=kept).nearest("m", data[0], limit=1)
    assert len(list(kept.glob("*.codes"))) == 2
    with Index.open(db) as writer:  # every image embedded again by another model
        Vectors(writer).put_many((f"/lib/{i:05d}.jpg", "m2", None, data[i]) for i in range(600))
    with Index.open(db, readonly=True) as reader:
        assert Vectors(reader, codes_dir=kept).nearest("m2", data[4], limit=1)[0][1] == pytest.approx(1.0, abs=1e-5)
    from capwatch.library.codesfile import codes_path

    assert sorted(kept.glob("*.codes")) == sorted(
        [codes_path(kept, db, "m2"), codes_path(kept, tmp_path / "other.db", "m")])
    assert (kept / "unrelated").is_dir() and writing.exists() and not crashed.exists()


def test_a_codes_file_stands_only_for_the_state_it_was_made_from(tmp_path: Path) -> None:
    import dataclasses

    from capwatch.library import codesfile

    (tmp_path / "i.db").write_bytes(b"")
    state = codesfile.CodesState.of(tmp_path / "i.db", "m", 7, 3, None, b"last block")
    ids = np.array([5, 9, 11], dtype=np.int64)
    codes = np.arange(3 * 8, dtype=np.uint64).reshape(3, 8)
    path = codesfile.codes_path(tmp_path / "codes", tmp_path / "i.db", "m")
    codesfile.save(path, state, ids, codes)
    mapped = codesfile.load(path, state)
    assert mapped is not None
    assert mapped[0].tolist() == ids.tolist() and np.array_equal(mapped[1], codes)
    # An index made again in a file that got the old inode, up to the same version, count and centre: its last
    # block (how it numbers its images) still tells it apart; so does every other field.
    for change in ({"last_block": "0" * 64}, {"version": 8}, {"entries": 4}, {"model": "m2"}, {"centre": "c"},
                   {"index_ino": state.index_ino + 1}):
        assert codesfile.load(path, dataclasses.replace(state, **change)) is None  # type: ignore[arg-type]


def test_codes_that_cannot_be_kept_are_read_from_the_index(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as writer:
        data = _stored(writer, 800)
    (tmp_path / "not-a-folder").write_text("x")
    with Index.open(tmp_path / "i.db", readonly=True) as reader:
        best = Vectors(reader, codes_dir=tmp_path / "not-a-folder").nearest("m", data[2], limit=1)
    assert best[0][1] == pytest.approx(1.0, abs=1e-5)


def test_nearest_widens_until_enough_candidates_pass_the_filter(index: Index) -> None:
    n = 3000
    data = clustered(n, 32, clusters=5)
    index.upsert_many([_rec(f"/lib/{i:05d}.jpg") for i in range(n)])
    store = Vectors(index)
    store.put_many((f"/lib/{i:05d}.jpg", "m", None, data[i]) for i in range(n))
    paths = store.paths_of(list(range(1, n + 1)))
    rare = {i for i, p in paths.items() if p.endswith("7.jpg") and p[-6] == "9"}  # 30 of 3000
    hits = store.nearest("m", data[0], limit=10, candidates=50, allowed=lambda ids: rare & set(ids))
    assert len(hits) == 10 and {i for i, _ in hits} <= rare
    exact_rare = sorted(((float(data[i - 1] @ data[0]), i) for i in rare), reverse=True)[:10]
    assert [i for i, _ in hits] == [i for _, i in exact_rare]


def test_the_excluded_image_is_left_out(index: Index) -> None:
    index.upsert_many([_rec("/lib/a.jpg"), _rec("/lib/b.jpg")])
    store = Vectors(index)
    store.put_many([("/lib/a.jpg", "m", None, [1.0, 0.0]), ("/lib/b.jpg", "m", None, [0.0, 1.0])])
    a = index.ids_for(["/lib/a.jpg"])["/lib/a.jpg"]
    assert [i for i, _ in store.nearest("m", [1.0, 0.0], exclude=[a])] != [a]
    assert a not in {i for i, _ in store.nearest("m", [1.0, 0.0], exclude=[a])}


def _many_vectors(index: Index, n: int) -> tuple[list[int], np.ndarray]:
    index.upsert_many([_rec(f"/lib/{k:04d}.jpg") for k in range(n)])
    data = np.random.default_rng(11).standard_normal((n, 8)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    Vectors(index).put_many([(f"/lib/{k:04d}.jpg", "m", None, data[k]) for k in range(n)])
    ids = [int(r[0]) for r in index.connection.execute("SELECT id FROM images ORDER BY path")]
    return ids, data


def _counting_connects(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> list[bool]:
    """Count the connections Index opens for other threads (row readers); with ``fail``, refuse to open them."""
    opened: list[bool] = []
    real = Index._connect

    def counted(path: Path, busy_timeout: float, readonly: bool, *, scattered: bool = False) -> sqlite3.Connection:
        if scattered:
            opened.append(True)
            if fail:
                raise sqlite3.OperationalError("unable to open database file")
        return real(path, busy_timeout, readonly, scattered=scattered)

    monkeypatch.setattr(Index, "_connect", staticmethod(counted))
    return opened


def test_similar_photos_of_a_web_request_map_the_kept_codes_instead_of_reading_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capwatch.web.meaning import similar_photos

    monkeypatch.setenv("CAPWATCH_CACHE_DIR", str(tmp_path / "cache"))
    db = tmp_path / "i.db"
    with Index.open(db) as index:
        _stored(index, 1500)
        row = int(index.connection.execute("SELECT id FROM images WHERE path = '/lib/00007.jpg'").fetchone()[0])
    reads = _counting_block_reads(monkeypatch)
    answers = []
    for _ in range(2):  # two requests, each with an index of its own, as the server opens them
        with Index.open(db, readonly=True) as index:
            answers.append(similar_photos(index, row, "m"))
    assert reads == ["m"]  # the first request read the blocks and kept them; the second mapped the file
    assert answers[0] == answers[1] and len(answers[0]) == 12 and row not in {s.row_id for s in answers[0]}
    assert list((tmp_path / "cache" / "codes").glob("*.codes"))


def test_many_vectors_are_read_by_several_connections_kept_for_the_next_search(
        index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    from capwatch.library import vectors as vectors_module

    ids, data = _many_vectors(index, 300)
    opened = _counting_connects(monkeypatch)
    wanted = [*ids[::2], 10**9]  # one id with no vector
    found, matrix = Vectors(index).matrix_of(wanted, "m")
    assert opened  # as many as were reading at once: a reader done early is lent again at once
    assert sorted(found.tolist()) == sorted(ids[::2])
    by_id = dict(zip(ids, data, strict=True))
    assert all(np.allclose(row, by_id[i], atol=1e-6) for i, row in zip(found.tolist(), matrix, strict=True))
    # Later searches (another Vectors of the same index too) borrow the same connections: never more than
    # ROW_READERS in all, each kept by the index.
    for _ in range(5):
        assert sorted(Vectors(index).matrix_of(ids, "m")[0].tolist()) == sorted(ids)
    assert len(opened) <= vectors_module.ROW_READERS
    assert len(index._row_readers or []) == len(opened)
    # Few rows: the caller's connection alone.
    before = len(opened)
    assert len(Vectors(index).matrix_of(ids[:5], "m")[0]) == 5 and len(opened) == before


def test_vectors_read_inside_an_open_transaction_come_from_that_connection(index: Index,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ids, _ = _many_vectors(index, 300)
    opened = _counting_connects(monkeypatch)
    index.connection.execute("BEGIN")
    try:
        index.connection.execute("DELETE FROM image_vectors WHERE image_id = ?", (ids[0],))
        found, _ = Vectors(index).matrix_of(ids, "m")  # other connections would still see the deleted row
    finally:
        index.connection.execute("ROLLBACK")
    assert sorted(found.tolist()) == sorted(ids[1:]) and opened == []


def test_a_reader_that_cannot_open_leaves_its_share_to_the_callers_connection(
        index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, _ = _many_vectors(index, 300)
    opened = _counting_connects(monkeypatch, fail=True)
    found, _ = Vectors(index).matrix_of(ids, "m")
    assert opened and sorted(found.tolist()) == sorted(ids)


def test_vectors_of_another_model_are_never_compared(index: Index) -> None:
    index.upsert_many([_rec("/lib/a.jpg"), _rec("/lib/b.jpg")])
    store = Vectors(index)
    store.put_many([("/lib/a.jpg", "m1", None, [1.0, 0.0]), ("/lib/b.jpg", "m2", None, [1.0, 0.0])])
    assert [store.paths_of([i])[i] for i, _ in store.nearest("m1", [1.0, 0.0])] == ["/lib/a.jpg"]
    assert store.nearest("m3", [1.0, 0.0]) == []


# -- the query's meaning part ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "text", "rest"), [
    ("puppy on a couch", "puppy on a couch", ""),
    ('dog kw:beach "red ball" -snow', "dog", 'kw:beach "red ball" -snow'),
    ("bike OR bicycle street", "bike or bicycle street", ""),
    ("caption:dog path:2020", None, "caption:dog path:2020"),
])
def test_plain_words_are_meant_and_fields_and_phrases_stay_word_searches(query: str, text: str | None,
                                                                        rest: str) -> None:
    parsed = parse_query(query)
    assert meaning_text(parsed) == text
    expected = parse_query(rest) if rest else None
    part = filter_part(parsed)
    if expected is None:
        assert part.groups == () and part.excluded == ()
    else:
        assert (part.groups, part.excluded) == (expected.groups, expected.excluded)


# -- fusion -------------------------------------------------------------------------------------------------


def test_fusion_puts_what_both_rankings_hold_above_either_ones_first() -> None:
    fused = [k for k, _ in fuse_rankings([["a", "b", "c"], ["x", "c", "y"]])]
    assert fused[0] == "c"  # 2nd and 3rd beats 1st in one list only
    assert set(fused) == {"a", "b", "c", "x", "y"}


def test_fusion_of_one_ranking_keeps_its_order_and_ties_keep_the_first_lists_order() -> None:
    assert [k for k, _ in fuse_rankings([["p", "q", "r"]])] == ["p", "q", "r"]
    assert [k for k, _ in fuse_rankings([["w1", "w2"], ["m1", "m2"]])] == ["w1", "m1", "w2", "m2"]


def test_fusion_scores_are_reciprocal_ranks_summed() -> None:
    scores = dict(fuse_rankings([["a", "b"], ["b"]], k=60))
    assert scores["a"] == pytest.approx(1 / 61) and scores["b"] == pytest.approx(1 / 62 + 1 / 61)


def test_fusion_beats_either_ranking_alone_on_constructed_relevance() -> None:
    # Relevant: r1..r3. Each ranking has one relevant image in its top 3; both hold r1 and r2 lower down.
    words = ["r1", "w1", "w2", "w3", "r2"]
    meaning = ["m1", "r3", "m2", "r1", "r2"]
    relevant = {"r1", "r2", "r3"}

    def precision_at_3(ranking: list[str]) -> float:
        return len(set(ranking[:3]) & relevant) / 3

    fused = [k for k, _ in fuse_rankings([words, meaning])]
    assert precision_at_3(fused) > max(precision_at_3(words), precision_at_3(meaning))


# -- fused search through the index -------------------------------------------------------------------------------


def test_both_fuses_word_and_meaning_hits_and_filters_apply_to_meaning_hits(index: Index) -> None:
    index.upsert_many([
        _rec("/lib/2019/dog.jpg", "a dog on a couch", taken_at="2019-05-01T10:00:00"),
        _rec("/lib/2020/puppy.jpg", "a young animal resting", taken_at="2020-05-01T10:00:00"),
        _rec("/lib/2021/car.jpg", "a red car", taken_at="2021-05-01T10:00:00", source="human"),
        _rec("/lib/2022/pup2.jpg", "small fluffy friend", taken_at="2022-05-01T10:00:00", keywords=("pet",)),
    ])
    store = Vectors(index)
    store.put_many([("/lib/2019/dog.jpg", "m", None, [1.0, 0.2, 0.0]),
                    ("/lib/2020/puppy.jpg", "m", None, [1.0, 0.0, 0.0]),
                    ("/lib/2021/car.jpg", "m", None, [0.0, 0.0, 1.0]),
                    ("/lib/2022/pup2.jpg", "m", None, [0.9, 0.1, 0.0])])
    q = QueryVector("m", np.array([1.0, 0.0, 0.0], dtype=np.float32))
    hits = meaning_search(index, parse_query("dog"), SearchFilters(), by="both", vector=q, limit=3)
    assert hits[0].path == "/lib/2019/dog.jpg" and hits[0].match == "both"
    assert {h.path: h.match for h in hits[1:]} == {"/lib/2020/puppy.jpg": "meaning", "/lib/2022/pup2.jpg": "meaning"}
    assert hits[1].similarity == pytest.approx(1.0)
    words = meaning_search(index, parse_query("dog"), SearchFilters(), by="words", vector=q)
    assert [(h.path, h.similarity, h.match) for h in words] == [("/lib/2019/dog.jpg", None, "words")]
    meant = meaning_search(index, parse_query("dog"), SearchFilters(since="2020-01-01T00:00:00",
                                                                     until="2021-01-01T00:00:00"),
                           by="meaning", vector=q)
    assert [h.path for h in meant] == ["/lib/2020/puppy.jpg"]
    inside = meaning_search(index, parse_query("dog"), SearchFilters(in_dir="/lib/2022"), by="meaning", vector=q)
    assert [h.path for h in inside] == ["/lib/2022/pup2.jpg"]
    human = meaning_search(index, parse_query("dog"), SearchFilters(source="human"), by="meaning", vector=q)
    assert [h.path for h in human] == ["/lib/2021/car.jpg"]
    field = meaning_search(index, parse_query("dog kw:pet"), SearchFilters(), by="both", vector=q)
    assert [h.path for h in field] == ["/lib/2022/pup2.jpg"]
    excluded = meaning_search(index, parse_query("dog -fluffy"), SearchFilters(), by="meaning", vector=q)
    assert "/lib/2022/pup2.jpg" not in [h.path for h in excluded]


def test_without_a_query_vector_both_is_words_and_meaning_is_nothing(index: Index) -> None:
    index.upsert(_rec("/lib/dog.jpg", "a dog"))
    assert [h.path for h in meaning_search(index, parse_query("dog"), SearchFilters(), by="both",
                                           vector=None)] == ["/lib/dog.jpg"]
    assert meaning_search(index, parse_query("dog"), SearchFilters(), by="meaning", vector=None) == []


# -- the same search on a Python that can load SQLite extensions ----------------------------------------------


def _extension_python() -> str | None:
    """A Python here whose sqlite3 can load extensions and that runs this tree with the venv's packages."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = "import sqlite3, numpy; assert hasattr(sqlite3.Connection, 'enable_load_extension')"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *_site_packages()])}
        try:
            ok = subprocess.run([candidate, "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0
        except OSError:
            continue
        if ok:
            return candidate
    return None


def _site_packages() -> list[str]:
    import numpy

    return [str(Path(numpy.__file__).parent.parent)]


def test_vector_search_gives_the_same_answer_on_a_python_that_loads_extensions(tmp_path: Path) -> None:
    python = _extension_python()
    if python is None:
        # .ci/run installs Debian's python3, which can: in CI this test must run, never skip.
        if os.environ.get("CI"):
            pytest.fail("CI has no Python that can load SQLite extensions: .ci/run must install Debian's python3")
        pytest.skip("no Python here can load SQLite extensions (none has sqlite3 enable_load_extension)")
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from capwatch.library.index import Index, ImageRecord
        from capwatch.library.vectors import Vectors
        from test_vectors import clustered
        data = clustered(500, 64, clusters=8)
        with Index.open({str(tmp_path / 'x.db')!r}) as index:
            index.upsert_many([ImageRecord(path=f"/lib/{{i}}.jpg", size=1, mtime_ns=1) for i in range(500)])
            Vectors(index).put_many((f"/lib/{{i}}.jpg", "m", None, data[i]) for i in range(500))
            print(json.dumps(Vectors(index).nearest("m", data[3], limit=5)))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *_site_packages()])}
    theirs = subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    with Index.open(tmp_path / "x.db") as index:  # written there, read here (and the other way round)
        ours = Vectors(index).nearest("m", clustered(500, 64, clusters=8)[3], limit=5)
    import json

    assert [(i, round(s, 6)) for i, s in json.loads(theirs.stdout)] == [(i, round(s, 6)) for i, s in ours]
