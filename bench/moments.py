"""What a video's moments (issue 23) cost a search by meaning: capwatch.library.moments.nearest_assets (one hit per
image, a video at its best moment, filters applied to a moment's video) against the anchor, Vectors.nearest over
the same index and queries (one entry per key, no collapsing), side by side in one run.

    python bench/moments.py                            # 100,000 photos + 20,000 videos (2 moments each), 512-d
    python bench/moments.py --photos 200000 --videos 50000 --queries 200

The index is built in a temporary directory through capwatch's own tables (Vectors.put_many with VideoMoments),
from clustered unit vectors (as bench/search.py: random centres, a shared offset, Gaussian spread); queries are
drawn about the same centres with another offset. Prints p50/p99 of both (warm: the sign bits in memory), their
ratio, the entries per asset, and the load average (the box is shared: read the ratio, not the seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from capwatch.library.index import ImageRecord, Index
from capwatch.library.moments import VideoMoments, nearest_assets
from capwatch.library.vectors import Vectors


def _clustered(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray, offset: np.ndarray,
               spread: float) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + offset + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(db: Path, photos: int, videos: int, dim: int, seed: int = 0) -> tuple[Index, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim))
    offset = rng.standard_normal(dim) * 1.5
    index = Index.open(db)
    paths = [f"/bench/p/{i:07d}.jpg" for i in range(photos)] + [f"/bench/v/{i:07d}.mp4" for i in range(videos)]
    for start in range(0, len(paths), 20_000):
        index.upsert_many([ImageRecord(path=p, size=1, mtime_ns=1, status="captioned", caption="x",
                                       fingerprint="fp") for p in paths[start:start + 20_000]])
    vectors = Vectors(index)
    image_vectors = _clustered(rng, len(paths), dim, centres, offset, 0.8)
    # A video's moments lie near its poster (the same scene, another moment) or elsewhere (another scene).
    frames = _clustered(rng, 2 * videos, dim, centres, offset, 0.8)
    for start in range(0, len(paths), 10_000):
        chunk = paths[start:start + 10_000]
        moments = {}
        for number, path in enumerate(chunk, start):
            if number >= photos:
                v = number - photos
                moments[path] = VideoMoments(1.0, ((3.0, frames[2 * v]), (6.0, frames[2 * v + 1])))
        vectors.put_many([(p, "bench", "fp", image_vectors[i]) for i, p in enumerate(chunk, start)], moments)
    with index.transaction():
        vectors.rebuild_blocks("bench")
    queries = _clustered(np.random.default_rng(seed + 1), 1000, dim, centres, rng.standard_normal(dim) * 1.5, 2.0)
    return index, queries


def _times(run, queries: np.ndarray) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for q in queries:
        started = time.perf_counter()
        run(q)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--videos", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--limit", type=int, default=50, help="results per query (the fusion depth)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capwatch-moments-") as tmp:
        started = time.perf_counter()
        index, queries = build(Path(tmp) / "index.db", args.photos, args.videos, args.dim)
        print(f"built {args.photos} photos + {args.videos} videos ({2 * args.videos} moments) in "
              f"{time.perf_counter() - started:.1f} s; load {os.getloadavg()[0]:.1f}")
        vectors = Vectors(index)
        queries = queries[:args.queries]
        anchor = lambda q: vectors.nearest("bench", q, limit=args.limit)  # noqa: E731
        assets = lambda q: nearest_assets(vectors, index, "bench", q, limit=args.limit)  # noqa: E731
        anchor(queries[0])
        assets(queries[0])  # warm: the sign bits in memory for both
        # Interleaved rounds, so load changes hit both sides alike.
        a_times: list[float] = []
        m_times: list[float] = []
        for start in range(0, len(queries), 10):
            a_times += _times(anchor, queries[start:start + 10])
            m_times += _times(assets, queries[start:start + 10])
        distinct = [len({h.image_id for h in assets(q)}) for q in queries[:20]]
        index.close()

    def p(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))

    print(f"Vectors.nearest (anchor)  p50 {p(a_times, 50):7.1f} ms  p99 {p(a_times, 99):7.1f} ms")
    print(f"nearest_assets (moments)  p50 {p(m_times, 50):7.1f} ms  p99 {p(m_times, 99):7.1f} ms")
    print(f"ratio p50 {p(m_times, 50) / p(a_times, 50):.2f}x  p99 {p(m_times, 99) / p(a_times, 99):.2f}x; "
          f"distinct assets per {args.limit} asked: {statistics.median(distinct):.0f}; "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
