"""Search benchmark: capwatch's search function vs the same FTS5 query in raw sqlite3, on one 1 M-image index.

    python bench/search.py                 # 1,000,000 images (builds bench/_work/search-1000000.db once)
    python bench/search.py --images 100000 --queries 300 --rebuild
    python bench/search.py --migration     # also: build the same images as schema 4, time migration 5 on it

The index is built through capwatch's own Index.upsert_many (so the FTS triggers do the work they do in real
use) from synthetic captions: a Zipfian (s=1.1) vocabulary of ~6,000 words (the first ~400 real caption words,
the rest pronounceable made-up words), 6–18 words per caption, and a camera-style path layout
(/photos/YYYY/YYYY-MM-DD event/IMG_NNNN.JPG). Queries are 1–3 content words drawn from the same distribution.
Half the images carry 1–8 keywords (same vocabulary), one in ten some text found in it (sign words, exit and
gate numbers, number plates), one in a hundred a Japanese caption. Besides the word queries (the anchor: p99 <= 50 ms),
it times kw:WORD, text:SUBSTRING (trigram index, 3–5 characters of a plate or number) and CJK (1–2 characters)
queries; --migration reports the time of migration 5 on the schema-4 index and the size before and after.
For every query both sides run the identical SQL statements (capwatch.library.index.build_window_sql, then
build_search_sql); capwatch adds query parsing, the Python call path and result objects. With --full, a third
column times plain bm25 over every match (no rank window) for reference.
Prints p50/p99 per side and the ratio, build time, bytes/image.

Search by meaning (issue 21), side by side with an exact float search over the same vectors:

    python bench/search.py --vectors 1000000 [--dim 512] [--embed-model DIR --embed-precision int8]

builds bench/_work/vectors-N.db: N image rows and N synthetic embeddings stored through capwatch's own tables
(image_vectors rows, then Vectors.rebuild_blocks for the sign-bit blocks). The vectors are clustered, not uniform
noise: 2,000 random centres (standard normal in DIM dimensions), a shared offset (image embeddings share a
common direction), per-image Gaussian spread 0.8 of a centre's scale, L2-normalised; queries are drawn about the
same centres with another offset and spread 2.0 (a text query sits far from every image, as CLIP's modality gap
puts it: best cosine ~0.2-0.3), so the true top 10 are close calls. Prints: vector search p50/p99 (capwatch's
three-stage search, warm) vs exact float search (numpy matmul over all vectors in RAM), recall@10 of capwatch's
against the exact top 10, index growth per image, a whole `capwatch search --by meaning` process (p50 over
--processes runs; with --embed-model the synthetic vectors have that model's id and width, so the process
loads the real text model from disk as a user's would), and duplicates over the first 100 k images (with 1 % of
them planted as re-encode-like near copies, cosine ~0.99) through capwatch.library.duplicates.group.
The timed processes run as an installed capwatch would: from cached bytecode (PYTHONDONTWRITEBYTECODE is dropped),
in a home whose stamp key exists (a scan makes it), so the model's graph digests are memoised after the first run.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capwatch.library.index import ImageRecord, Index  # noqa: E402
from capwatch.library.migrations import SCHEMA_VERSION  # noqa: E402
from capwatch.library.search import (  # noqa: E402
    RANK_WINDOW,
    SearchFilters,
    build_search_sql,
    build_window_sql,
    parse_query,
    register_functions,
)

CORE = """a the of on in with and at an to is are two man woman people person group dog cat bird horse car bike
bicycle street road building house city sky tree trees grass field water beach sea ocean lake river mountain snow
table plate food pizza cake sandwich kitchen room bed window door wall sign red blue green white black yellow
brown orange large small young old little standing sitting walking riding holding playing looking next near
front top side child children boy girl baby men women train bus truck boat plane airplane sheep cow elephant
giraffe zebra bear umbrella kite surfboard skateboard frisbee ball tennis player game phone laptop computer
chair couch bench clock vase flowers flower bowl cup glass bottle wine coffee shirt hat jacket dress sunset sunrise
night day light dark cloudy rainy park garden forest path bridge tower church castle market shop restaurant cafe
bar party wedding birthday family friends dinner lunch breakfast picnic camping tent fire beach sand wave waves
surfing swimming pool boat harbor pier lighthouse island rock rocks cliff hill hills valley desert road trip car
parked parking lot traffic crowd festival concert stage guitar piano music dancing dance smiling laughing
portrait selfie close up view aerial old town square fountain statue museum painting art graffiti alley stairs
train station platform airport runway sky clouds rainbow storm lightning fog mist autumn leaves spring summer
winter christmas tree lights candles snowman ski skiing snowboard sled ice frozen pond ducks swan geese pigeon
seagull eagle owl butterfly bee insect spider lizard snake turtle fish aquarium zoo farm barn tractor chicken
pig goat donkey pony puppy kitten toy toys doll blocks books book reading newspaper desk office meeting
classroom school bus student teacher graduation cap gown diploma hospital doctor nurse baby stroller crib
bath bathtub shower sink toilet mirror towel soap brush teeth hair haircut beard glasses sunglasses watch
ring necklace earrings shoes boots sneakers socks bag backpack suitcase luggage map passport ticket""".split()


def _vocabulary(size: int, rng: random.Random) -> list[str]:
    words = list(dict.fromkeys(CORE))
    onsets = ["b", "br", "c", "ch", "d", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t",
              "tr", "v", "w", "z"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "oo"]
    codas = ["", "n", "r", "s", "t", "l", "nd", "st", "ck"]
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) + rng.choice(codas)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (rank ** s) for rank in range(1, n + 1)]


#: Words and numbers on signs, for the OCR text of one image in ten.
SIGNS = ["EXIT", "GATE", "PLATFORM", "OPEN", "SALE", "CAFE", "STOP", "PARKING", "HOTEL", "PHARMACY", "BAKERY",
         "NO ENTRY", "ONE WAY", "TICKETS", "ARRIVALS", "DEPARTURES", "MARKET", "BUS", "TAXI", "POLICE"]
#: Japanese caption words for one image in a hundred.
CJK_WORDS = ["日本", "の", "桜", "京都", "寺", "東京", "駅", "夜景", "富士山", "海", "猫", "犬", "公園", "祭り", "雪",
             "神社", "川", "橋", "花火", "紅葉", "電車", "ラーメン", "お寺", "城", "山", "湖"]


def _plate(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    return (rng.choice(letters) + rng.choice(letters) + f"{rng.randint(0, 9999):04d}"
            + rng.choice(letters) + rng.choice(letters))


def generate(images: int, seed: int) -> tuple[list[str], list[float], Iterator[dict[str, object]]]:
    """The vocabulary, its weights, and the images as column values (the same for every schema)."""
    rng = random.Random(seed)
    vocab = _vocabulary(6000, rng)
    weights = _zipf_weights(len(vocab))
    cum = list(_accumulate(weights))

    def rows() -> Iterator[dict[str, object]]:
        day = 0
        counter = 0
        extra = random.Random(seed + 2)  # keywords/OCR/CJK drawn apart: captions and paths stay as before
        for i in range(images):
            if i % 180 == 0:  # a new "event" folder every ~180 photos
                day += rng.randint(1, 5)
            year = 2010 + (day // 365) % 16
            month = 1 + (day // 30) % 12
            dom = 1 + day % 28
            event = rng.choice(vocab[20:400])
            counter = (counter + 1) % 10000
            p = f"/photos/{year}/{year}-{month:02d}-{dom:02d} {event}/IMG_{counter:04d}.JPG"
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(6, 18))
            caption = " ".join(words).capitalize()
            if extra.random() < 0.01:
                caption = "".join(extra.choices(CJK_WORDS, k=extra.randint(2, 6)))
            keywords = (tuple(dict.fromkeys(extra.choices(vocab[20:], cum_weights=cum[20:], k=extra.randint(1, 8))))
                        if extra.random() < 0.5 else ())
            ocr = None
            if extra.random() < 0.1:
                parts = [extra.choice(SIGNS), str(extra.randint(1, 99))]
                if extra.random() < 0.3:
                    parts.append(_plate(extra))
                ocr = " ".join(parts)
            yield {
                "path": p, "size": 3_000_000 + i % 1000, "mtime_ns": 1_600_000_000_000_000_000 + i,
                "fingerprint": f"{i:032x}", "width": 4000, "height": 3000,
                "taken_at": f"{year}-{month:02d}-{dom:02d}T12:00:00", "caption": caption, "source": "model",
                "model": "bench", "status": "captioned", "keywords": keywords, "ocr_text": ocr,
            }

    return vocab, weights, rows()


def _finish(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("INSERT INTO images_fts(images_fts) VALUES ('optimize')")
    conn.commit()
    conn.close()


def _fresh(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def build(path: Path, images: int, seed: int) -> tuple[float, list[str], list[float]]:
    """The index at the current schema, through Index.upsert_many (the FTS triggers do the work they do in use)."""
    vocab, weights, rows = generate(images, seed)
    _fresh(path)
    started = time.perf_counter()
    with Index.open(path) as index:
        batch: list[ImageRecord] = []
        for row in rows:
            batch.append(ImageRecord(**row))  # type: ignore[arg-type]
            if len(batch) == 20000:
                index.upsert_many(batch)
                batch.clear()
        if batch:
            index.upsert_many(batch)
    elapsed = time.perf_counter() - started
    _finish(path)
    return elapsed, vocab, weights


def build_v4(path: Path, images: int, seed: int) -> None:
    """The same images in a schema-4 index (the release before keywords and OCR text: captions and paths only),
    written with the SQL that release ran, so migration 5 can be timed on it."""
    _, _, rows = generate(images, seed)
    _fresh(path)
    conn = sqlite3.connect(path, isolation_level=None)
    Index(conn, path, 30.0).migrate(target=4)
    cols = ["path", "size", "mtime_ns", "fingerprint", "width", "height", "taken_at", "caption", "source", "model",
            "status"]
    # A path generated twice replaces the first, as Index.upsert_many does in build().
    sql = (f"INSERT INTO images ({', '.join(cols)}, sort_date, updated_at) "
           f"VALUES ({', '.join('?' * len(cols))}, ?, '2026-01-01T00:00:00Z') ON CONFLICT(path) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in [*cols[1:], "sort_date"]))
    conn.execute("PRAGMA journal_mode = WAL")
    batch: list[list[object]] = []
    for row in rows:
        batch.append([*(row[c] for c in cols), row["taken_at"]])
        if len(batch) == 20000:
            conn.execute("BEGIN")
            conn.executemany(sql, batch)
            conn.execute("COMMIT")
            batch.clear()
    if batch:
        conn.execute("BEGIN")
        conn.executemany(sql, batch)
        conn.execute("COMMIT")
    conn.close()
    _finish(path)


def _schema(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT max(version) FROM capwatch_migrations").fetchone()[0] or 0)
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _size(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


def migration(work: Path, images: int, seed: int) -> None:
    """Build a schema-4 index, time its upgrade to the current schema (one Index.open), print both sizes."""
    v4 = work / f"search-v4-{images}.db"
    print(f"building {images:,} images as schema 4 into {v4} ...", flush=True)
    build_v4(v4, images, seed)
    before = _size(v4)
    started = time.perf_counter()
    with Index.open(v4) as index:
        version = index.schema_version()
    elapsed = time.perf_counter() - started
    conn = sqlite3.connect(v4)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    after_raw = _size(v4)
    conn.execute("VACUUM")
    conn.close()
    after = _size(v4)
    print(f"migration 4 -> {version}  {elapsed:.1f} s for {images:,} rows ({images / elapsed:,.0f} rows/s), "
          "one transaction")
    print(f"size schema 4     {before / 1e6:,.1f} MB ({before / images:,.0f} bytes/image)")
    print(f"size schema {version}     {after_raw / 1e6:,.1f} MB right after, {after / 1e6:,.1f} MB after VACUUM "
          f"({after / images:,.0f} bytes/image; same captions and paths, no keywords or OCR text yet)")


def _accumulate(values: list[float]) -> list[float]:
    total = 0.0
    out = []
    for v in values:
        total += v
        out.append(total)
    return out


def make_queries(vocab: list[str], weights: list[float], count: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    # People search for content words, not "a"/"the": skip the 20 most frequent.
    content, content_w = vocab[20:], weights[20:]
    cum = _accumulate(content_w)
    return [" ".join(rng.choices(content, cum_weights=cum, k=rng.randint(1, 3))) for _ in range(count)]


def make_field_queries(vocab: list[str], weights: list[float], count: int, seed: int) -> dict[str, list[str]]:
    """kw:WORD, text:SUBSTRING (of a plate or a sign number) and CJK queries, ``count`` of each."""
    rng = random.Random(seed + 3)
    cum = _accumulate(weights[20:])
    kw = [f"kw:{w}" for w in rng.choices(vocab[20:], cum_weights=cum, k=count)]
    text = []
    for _ in range(count):
        source = _plate(rng) if rng.random() < 0.6 else f"{rng.choice(SIGNS)} {rng.randint(1, 99)}"
        length = rng.randint(3, 5)
        start = rng.randint(0, max(0, len(source) - length))
        piece = source[start:start + length]
        text.append(f'text:"{piece}"' if " " in piece else f"text:{piece}")
    cjk_chars = sorted({ch for word in CJK_WORDS for ch in word})
    cjk = ["".join(rng.choices(cjk_chars, k=rng.randint(1, 2))) if rng.random() < 0.5 else rng.choice(CJK_WORDS)
           for _ in range(count)]
    return {"kw:WORD": kw, "text:SUBSTR": text, "CJK": cjk}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(index: Index, raw: sqlite3.Connection, queries: list[str], limit: int,
            full_too: bool) -> tuple[list[float], list[float], list[float], int]:
    """Seconds per query for capwatch's search, the same statements in raw sqlite3, and (``full_too``) raw bm25
    over every match; plus the number of hits capwatch returned."""
    filters = SearchFilters()
    ours: list[float] = []
    theirs: list[float] = []
    full: list[float] = []
    hits = 0
    for i, q in enumerate(queries):
        parsed = parse_query(q)
        cut = build_window_sql(parsed, filters, window=RANK_WINDOW)
        order = (0, 1, 2) if i % 2 == 0 else (2, 1, 0)  # alternate who goes first: no cache advantage
        for side in order:
            if side == 0:
                t0 = time.perf_counter()
                result = index.search(parse_query(q), filters, limit=limit)
                ours.append(time.perf_counter() - t0)
                hits += len(result)
            elif side == 1:
                # Exactly the statements capwatch runs: the window bound, then the ranked query.
                t0 = time.perf_counter()
                row = raw.execute(*cut).fetchone() if cut else None
                sql, params = build_search_sql(parsed, filters, limit=limit,
                                               min_rowid=None if row is None else row[0])
                raw.execute(sql, params).fetchall()
                theirs.append(time.perf_counter() - t0)
            elif full_too:
                # Reference: bm25 over every match (what a plain FTS5 ORDER BY rank LIMIT does).
                t0 = time.perf_counter()
                sql, params = build_search_sql(parsed, filters, limit=limit)
                raw.execute(sql, params).fetchall()
                full.append(time.perf_counter() - t0)
    return ours, theirs, full, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--full", action="store_true", help="also time raw bm25 over every match (no window)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work")
    parser.add_argument("--migration", action="store_true",
                        help="also build the images as schema 4 and time migration 5 on them")
    parser.add_argument("--vectors", type=int, default=0, metavar="N",
                        help="run the search-by-meaning bench at N images instead of the word bench")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vector-queries", type=int, default=200)
    parser.add_argument("--processes", type=int, default=15, help="whole `capwatch search` runs to time")
    parser.add_argument("--embed-model", type=Path, default=None,
                        help="an embedding model folder: synthetic vectors get its id and width, and the whole-"
                        "process figure loads its text model")
    parser.add_argument("--embed-precision", default="int8")
    args = parser.parse_args()
    if args.vectors:
        from search_vectors import run_vectors  # the same folder as this script

        run_vectors(args)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    db = args.work / f"search-{args.images}.db"
    rng = random.Random(args.seed)
    if args.migration:
        migration(args.work, args.images, args.seed)
    if args.rebuild or not db.exists() or _schema(db) != SCHEMA_VERSION:
        print(f"building {args.images:,} images into {db} ...", flush=True)
        build_s, vocab, weights = build(db, args.images, args.seed)
        build_note = f"{build_s:.1f} s ({args.images / build_s:,.0f} images/s, through Index.upsert_many)"
    else:
        vocab = _vocabulary(6000, rng)
        weights = _zipf_weights(len(vocab))
        build_note = "reused (pass --rebuild to time the build)"
    size = sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if p.exists())
    queries = make_queries(vocab, weights, args.queries, args.seed)

    index = Index.open(db, readonly=True)
    # The raw side gets the same connection settings capwatch uses for searching (read-only, mmap).
    raw = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    raw.execute("PRAGMA mmap_size = 1073741824")
    register_functions(raw)
    filters = SearchFilters()
    # Warm the page cache for both sides the same way.
    for q in queries[:50]:
        index.search(parse_query(q), filters, limit=args.limit)
    ours, theirs, full, hits = measure(index, raw, queries, args.limit, args.full)
    others = {kind: measure(index, raw, qs, args.limit, False)
              for kind, qs in make_field_queries(vocab, weights, max(50, args.queries // 3), args.seed).items()}
    index.close()
    raw.close()

    ms = 1000.0
    print()
    print(f"images            {args.images:,}")
    print(f"index size        {size / 1e6:,.1f} MB  ({size / args.images:,.0f} bytes/image)")
    print(f"build             {build_note}")
    print(f"queries           {len(queries)} (1-3 Zipfian content words, limit {args.limit}); "
          f"mean hits {hits / len(queries):.1f}")
    print(f"{'':18}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'mean ms':>10}")
    rows = [("capwatch search", ours), ("raw sqlite3", theirs)]
    if full:
        rows.append(("raw, rank all", full))
    for name, values in rows:
        print(f"{name:18}{pct(values, .5) * ms:10.2f}{pct(values, .99) * ms:10.2f}{max(values) * ms:10.2f}"
              f"{statistics.mean(values) * ms:10.2f}")
    print(f"ratio capwatch/raw  p50 {pct(ours, .5) / pct(theirs, .5):.3f}  p99 {pct(ours, .99) / pct(theirs, .99):.3f}"
          f"  mean {statistics.mean(ours) / statistics.mean(theirs):.3f}")
    print(f"targets           p99 <= 50 ms: {'met' if pct(ours, .99) <= 0.05 else 'NOT met'}; "
          f"capwatch <= 1.2x raw (p50): {'met' if pct(ours, .5) <= 1.2 * pct(theirs, .5) else 'NOT met'}")
    print()
    print(f"{'field queries':18}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'raw p50':>10}{'raw p99':>10}{'hits':>8}")
    for kind, (mine, raws, _, found) in others.items():
        print(f"{kind:18}{pct(mine, .5) * ms:10.2f}{pct(mine, .99) * ms:10.2f}{max(mine) * ms:10.2f}"
              f"{pct(raws, .5) * ms:10.2f}{pct(raws, .99) * ms:10.2f}{found / len(mine):8.1f}")


if __name__ == "__main__":
    main()
