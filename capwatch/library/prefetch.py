"""A search process's start, done side by side: the text model loads and embeds the query in a thread while this
thread reads the sign-bit blocks of the index's vectors (the two costs of a `capwatch search --by meaning` that
no running daemon answers).

Nothing here imports numpy: the blocks are read as bytes (SQLite reads them while the thread imports numpy and
onnxruntime and builds the model's session, which runs without Python's global lock), and
:class:`capwatch.library.vectors.Vectors` turns them into arrays afterwards.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capwatch.config import Config
    from capwatch.library.index import Index
    from capwatch.library.vectors import Vectors


@dataclass(frozen=True)
class RawBlocks:
    """One model's sign-bit blocks as stored, read in one read transaction: ``version`` and ``centre`` of its
    ``vector_models`` row and every block's (ids, codes) bytes, in block order."""

    model: str
    version: int
    centre: bytes | None
    blocks: tuple[tuple[bytes, bytes], ...]


def read_blocks(conn: sqlite3.Connection, model: str) -> RawBlocks:
    """The blocks of ``model`` and the version they belong to, read in one transaction (a writer between the two
    statements cannot pair old blocks with a new version). Raises sqlite3.Error."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        row = conn.execute("SELECT version, centre FROM vector_models WHERE model = ?", (model,)).fetchone()
        rows = conn.execute("SELECT ids, codes FROM vector_blocks WHERE model = ? ORDER BY block",
                            (model,)).fetchall()
    finally:
        if own:
            conn.execute("COMMIT")
    version = -1 if row is None else int(row[0])
    return RawBlocks(model, version, None if row is None or row[1] is None else bytes(row[1]),
                     tuple((bytes(i), bytes(c)) for i, c in rows))


def model_to_preload(conn: sqlite3.Connection) -> str | None:
    """The model whose blocks a search most likely reads: the one with the most vectors (the configured model's
    id is known only once its files are read, in the other thread)."""
    row = conn.execute("SELECT model FROM vector_models WHERE live > 0 ORDER BY live DESC, model LIMIT 1").fetchone()
    return None if row is None else str(row[0])


def query_vector_and_codes(config: Config, index: Index, text: str) -> tuple[Any, str, Vectors]:
    """The query's :class:`capwatch.library.meaning.QueryVector` (or None and why not, as
    :func:`capwatch.library.embed.query_vector` gives them) from the configured model, loaded in a thread, and
    a :class:`Vectors` of ``index`` that already holds the codes of the index's largest model, read meanwhile.
    Raises ModelError when the text model cannot run, IndexUnavailable for database problems."""
    outcome: dict[str, Any] = {}

    def embed() -> None:
        try:
            from capwatch.library.embed import query_embedder

            embedder, why = query_embedder(config)
            if embedder is None:
                outcome["why"] = why
                return
            try:
                outcome["model"] = embedder.model_id
                outcome["vector"] = embedder.embed_texts([text])[0]
            finally:
                embedder.close()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=embed, name="capwatch-query-embed", daemon=True)
    worker.start()
    try:
        model = index.guard(lambda: model_to_preload(index.connection))
        raw = None if model is None else index.guard(lambda: read_blocks(index.connection, model))
    finally:
        worker.join()
    from capwatch.library.meaning import NO_PLAIN_WORDS, QueryVector
    from capwatch.library.vectors import Vectors

    store = Vectors(index, raw)
    if "error" in outcome:
        raise outcome["error"]
    if "vector" not in outcome:
        return None, str(outcome.get("why") or "no embedding model"), store
    if not text:  # pragma: no cover - the caller asks only for a text
        return None, NO_PLAIN_WORDS, store
    model_id = str(outcome["model"])
    if store.count(model_id) == 0:
        return None, f"no image in the index has an embedding of {model_id} yet; `capwatch scan` fills them in", store
    return QueryVector(model_id, outcome["vector"]), "", store
