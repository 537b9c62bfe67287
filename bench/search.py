"""Search benchmark: capwatch's search function vs the same FTS5 query in raw sqlite3, on one 1 M-image index.

    python bench/search.py                 # 1,000,000 images (builds bench/_work/search-1000000.db once)
    python bench/search.py --images 100000 --queries 300 --rebuild

The index is built through capwatch's own Index.upsert_many (so the FTS triggers do the work they do in real
use) from synthetic captions: a Zipfian (s=1.1) vocabulary of ~6,000 words (the first ~400 real caption words,
the rest pronounceable made-up words), 6–18 words per caption, and a camera-style path layout
(/photos/YYYY/YYYY-MM-DD event/IMG_NNNN.JPG); 40 % of the images get 3-6 keywords and 5 % some text found in the
image (a sign, a number, a plate). Queries are 1–3 content words drawn from the same distribution.
For every query both sides run the identical SQL statements (capwatch.library.index.build_window_sql, then
build_search_sql); capwatch adds query parsing, the Python call path and result objects. With --full, a third
column times plain bm25 over every match (no rank window) for reference.
Prints p50/p99 per side and the ratio, build time, bytes/image.

    python bench/search.py --migrate OLD.db   # time the upgrade of a copy of an older index, sizes before/after
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capwatch.library.index import RANK_WINDOW, ImageRecord, Index, build_search_sql, build_window_sql  # noqa: E402
from capwatch.library.search import SearchFilters, parse_query  # noqa: E402

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


def build(path: Path, images: int, seed: int) -> tuple[float, list[str], list[float]]:
    rng = random.Random(seed)
    vocab = _vocabulary(6000, rng)
    weights = _zipf_weights(len(vocab))
    cum = list(_accumulate(weights))
    if path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    started = time.perf_counter()
    with Index.open(path) as index:
        batch: list[ImageRecord] = []
        day = 0
        counter = 0
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
            keywords = tuple(dict.fromkeys(rng.choices(vocab[20:400], k=rng.randint(3, 6)))) \
                if rng.random() < 0.4 else ()
            text = None
            if rng.random() < 0.05:
                text = f"{rng.choice(vocab[:400]).upper()} {rng.randint(1, 99)}\n" \
                       f"{rng.choice('ABCDEFGH')}{rng.choice('KLMNPRST')}{rng.randint(100, 999)}"
            batch.append(ImageRecord(
                path=p, size=3_000_000 + i % 1000, mtime_ns=1_600_000_000_000_000_000 + i,
                fingerprint=f"{i:032x}", width=4000, height=3000,
                taken_at=f"{year}-{month:02d}-{dom:02d}T12:00:00", caption=caption, source="model",
                model="bench", status="captioned", keywords=keywords, model_keywords=keywords, ocr_text=text,
            ))
            if len(batch) == 20000:
                index.upsert_many(batch)
                batch.clear()
        if batch:
            index.upsert_many(batch)
    elapsed = time.perf_counter() - started
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("INSERT INTO images_fts(images_fts) VALUES ('optimize')")
    conn.commit()
    conn.close()
    return elapsed, vocab, weights


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _size(db: Path) -> int:
    return sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if p.exists())


def migrate(old: Path, work: Path) -> None:
    """Copy ``old`` (an index of an earlier schema) and time capwatch's upgrade of the copy."""
    import shutil

    work.mkdir(parents=True, exist_ok=True)
    copy = work / f"migrate-{old.name}"
    shutil.copyfile(old, copy)
    conn = sqlite3.connect(copy)
    version = conn.execute("SELECT max(version) FROM capwatch_migrations").fetchone()[0]
    rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    conn.close()
    before = _size(copy)
    started = time.perf_counter()
    with Index.open(copy) as index:
        after_version = index.schema_version()
    elapsed = time.perf_counter() - started
    conn = sqlite3.connect(copy)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.close()
    after = _size(copy)
    print(f"{rows:,} rows: schema {version} -> {after_version} in {elapsed:.1f} s; "
          f"{before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB (vacuumed; {after / before:.2f}x)")
    copy.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--full", action="store_true", help="also time raw bm25 over every match (no window)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work")
    parser.add_argument("--migrate", type=Path, metavar="OLD_DB",
                        help="time upgrading a copy of this older index to the current schema, then exit")
    args = parser.parse_args()
    if args.migrate is not None:
        migrate(args.migrate, args.work)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    db = args.work / f"search-{args.images}.db"
    rng = random.Random(args.seed)
    if args.rebuild or not db.exists():
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
    filters = SearchFilters()
    # Warm the page cache for both sides the same way.
    for q in queries[:50]:
        index.search(parse_query(q), filters, limit=args.limit)
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
                result = index.search(parse_query(q), filters, limit=args.limit)
                ours.append(time.perf_counter() - t0)
                hits += len(result)
            elif side == 1:
                # Exactly the statements capwatch runs: the window bound, then the ranked query.
                t0 = time.perf_counter()
                row = raw.execute(*cut).fetchone() if cut else None
                sql, params = build_search_sql(parsed, filters, limit=args.limit,
                                               min_rowid=None if row is None else row[0])
                raw.execute(sql, params).fetchall()
                theirs.append(time.perf_counter() - t0)
            elif args.full:
                # Reference: bm25 over every match (what a plain FTS5 ORDER BY rank LIMIT does).
                t0 = time.perf_counter()
                sql, params = build_search_sql(parsed, filters, limit=args.limit)
                raw.execute(sql, params).fetchall()
                full.append(time.perf_counter() - t0)
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


if __name__ == "__main__":
    main()
