"""The catalogue: what is where and what it says — the index (SQLite + FTS5), the query language, reconcile of a
folder with the index, and processing one file end to end (read, caption, write, record)."""
