"""The index's schema, as numbered migrations: append only, never edit a released one.

Each is applied in its own transaction by :meth:`capwatch.library.index.Index.migrate`, which records it in
``capwatch_migrations``; tests run them from an empty file and from every earlier version with rows in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported when migrating only: sqlite_utils pulls in numpy, ~140 ms that `capwatch search` should not pay.
    import sqlite_utils


def _migration_1(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            fingerprint TEXT,
            width INTEGER,
            height INTEGER,
            taken_at TEXT,
            -- taken_at, or the file's mtime in local time when the camera recorded none: what --since/--until use
            sort_date TEXT NOT NULL,
            caption TEXT,
            source TEXT CHECK (source IS NULL OR source IN ('model', 'human', 'embedded')),
            model TEXT,
            model_revision TEXT,
            captioned_at TEXT,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'captioned', 'described', 'error')),
            error TEXT,
            model_caption TEXT,
            updated_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX images_fingerprint ON images(fingerprint)")
    db.execute("CREATE INDEX images_status ON images(status)")
    db.execute("CREATE INDEX images_sort_date ON images(sort_date)")


def _migration_2(db: sqlite_utils.Database) -> None:
    # External-content FTS5: the text lives once, in `images`; the triggers keep the inverted index in step.
    db.execute(
        """
        CREATE VIRTUAL TABLE images_fts USING fts5(
            caption, model_caption, path, content='images', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )
        """
    )
    # Caption words weigh ten times path words in the ranking.
    db.execute("INSERT INTO images_fts(images_fts, rank) VALUES ('rank', 'bm25(10.0, 5.0, 1.0)')")
    db.execute(
        """
        CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN
            INSERT INTO images_fts(rowid, caption, model_caption, path)
            VALUES (new.id, new.caption, new.model_caption, new.path);
        END
        """
    )
    db.execute(
        """
        CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN
            INSERT INTO images_fts(images_fts, rowid, caption, model_caption, path)
            VALUES ('delete', old.id, old.caption, old.model_caption, old.path);
        END
        """
    )
    db.execute(
        """
        CREATE TRIGGER images_fts_update AFTER UPDATE OF caption, model_caption, path ON images
        WHEN old.caption IS NOT new.caption OR old.model_caption IS NOT new.model_caption
            OR old.path IS NOT new.path BEGIN
            INSERT INTO images_fts(images_fts, rowid, caption, model_caption, path)
            VALUES ('delete', old.id, old.caption, old.model_caption, old.path);
            INSERT INTO images_fts(rowid, caption, model_caption, path)
            VALUES (new.id, new.caption, new.model_caption, new.path);
        END
        """
    )
    db.execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')")


def _migration_3(db: sqlite_utils.Database) -> None:
    # Reconcile reads (path, size, mtime_ns) for every file under a root on each start; a covering index turns
    # that into one ordered index scan instead of a table lookup per row (measured 104 -> 66 ms for 68 000 rows,
    # for ~57 bytes per image).
    db.execute("CREATE INDEX images_stat ON images(path, size, mtime_ns)")


def _migration_4(db: sqlite_utils.Database) -> None:
    # A file's state is more than size and mtime: an in-place edit that keeps both still moves the ctime, and an
    # edited XMP sidecar changes the description without touching the image. Both join the stat-only reconcile,
    # so its covering index grows by them (old rows have NULLs, filled in as reconcile sees the files).
    db.execute("ALTER TABLE images ADD COLUMN ctime_ns INTEGER")
    db.execute("ALTER TABLE images ADD COLUMN sidecars TEXT")
    db.execute("DROP INDEX images_stat")
    db.execute("CREATE INDEX images_stat ON images(path, size, mtime_ns, ctime_ns, sidecars)")


_FTS5_COLUMNS = ("caption", "model_caption", "keywords", "ocr_text", "path", "cjk")


def _migration_5(db: sqlite_utils.Database) -> None:
    # Keywords and text found in images become searchable, and search forgives word forms and other scripts:
    # - the porter stemmer over unicode61, so `puppies` finds "puppy" and `running` finds "runs";
    # - `cjk`: the Chinese/Japanese/Korean characters of a row's text, one token each (capwatch.library.text_forms),
    #   since unicode61 makes a whole run of them one token and `桜` could not find "日本の桜";
    # - a trigram index over the text found in images only, so a number or a plate matches inside a longer run
    #   ("123" in "AB123C"); most photos have no such text, so it stays small.
    # The whole full-text index is rebuilt once here, in this migration's transaction (redone whole if
    # interrupted).
    from capwatch.library.text_forms import cjk_tokens

    for column in ("keywords", "model_keywords", "ocr_text", "cjk"):
        db.execute(f"ALTER TABLE images ADD COLUMN {column} TEXT")
    for trigger in ("images_fts_insert", "images_fts_delete", "images_fts_update"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE images_fts")
    db.conn.create_function("capwatch_cjk", 4, lambda *texts: cjk_tokens(*texts) or None, deterministic=True)
    db.execute("UPDATE images SET cjk = capwatch_cjk(caption, model_caption, keywords, ocr_text) "
               "WHERE capwatch_cjk(caption, model_caption, keywords, ocr_text) IS NOT NULL")
    columns = ", ".join(_FTS5_COLUMNS)
    new_values = ", ".join(f"new.{c}" for c in _FTS5_COLUMNS)
    old_values = ", ".join(f"old.{c}" for c in _FTS5_COLUMNS)
    changed = " OR ".join(f"old.{c} IS NOT new.{c}" for c in _FTS5_COLUMNS)
    db.execute(f"""
        CREATE VIRTUAL TABLE images_fts USING fts5(
            {columns}, content='images', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )
    """)
    # A person's or the model's caption weighs most, keywords next, then the text found in the image; path least.
    db.execute("INSERT INTO images_fts(images_fts, rank) VALUES ('rank', 'bm25(10.0, 5.0, 6.0, 3.0, 1.0, 8.0)')")
    db.execute("CREATE VIRTUAL TABLE images_text USING fts5(ocr_text, content='images', content_rowid='id', "
               "tokenize='trigram')")
    db.execute(f"""
        CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN
            INSERT INTO images_fts(rowid, {columns}) VALUES (new.id, {new_values});
            INSERT INTO images_text(rowid, ocr_text) SELECT new.id, new.ocr_text WHERE new.ocr_text IS NOT NULL;
        END
    """)
    # Rows without text in the image have no entry in images_text at all (the triggers keep it that way).
    db.execute("INSERT INTO images_text(rowid, ocr_text) SELECT id, ocr_text FROM images WHERE ocr_text IS NOT NULL")
    db.execute(f"""
        CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN
            INSERT INTO images_fts(images_fts, rowid, {columns}) VALUES ('delete', old.id, {old_values});
            INSERT INTO images_text(images_text, rowid, ocr_text)
                SELECT 'delete', old.id, old.ocr_text WHERE old.ocr_text IS NOT NULL;
        END
    """)
    db.execute(f"""
        CREATE TRIGGER images_fts_update AFTER UPDATE OF {columns} ON images
        WHEN {changed} BEGIN
            INSERT INTO images_fts(images_fts, rowid, {columns}) VALUES ('delete', old.id, {old_values});
            INSERT INTO images_fts(rowid, {columns}) VALUES (new.id, {new_values});
            INSERT INTO images_text(images_text, rowid, ocr_text)
                SELECT 'delete', old.id, old.ocr_text WHERE old.ocr_text IS NOT NULL;
            INSERT INTO images_text(rowid, ocr_text) SELECT new.id, new.ocr_text WHERE new.ocr_text IS NOT NULL;
        END
    """)
    db.execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')")


#: (version, name, apply). Append only; never edit a released migration.
MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite_utils.Database], None]], ...] = (
    (1, "images table", _migration_1),
    (2, "full-text index over caption and path", _migration_2),
    (3, "covering index for stat-only reconcile", _migration_3),
    (4, "ctime and sidecar state", _migration_4),
    (5, "keywords, text in images; stemmed, CJK and trigram search", _migration_5),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
