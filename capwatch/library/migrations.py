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


#: The full-text columns from schema 5 on, in this order (bm25 weights in FTS_WEIGHTS follow it). The ``cjk_*``
#: columns hold a copy of the text only for rows that contain CJK (see capwatch.library.search.cjk_spaced).
FTS_COLUMNS_5 = ("caption", "model_caption", "keywords", "ocr_text", "path", "cjk_caption", "cjk_keywords", "cjk_ocr")
#: Caption highest, keywords next, the model's caption (beside a person's) and text found in the image below the
#: caption, the path lowest. CJK copies weigh as their originals.
FTS_WEIGHTS_5 = (10.0, 5.0, 8.0, 4.0, 1.0, 10.0, 8.0, 4.0)


def _fts_triggers(table: str, columns: tuple[str, ...]) -> list[str]:
    cols = ", ".join(columns)
    new = ", ".join(f"new.{c}" for c in columns)
    old = ", ".join(f"old.{c}" for c in columns)
    changed = " OR ".join(f"old.{c} IS NOT new.{c}" for c in columns)
    return [
        f"CREATE TRIGGER {table}_insert AFTER INSERT ON images BEGIN "
        f"INSERT INTO {table}(rowid, {cols}) VALUES (new.id, {new}); END",
        f"CREATE TRIGGER {table}_delete AFTER DELETE ON images BEGIN "
        f"INSERT INTO {table}({table}, rowid, {cols}) VALUES ('delete', old.id, {old}); END",
        f"CREATE TRIGGER {table}_update AFTER UPDATE OF {cols} ON images WHEN {changed} BEGIN "
        f"INSERT INTO {table}({table}, rowid, {cols}) VALUES ('delete', old.id, {old}); "
        f"INSERT INTO {table}(rowid, {cols}) VALUES (new.id, {new}); END",
    ]


def _migration_5(db: sqlite_utils.Database) -> None:
    # Keywords (newline-joined, in file order; model_keywords = the subset capwatch wrote) and text found in the
    # image. Old rows get NULLs: adding nullable columns rewrites nothing.
    for column in ("keywords", "model_keywords", "ocr_text", "cjk_caption", "cjk_keywords", "cjk_ocr"):
        db.execute(f"ALTER TABLE images ADD COLUMN {column} TEXT")
    # Existing captions may hold CJK: give them their per-character copies, so `桜` finds "日本の桜" at once.
    # The function is registered for this statement only (triggers never call it: any SQLite client may write).
    from capwatch.library.search import cjk_spaced

    db.conn.create_function("capwatch_cjk", 1, cjk_spaced, deterministic=True)
    db.execute(
        "UPDATE images SET cjk_caption = capwatch_cjk(coalesce(caption, '') || char(10) || "
        "coalesce(model_caption, '')) WHERE capwatch_cjk(coalesce(caption, '') || char(10) || "
        "coalesce(model_caption, '')) IS NOT NULL"
    )
    # Porter over unicode61: `puppies` finds "puppy", `running` finds "runs" (quoted phrases are checked
    # unstemmed by the search). Rebuilt from the table in this same transaction: an interrupted migration
    # rolls back whole and runs again on the next open.
    for trigger in ("images_fts_insert", "images_fts_delete", "images_fts_update"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("DROP TABLE images_fts")
    db.execute(
        f"""
        CREATE VIRTUAL TABLE images_fts USING fts5(
            {", ".join(FTS_COLUMNS_5)}, content='images', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )
        """
    )
    weights = ", ".join(f"{w:.1f}" for w in FTS_WEIGHTS_5)
    db.execute(f"INSERT INTO images_fts(images_fts, rank) VALUES ('rank', 'bm25({weights})')")
    for sql in _fts_triggers("images_fts", FTS_COLUMNS_5):
        db.execute(sql)
    db.execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')")
    # Substrings of text found in images (plates, race numbers, "B12" in "EXIT B12"): a trigram index over the
    # OCR column only. Captions and keywords are words, searched by word; a trigram index over 1 M captions
    # would roughly triple the index for a query nobody types.
    db.execute(
        "CREATE VIRTUAL TABLE images_ocr_tri USING fts5(ocr_text, content='images', content_rowid='id', "
        "tokenize='trigram')"
    )
    for sql in _fts_triggers("images_ocr_tri", ("ocr_text",)):
        db.execute(sql)
    db.execute("INSERT INTO images_ocr_tri(images_ocr_tri) VALUES ('rebuild')")


def _migration_6(db: sqlite_utils.Database) -> None:
    # Image embeddings for search by meaning (capwatch.library.vectors). Plain tables, no extension module: any
    # SQLite client (and a Python that cannot load extensions) reads and writes them.
    # One float32 vector per image and embedding model: the exact values, for rescoring and the similarity shown.
    db.execute(
        """
        CREATE TABLE image_vectors (
            image_id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            -- the image's fingerprint when it was embedded: a file changed since is embedded again
            fingerprint TEXT,
            vector BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX image_vectors_model ON image_vectors(model, image_id)")
    # Sign bits of the vectors, packed in blocks of up to BLOCK rows (ids int64 + codes), so a search loads a
    # million of them in a few hundred reads instead of a million. Appended to as vectors are written; an entry
    # whose vector was replaced or deleted stays until the blocks are rebuilt (rescoring looks the id up).
    db.execute(
        """
        CREATE TABLE vector_blocks (
            model TEXT NOT NULL,
            block INTEGER NOT NULL,
            ids BLOB NOT NULL,
            codes BLOB NOT NULL,
            PRIMARY KEY (model, block)
        )
        """
    )
    # Per model: width, entries in the blocks, live vectors, a version that moves on every change (readers
    # holding the codes in memory reload when it moved), and the centre the sign bits are taken around (the mean
    # vector when the blocks were last rebuilt, over `centred` vectors; NULL = the origin).
    db.execute(
        """
        CREATE TABLE vector_models (
            model TEXT PRIMARY KEY,
            dim INTEGER NOT NULL,
            entries INTEGER NOT NULL DEFAULT 0,
            live INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 0,
            centre BLOB,
            centred INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    # Kept in step by triggers, so any client's deletes are counted (no foreign key: that needs a pragma).
    db.execute(
        "CREATE TRIGGER image_vectors_image_gone AFTER DELETE ON images BEGIN "
        "DELETE FROM image_vectors WHERE image_id = old.id; END"
    )
    db.execute(
        "CREATE TRIGGER image_vectors_insert AFTER INSERT ON image_vectors BEGIN "
        "UPDATE vector_models SET live = live + 1, version = version + 1 WHERE model = new.model; END"
    )
    db.execute(
        "CREATE TRIGGER image_vectors_delete AFTER DELETE ON image_vectors BEGIN "
        "UPDATE vector_models SET live = live - 1, version = version + 1 WHERE model = old.model; END"
    )
    db.execute(
        "CREATE TRIGGER image_vectors_update AFTER UPDATE ON image_vectors BEGIN "
        "UPDATE vector_models SET live = live - 1, version = version + 1 WHERE model = old.model; "
        "UPDATE vector_models SET live = live + 1, version = version + 1 WHERE model = new.model; END"
    )


def _filled_and_owner_roots(db: sqlite_utils.Database) -> None:
    # What was made for a row beyond its caption ("text", "keywords"; newline-joined): a scan fills in what the
    # current settings would produce and a row lacks (capwatch.library.fill) without captioning again, and must
    # tell "looked, found nothing" from "never looked". Old rows get NULL: nothing was marked, so a scan looks.
    db.execute("ALTER TABLE images ADD COLUMN filled TEXT")
    # The folders the index's owner gave `scan`/`watch` by hand: theirs to see on the web page beside the
    # configured roots (capwatch.library.owner_roots).
    db.execute("CREATE TABLE owner_roots (path TEXT PRIMARY KEY, added_at TEXT NOT NULL)")


#: From the languages migration on: the caption in other languages (dc:description's xml:lang items other than the
#: one shown as ``caption``), newline-joined, searchable like the caption.
FTS_COLUMNS_LANG = (*FTS_COLUMNS_5, "translations")
FTS_WEIGHTS_LANG = (*FTS_WEIGHTS_5, 10.0)


def _migration_languages(db: sqlite_utils.Database) -> None:
    # ``captions``: a JSON object {language: text} of the file's description per language (NULL: one language);
    # ``translations``: its texts other than ``caption``, for the word index. The word index gets the column
    # (rebuilt in this transaction, as in migration 5); the tokenizer stays porter over unicode61 with diacritics
    # removed: SQLite has no stemmer but porter (English), so other languages match whole words and prefixes.
    for column in ("captions", "translations"):
        db.execute(f"ALTER TABLE images ADD COLUMN {column} TEXT")
    for trigger in ("images_fts_insert", "images_fts_delete", "images_fts_update"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("DROP TABLE images_fts")
    db.execute(
        f"""
        CREATE VIRTUAL TABLE images_fts USING fts5(
            {", ".join(FTS_COLUMNS_LANG)}, content='images', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )
        """
    )
    weights = ", ".join(f"{w:.1f}" for w in FTS_WEIGHTS_LANG)
    db.execute(f"INSERT INTO images_fts(images_fts, rank) VALUES ('rank', 'bm25({weights})')")
    for sql in _fts_triggers("images_fts", FTS_COLUMNS_LANG):
        db.execute(sql)
    db.execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')")


#: Video suffixes when migration 9 was written (frozen here: a released migration never changes).
_VIDEO_SUFFIXES_9 = ("mp4", "m4v", "mov", "3gp", "mkv", "webm", "avi", "mts", "m2ts")


def _migration_moments(db: sqlite_utils.Database) -> None:
    # A video's moments (issue 23): besides its one vector in image_vectors (the representative frame, its
    # poster), the embeddings of its other chosen frames, each with its time in seconds, so a search by meaning
    # can hit a moment. Their sign bits go into vector_blocks with the key -id (image vectors keep their
    # image id there, always > 0), so one pass over the blocks looks at images and moments alike.
    db.execute(
        """
        CREATE TABLE frame_vectors (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL,
            model TEXT NOT NULL,
            -- seconds from the start of the video
            at REAL NOT NULL,
            vector BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX frame_vectors_image ON frame_vectors(image_id)")
    # The representative frame's time (NULL for a photo): a hit on the poster is a moment too.
    db.execute("ALTER TABLE image_vectors ADD COLUMN at REAL")
    # Moments per model, beside `live` (images): the blocks hold live + frames entries when nothing is stale.
    db.execute("ALTER TABLE vector_models ADD COLUMN frames INTEGER NOT NULL DEFAULT 0")
    # A video's moments go with its image vector and with its row (any client's delete).
    db.execute(
        "CREATE TRIGGER frame_vectors_image_gone AFTER DELETE ON images BEGIN "
        "DELETE FROM frame_vectors WHERE image_id = old.id; END"
    )
    db.execute(
        "CREATE TRIGGER frame_vectors_vector_gone AFTER DELETE ON image_vectors BEGIN "
        "DELETE FROM frame_vectors WHERE image_id = old.image_id; END"
    )
    db.execute(
        "CREATE TRIGGER frame_vectors_insert AFTER INSERT ON frame_vectors BEGIN "
        "UPDATE vector_models SET frames = frames + 1, version = version + 1 WHERE model = new.model; END"
    )
    db.execute(
        "CREATE TRIGGER frame_vectors_delete AFTER DELETE ON frame_vectors BEGIN "
        "UPDATE vector_models SET frames = frames - 1, version = version + 1 WHERE model = old.model; END"
    )
    # Videos embedded before (their poster only) are embedded again, with their moments, by the next scan's
    # fill-in: their vector's fingerprint no longer matches the row's. The old vector serves searches meanwhile.
    suffixes = " OR ".join(f"lower(path) LIKE '%.{s}'" for s in _VIDEO_SUFFIXES_9)
    db.execute(f"UPDATE image_vectors SET fingerprint = NULL WHERE image_id IN "
               f"(SELECT id FROM images WHERE {suffixes})")
    # Live Photos paired by content identifier only (renamed files): the still's path and its motion's, recorded
    # when the motion is met (it is kept out of the index), so search and the page show the two together.
    db.execute("CREATE TABLE live_pairs (motion TEXT PRIMARY KEY, still TEXT NOT NULL)")
    db.execute("CREATE INDEX live_pairs_still ON live_pairs(still)")


#: (version, name, apply). Append only; never edit a released migration.
MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite_utils.Database], None]], ...] = (
    (1, "images table", _migration_1),
    (2, "full-text index over caption and path", _migration_2),
    (3, "covering index for stat-only reconcile", _migration_3),
    (4, "ctime and sidecar state", _migration_4),
    (5, "keywords, text in images; porter, CJK and substring search", _migration_5),
    (6, "image embeddings for search by meaning", _migration_6),
    (7, "what was filled in per image; the owner's scanned folders", _filled_and_owner_roots),
    (8, "captions in other languages, searchable", _migration_languages),
    (9, "video moments for search by meaning; Live Photo pairs by content identifier", _migration_moments),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
