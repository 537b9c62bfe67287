"""The SQLite index: schema and migrations, row operations, FTS kept in step, and failure modes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from capwatch.errors import IndexUnavailable
from capwatch.library.index import ImageRecord, Index, IndexedState
from capwatch.library.migrations import SCHEMA_VERSION
from capwatch.library.search import SearchFilters, make_filters, parse_query
from tests.conftest import read_only_dir


def _rec(path: str, caption: str | None = None, **kw: object) -> ImageRecord:
    base = {"size": 10, "mtime_ns": 1_600_000_000 * 10**9}
    base.update(kw)
    return ImageRecord(path=path, caption=caption, **base)  # type: ignore[arg-type]


def _paths(index: Index, query: str, **filters: object) -> list[str]:
    return [h.path for h in index.search(parse_query(query), SearchFilters(**filters))]  # type: ignore[arg-type]


def test_new_index_is_created_with_every_migration_recorded(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "dir" / "index.db"
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(db)
    versions = [r[0] for r in conn.execute("SELECT version FROM capwatch_migrations ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_opening_an_index_waits_for_another_connection_that_is_writing_to_it(tmp_path: Path) -> None:
    # SQLite refuses the switch to WAL at once, without waiting, while another connection holds a lock: two
    # programs opening a new index at the same moment (the daemon's threads, a scan beside it) lost one of them.
    import threading

    path = tmp_path / "index.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE unrelated (x)")  # still in the rollback-journal mode of a new file
    other.execute("BEGIN IMMEDIATE")
    done = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    done.start()
    try:
        with Index.open(path, busy_timeout=20) as index:
            assert index.schema_version() == SCHEMA_VERSION
    finally:
        done.join()
        other.close()


def test_upgrade_from_version_1_makes_existing_rows_searchable(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    index = Index(conn, db, 1.0)
    index.migrate(target=1)
    conn.execute(
        "INSERT INTO images (path, size, mtime_ns, sort_date, caption, status, updated_at) "
        "VALUES ('/p/old.jpg', 1, 1, '2020-01-01T00:00:00', 'an old lighthouse', 'captioned', 'x')"
    )
    assert index.schema_version() == 1
    conn.close()
    with Index.open(db) as upgraded:
        assert upgraded.schema_version() == SCHEMA_VERSION
        assert _paths(upgraded, "lighthouse") == ["/p/old.jpg"]


def test_upsert_get_move_remove_keep_fts_in_step(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec("/lib/a.jpg", "a red bike leaning on a wall", source="model", status="captioned"))
        index.upsert(_rec("/lib/b.jpg", "a dog on the beach", source="human", status="described"))
        assert _paths(index, "bike") == ["/lib/a.jpg"]
        index.upsert(_rec("/lib/a.jpg", "a blue car", source="model", status="captioned"))
        assert _paths(index, "bike") == []
        assert _paths(index, "car") == ["/lib/a.jpg"]
        index.move("/lib/a.jpg", "/lib/2024/renamed.jpg")
        assert index.get("/lib/a.jpg") is None
        moved = index.get("/lib/2024/renamed.jpg")
        assert moved is not None and moved.caption == "a blue car"
        assert _paths(index, "renamed") == ["/lib/2024/renamed.jpg"]  # path words are searchable
        index.remove("/lib/2024/renamed.jpg")
        assert _paths(index, "car") == []
        assert index.stats().images == 1


def test_model_caption_of_a_described_file_is_searchable(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec("/lib/x.jpg", "Grandma's 80th birthday", source="human", status="described",
                          model_caption="a group of people around a cake"))
        hits = index.search(parse_query("cake"), SearchFilters())
        assert [h.caption for h in hits] == ["Grandma's 80th birthday"]


def test_caption_words_rank_above_path_words(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec("/lib/beach/one.jpg", "a mountain lake", status="captioned", source="model"))
        index.upsert(_rec("/lib/misc/two.jpg", "children on the beach", status="captioned", source="model"))
        assert _paths(index, "beach") == ["/lib/misc/two.jpg", "/lib/beach/one.jpg"]


def test_filters_in_dir_dates_and_source(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec("/lib/2019/a.jpg", "snow", taken_at="2019-12-31T23:59:59", source="model"))
        index.upsert(_rec("/lib/2020/b.jpg", "snow", taken_at="2020-01-01T00:00:00", source="human"))
        old = 1_262_304_000 * 10**9  # 2010: these two have no date taken, so their mtime counts
        index.upsert(_rec("/lib/2019-extra/c.jpg", "snow", source="embedded", mtime_ns=old))
        index.upsert(_rec("/lib/2019.jpg", "snow", mtime_ns=old))
        assert sorted(_paths(index, "snow", in_dir="/lib/2019")) == ["/lib/2019/a.jpg"]
        assert sorted(_paths(index, "snow", in_dir="/lib/2019/")) == ["/lib/2019/a.jpg"]
        f = make_filters(since="2019", until="2019")
        assert [h.path for h in index.search(parse_query("snow"), f)] == ["/lib/2019/a.jpg"]
        f = make_filters(since="2020-01")
        assert [h.path for h in index.search(parse_query("snow"), f)] == ["/lib/2020/b.jpg"]
        assert _paths(index, "snow", source="embedded") == ["/lib/2019-extra/c.jpg"]


def test_date_filter_falls_back_to_mtime_when_no_date_taken(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        import datetime as dt

        mtime = dt.datetime(2015, 6, 1, 12, 0).timestamp()
        index.upsert(_rec("/lib/a.jpg", "kite", mtime_ns=int(mtime * 1e9)))
        assert [h.path for h in index.search(parse_query("kite"), make_filters(since="2015-06-01",
                                                                              until="2015-06-01"))] == ["/lib/a.jpg"]
        assert index.search(parse_query("kite"), make_filters(since="2016")) == []


def test_stats_count_by_status_and_source_and_list_errors(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec("/a.jpg", "x", source="model", status="captioned"))
        index.upsert(_rec("/b.jpg", "y", source="human", status="described"))
        index.upsert(_rec("/c.jpg"))
        index.upsert(_rec("/d.jpg"))
        index.set_error("/d.jpg", "cannot decode /d.jpg: truncated\nsecond line")
        stats = index.stats()
    assert stats.images == 4 and stats.captioned == 2
    assert stats.by_status == {"pending": 1, "captioned": 1, "described": 1, "error": 1}
    assert stats.by_source == {"model": 1, "human": 1, "embedded": 0}
    assert [e.error for e in stats.last_errors] == ["cannot decode /d.jpg: truncated"]
    assert stats.size_bytes > 0


def test_corrupt_file_is_reported_in_one_line_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    db.write_bytes(b"this is not a database at all" * 100)
    before = db.read_bytes()
    with pytest.raises(IndexUnavailable, match="damaged or not a capwatch index"):
        Index.open(db)
    with pytest.raises(IndexUnavailable, match="damaged or not a capwatch index"):
        Index.open(db, readonly=True)
    assert db.read_bytes() == before


def test_foreign_sqlite_database_is_not_adopted(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE images (x)")
    conn.commit()
    conn.close()
    with pytest.raises(IndexUnavailable, match="not our index"):
        Index.open(db)


def test_read_only_location_is_one_line(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_dir(ro), pytest.raises(IndexUnavailable, match="read-only"):
        Index.open(ro / "index.db")


def test_uncreatable_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IndexUnavailable, match="cannot create index directory"):
        Index.open(blocker / "sub" / "index.db")


def test_readonly_open_of_missing_index_says_to_scan(tmp_path: Path) -> None:
    with pytest.raises(IndexUnavailable, match="run `capwatch scan"):
        Index.open(tmp_path / "none.db", readonly=True)


def test_writer_waits_for_a_lock_then_gives_up_with_one_line(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    Index.open(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None);"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)", str(db)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexUnavailable, match="locked by another process"), \
                Index.open(db, busy_timeout=0.3) as index:
            index.upsert(_rec("/a.jpg", "x"))
    finally:
        holder.kill()
        holder.wait()
    with Index.open(db) as index:  # nothing lost, usable again once the other process is gone
        index.upsert(_rec("/a.jpg", "x"))
        assert index.get("/a.jpg") is not None


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    Index.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO capwatch_migrations VALUES (99, 'future', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(IndexUnavailable, match="newer than this capwatch"):
        Index.open(db)


def test_common_words_rank_only_the_newest_window_of_matches(tmp_path: Path) -> None:
    with Index.open(tmp_path / "i.db") as index:
        # Older rows have the shorter (better-scoring) captions, so a full ranking would put them first.
        index.upsert_many([_rec(f"/lib/{i:03d}.jpg", "snow" + " hill" * i) for i in range(50)])
        query = parse_query("snow")
        windowed = [h.path for h in index.search(query, SearchFilters(), limit=5, window=10)]
        full = [h.path for h in index.search(query, SearchFilters(), limit=5, window=0)]
    assert full == [f"/lib/{i:03d}.jpg" for i in range(5)]
    assert windowed == [f"/lib/{i:03d}.jpg" for i in range(40, 45)]


def test_in_dir_with_quotes_and_odd_names(tmp_path: Path) -> None:
    odd = '/lib/Tom "the cat" (2020)'
    with Index.open(tmp_path / "i.db") as index:
        index.upsert(_rec(f"{odd}/a.jpg", "tabby"))
        index.upsert(_rec("/lib/Tom/b.jpg", "tabby"))
        index.upsert(_rec("/lib/!!!/c.jpg", "tabby"))
        assert _paths(index, "tabby", in_dir=odd) == [f"{odd}/a.jpg"]
        assert _paths(index, "tabby", in_dir="/lib/!!!") == ["/lib/!!!/c.jpg"]
        assert sorted(_paths(index, "tabby", in_dir="/lib")) == sorted(
            [f"{odd}/a.jpg", "/lib/Tom/b.jpg", "/lib/!!!/c.jpg"])


def test_upgrade_from_version_2_adds_the_reconcile_index_and_the_file_state_and_keeps_rows(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=2)  # an index as the previous release left it
    conn.execute(
        "INSERT INTO images (path, size, mtime_ns, sort_date, caption, status, updated_at) "
        "VALUES ('/lib/a.jpg', 10, 20, '2020-01-01T00:00:00', 'a harbour at dusk', 'captioned', 'x')"
    )
    conn.close()
    with Index.open(db, readonly=True) as index:  # `capwatch search` right after upgrading capwatch
        assert _paths(index, "harbour") == ["/lib/a.jpg"]
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        # ctime and sidecars are not known for old rows: reconcile fills them in without reading the files.
        assert index.stat_map("/lib") == {"/lib/a.jpg": IndexedState(10, 20, None, None)}
        assert _paths(index, "harbour") == ["/lib/a.jpg"]
        plan = " ".join(str(r) for r in index._conn.execute(
            "EXPLAIN QUERY PLAN SELECT path, size, mtime_ns, ctime_ns, sidecars FROM images "
            "WHERE path >= '/a' AND path < '/b'"))
        assert "COVERING INDEX images_stat" in plan
        index.fill_state_many([("/lib/a.jpg", 30, "")])
        assert index.stat_map("/lib") == {"/lib/a.jpg": IndexedState(10, 20, 30, "")}
        assert index.get("/lib/a.jpg").caption == "a harbour at dusk"  # type: ignore[union-attr]


def test_upgrade_from_version_3_keeps_rows_and_their_state(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db, isolation_level=None)
    Index(conn, db, 1.0).migrate(target=3)
    conn.execute(
        "INSERT INTO images (path, size, mtime_ns, fingerprint, sort_date, caption, source, status, updated_at) "
        "VALUES ('/lib/b.jpg', 11, 21, 'f00d', '2020-01-01T00:00:00', 'a red bike', 'model', 'captioned', 'x')"
    )
    conn.close()
    with Index.open(db) as index:
        assert index.schema_version() == SCHEMA_VERSION
        record = index.get("/lib/b.jpg")
        assert record is not None and (record.caption, record.fingerprint, record.ctime_ns) == ("a red bike", "f00d",
                                                                                                None)
        assert _paths(index, "bike") == ["/lib/b.jpg"]


def test_row_readers_are_kept_for_the_next_use_and_closed_before_the_index(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    index = Index.open(db)
    index.upsert_many([_rec("/lib/a.jpg", "a dog")])
    with index.row_reader() as first:
        assert first.execute("SELECT count(*) FROM images").fetchone() == (1,)
        assert first.execute("PRAGMA mmap_size").fetchone() == (0,)  # scattered reads: no memory map
    with index.row_reader() as again:
        assert again is first
    index.close()
    with pytest.raises(sqlite3.ProgrammingError):
        first.execute("SELECT 1")
    # Closed before the index's own connection, which (the last) checkpoints and empties the WAL as before.
    assert Path(f"{db}-wal").stat().st_size == 0


def test_a_row_reader_whose_block_raised_is_closed_not_kept(tmp_path: Path) -> None:
    index = Index.open(tmp_path / "index.db")
    try:
        with pytest.raises(sqlite3.OperationalError), index.row_reader() as conn:
            conn.execute("SELECT * FROM no_such_table")
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
        with index.row_reader() as fresh:
            assert fresh is not conn
    finally:
        index.close()


def test_row_readers_opened_ahead_are_the_ones_lent_afterwards(tmp_path: Path) -> None:
    index = Index.open(tmp_path / "index.db")
    index.open_row_readers(3)
    kept = list(index._row_readers or [])
    assert len(kept) == 3
    index.open_row_readers(2)  # enough kept already: none opened
    with index.row_reader() as conn:
        assert conn in kept
    index.close()
    index.open_row_readers(3)  # a closed index opens none
    assert index._row_readers is None
