"""`capwatch serve` benchmark: first results page, thumbnails of a 24 MP JPEG, idle memory; next to `capwatch search`.

    python bench/serve.py                      # the 1 M-image index of bench/search.py (built once, reused)
    python bench/serve.py --images 100000      # a smaller one

Anchors (issue 13): first results page <= 150 ms server time on the 1 M-row index; a thumbnail of a 24 MP JPEG
<= 80 ms on a cold cache and <= 5 ms warm; an idle server <= 120 MB resident.

- *Page*: GET /?q=WORDS through the real ASGI application in this process (Starlette, guard, templates), timed
  inside the server from the request entering the app to its last byte (the test client's ~5 ms left out);
  beside it, for the same queries, capwatch's search call (what `capwatch search`
  runs after parsing its arguments: parse_query + Index.search with limit 20 on a read-only index) and the wall
  time of the `capwatch search` command (a new Python process each time) for a few of them. The bench index's
  paths (/photos/...) have no files, so the page renders no tiles (a file must exist to be shown); rendering
  the tiles is timed separately on a page of real files.
- *Thumbnails*: a 6000x4000 JPEG (photo-like content), GET /thumb/ID with the cache emptied before each cold
  request; warm = cached file served; 304 = If-None-Match revalidation.
- *Memory*: a real `capwatch serve` process on the index: VmRSS after start and after one search.
- *Slow loris* (``--slowloris``, issue 20): a real `capwatch serve` from this tree and one from ``--anchor``
  (main's code), each with N sockets that send one header line every 5 s and never finish; the token holder's
  requests meanwhile (how many got 200, p50/max latency), and how many slow sockets are still open 12 s later.

    python bench/serve.py --slowloris                      # N = 0, 64, 200 against /work/main

- *Pictures that cost* (``--pictures [--anchor-tree /work/main]``, issue 20 item 10): a 0.5 MB PNG cut off whose
  header says 13000x13000, and a valid 13000x13000 (169 MP) PNG, each asked for as a thumbnail 3 times from a
  fresh real `capwatch serve` process of this tree and, side by side, of the anchor tree (another checkout, e.g.
  main): the server's CPU time per request (utime + stime from /proc) and its peak resident memory (VmHWM) over
  its idle size. Only this part runs with ``--pictures``.
- *Tiles from embedded previews* (``--tiles``, issue 24): the same 24 MP photo three ways: plain, with an MPF large
  thumbnail (1620x1080, as cameras store one), and with a 640x427 EXIF thumbnail (written by exiftool); cold
  GET /thumb (320 px) and /preview (1600 px) of each through the real application (interleaved rounds, cache
  emptied before each request), next to Pillow's own decode of the plain file (full, and draft-reduced to the
  tile) in the same rounds. Only this part runs with ``--tiles``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import os
import random
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from capwatch.config import Config, IndexConfig, LibraryConfig, RootConfig, ServeConfig  # noqa: E402
from capwatch.library.index import Index  # noqa: E402
from capwatch.library.scan import reconcile  # noqa: E402
from capwatch.library.search import SearchFilters, parse_query  # noqa: E402
from capwatch.web.app import ServeSettings, create_app  # noqa: E402


def _search_bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_search", REPO / "bench" / "search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ServerClock:
    """Wraps the ASGI application: the time from a request entering the app (guard included) to its last byte
    leaving it, i.e. server time without the test client's own cost (measured: ~5 ms per request)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last_ms = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.last_ms = (time.perf_counter() - started) * 1000

        await self.app(scope, receive, timed_send)


def _app(config: Config, cache: Path) -> tuple[TestClient, ServerClock]:
    settings = ServeSettings(config=config, csrf="bench", cache_dir=cache,
                             open_captioner=lambda: (_ for _ in ()).throw(RuntimeError("no model in the bench")),
                             live_state=lambda: None)
    clock = ServerClock(create_app(settings))
    return TestClient(clock, base_url="http://127.0.0.1:8765"), clock


def _timed_get(client: TestClient, clock: ServerClock, url: str, **kwargs: object) -> tuple[float, int]:
    answer = client.get(url, **kwargs)  # type: ignore[arg-type]
    return clock.last_ms, answer.status_code


def bench_pages(db: Path, queries: list[str], cli_runs: int) -> None:
    config = Config(library=LibraryConfig(roots=(RootConfig(Path("/photos")),)), index=IndexConfig(path=db))
    page_ms, search_ms, same_rows_ms = [], [], []
    client, clock = _app(config, Path(tempfile.mkdtemp()))
    with client, Index.open(db, readonly=True) as index:
        # The very first page a fresh server answers (the thread's index connection opened, templates compiled).
        very_first_ms, _ = _timed_get(client, clock, "/", params={"q": queries[-1]})
        for q in queries[:20]:  # warm the page cache, as bench/search.py does
            client.get("/", params={"q": q})
            index.search(parse_query(q), SearchFilters(), limit=20)
        # Interleaved per query, so that both sides meet the same cache state.
        for q in queries:
            ms, code = _timed_get(client, clock, "/", params={"q": q})
            assert code == 200, (q, code)
            page_ms.append(ms)
            started = time.perf_counter()
            index.search(parse_query(q), SearchFilters(), limit=20)
            search_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            index.search(parse_query(q), SearchFilters(), limit=49)
            same_rows_ms.append((time.perf_counter() - started) * 1000)
        first_ms, _ = _timed_get(client, clock, "/")  # the landing page: newest photos, no words
    cli_ms = []
    env = {**os.environ, "CAPWATCH_OFFLINE": "1"}
    for q in queries[:cli_runs]:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "capwatch", "--db", str(db), "search", *q.split()], env=env,
                       capture_output=True, check=False)
        cli_ms.append((time.perf_counter() - started) * 1000)
    print(f"results page GET /?q= ({len(queries)} queries, 48 per page): p50 {pct(page_ms, .5):.1f} ms, "
          f"p99 {pct(page_ms, .99):.1f} ms  (anchor 150 ms: p99 at {pct(page_ms, .99) / 150:.2f}x)")
    print(f"  capwatch search, library call, limit 20:     p50 {pct(search_ms, .5):.1f} ms, "
          f"p99 {pct(search_ms, .99):.1f} ms  (page / search p50 = {pct(page_ms, .5) / pct(search_ms, .5):.2f}x)")
    print(f"  the same call for the page's 49 rows:         p50 {pct(same_rows_ms, .5):.1f} ms, "
          f"p99 {pct(same_rows_ms, .99):.1f} ms")
    print(f"  capwatch search, whole command ({len(cli_ms)} runs):    p50 {statistics.median(cli_ms):.0f} ms "
          "(a new Python process each time)")
    print(f"first page a fresh server answers: {very_first_ms:.1f} ms; landing page GET / (newest 48, no words): "
          f"{first_ms:.1f} ms")


def _photo(path: Path, width: int, height: int) -> None:
    """A photo-like 24 MP JPEG: smooth gradients plus noise (JPEG decode cost depends on content)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    noise = rng.normal(0, 18, size=(height, width, 3)).astype(np.float32)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def bench_thumbnails(work: Path, runs: int) -> None:
    root = work / "photos"
    root.mkdir(parents=True, exist_ok=True)
    photo = root / "24mp.jpg"
    if not photo.exists():
        _photo(photo, 6000, 4000)
    db = work / "thumbs.db"
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=db),
                    serve=ServeConfig())
    with Index.open(db) as index:
        reconcile(config.library.roots[0], config, index)
        row_id = index.ids_for([str(photo)])[str(photo)]
    cache = work / "thumb-cache"
    cold, warm, revalidate, preview = [], [], [], []
    client, clock = _app(config, cache)
    with client:
        for _ in range(runs):
            shutil.rmtree(cache, ignore_errors=True)
            ms, code = _timed_get(client, clock, f"/thumb/{row_id}")
            assert code == 200
            cold.append(ms)
        etag = client.get(f"/thumb/{row_id}").headers["etag"]
        for _ in range(runs * 4):
            warm.append(_timed_get(client, clock, f"/thumb/{row_id}")[0])
            revalidate.append(_timed_get(client, clock, f"/thumb/{row_id}", headers={"If-None-Match": etag})[0])
        for _ in range(max(2, runs // 2)):
            shutil.rmtree(cache, ignore_errors=True)
            preview.append(_timed_get(client, clock, f"/preview/{row_id}")[0])
    print(f"thumbnail 320 px of a 24 MP JPEG: cold p50 {statistics.median(cold):.1f} ms (anchor 80 ms: "
          f"{statistics.median(cold) / 80:.2f}x), warm p50 {statistics.median(warm):.2f} ms (anchor 5 ms: "
          f"{statistics.median(warm) / 5:.2f}x), 304 p50 {statistics.median(revalidate):.2f} ms")
    print(f"preview 1600 px, cold p50 {statistics.median(preview):.1f} ms")


def _previewed(photo: Path, root: Path) -> dict[str, Path]:
    """``photo`` plain, with an MPF large thumbnail and with a large EXIF thumbnail (each made once)."""
    sys.path.insert(0, str(REPO / "tests"))
    from jpeg_previews import LARGE_THUMBNAIL_FULL_HD, jpeg_bytes, set_exif_thumbnail, with_mpf

    files = {"plain": photo, "MPF 1620x1080": root / "24mp-mpf.jpg", "EXIF 640x427": root / "24mp-exif.jpg"}
    with Image.open(photo) as img:
        full_hd = img.resize((1620, 1080), Image.Resampling.BICUBIC)
        vga = img.resize((640, 427), Image.Resampling.BICUBIC)
    if not files["MPF 1620x1080"].exists():
        files["MPF 1620x1080"].write_bytes(with_mpf(photo.read_bytes(), [(jpeg_bytes(full_hd, quality=85),
                                                                          LARGE_THUMBNAIL_FULL_HD)]))
    if not files["EXIF 640x427"].exists():
        shutil.copy(photo, files["EXIF 640x427"])
        thumb = root.parent / "vga-thumb.jpg"
        vga.save(thumb, quality=75)
        set_exif_thumbnail(files["EXIF 640x427"], thumb)
    return files


def _pillow_ms(photo: Path, px: int | None) -> float:
    started = time.perf_counter()
    with Image.open(photo) as img:
        if px is not None:
            img.draft("RGB", (px, px * img.height // img.width))
        img.load()
        if px is not None:
            img.thumbnail((px, px))
    return (time.perf_counter() - started) * 1000


def bench_tiles(work: Path, runs: int) -> None:
    root = work / "photos"
    root.mkdir(parents=True, exist_ok=True)
    photo = root / "24mp.jpg"
    if not photo.exists():
        _photo(photo, 6000, 4000)
    files = _previewed(photo, root)
    db = work / "tiles.db"
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=db),
                    serve=ServeConfig())
    with Index.open(db) as index:
        reconcile(config.library.roots[0], config, index)
        ids = index.ids_for([str(p) for p in files.values()])
    cache = work / "tile-cache"
    times: dict[str, list[float]] = {}
    client, clock = _app(config, cache)
    with client:
        for _ in range(runs):
            for px, route in ((320, "thumb"), (1600, "preview")):
                times.setdefault(f"Pillow full decode of the plain file, {px} px", []).append(_pillow_ms(photo, None))
                times.setdefault(f"Pillow draft decode of the plain file to {px} px", []).append(
                    _pillow_ms(photo, px))
                for name, path in files.items():
                    shutil.rmtree(cache, ignore_errors=True)
                    ms, code = _timed_get(client, clock, f"/{route}/{ids[str(path)]}")
                    assert code == 200, (name, route)
                    times.setdefault(f"cold /{route} ({px} px), {name}", []).append(ms)
    anchor = {px: statistics.median(times[f"cold /{r} ({px} px), plain"]) for px, r in ((320, "thumb"),
                                                                                        (1600, "preview"))}
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min); {runs} interleaved rounds, medians")
    for label, values in times.items():
        px = 320 if "320" in label else 1600
        print(f"  {label:58s} {statistics.median(values):7.1f} ms  ({statistics.median(values) / anchor[px]:.2f}x "
              f"the plain file's cold tile{', goal 80 ms' if px == 320 else ''})")


def bench_memory(db: Path, query: str) -> None:
    config = Path(tempfile.mkdtemp()) / "config.toml"
    config.write_text(f'[library]\nroots = ["/photos"]\n[index]\npath = "{db}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), "serve", "--port", "0"],
                            env={**os.environ, "CAPWATCH_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # The address line, after any warning (the bench index's /photos root is no folder here).
        seen: list[str] = []
        match = None
        while match is None and len(seen) < 20:
            seen.append(proc.stderr.readline())
            match = SERVING.search(seen[-1])
        assert match, seen
        time.sleep(1.0)
        idle = _rss_mb(proc.pid)
        import urllib.parse

        status, _ = _get(int(match.group(2)), "/?q=" + urllib.parse.quote(query), match.group(3), timeout=30)
        assert status == 200, status
        time.sleep(0.5)
        after = _rss_mb(proc.pid)
        anon = _rss_mb(proc.pid, "RssAnon")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"server RSS: idle {idle:.0f} MB (anchor 120 MB: {idle / 120:.2f}x); after a search {after:.0f} MB, of "
          f"which {anon:.0f} MB its own (the rest: pages of the memory-mapped index, the OS page cache, shared)")


#: The line `capwatch serve` prints when it listens: address, port, and (since issue 20) the access token.
SERVING = re.compile(r"serving (http://127\.0\.0\.1:(\d+)/)(?:\?token=(\S+))?")


def _get(port: int, path: str, token: str | None, timeout: float) -> tuple[int, float]:
    """One GET on a fresh connection, with the token as a bearer header when there is one: (status or 0 for no
    answer, seconds)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        answer = conn.getresponse()
        answer.read()
        status = answer.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, time.perf_counter() - started


class _SlowLoris:
    """``count`` connections from 127.0.0.1, each sending a request line and then one header line every
    ``interval`` seconds (never finishing its head); the dripping thread stops by itself after ``limit`` s."""

    def __init__(self, port: int, count: int, interval: float, limit: float) -> None:
        self.socks: list[socket.socket] = []
        for _ in range(count):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError:
                continue
            self.socks.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, args=(interval, time.monotonic() + limit), daemon=True)
        self._thread.start()

    def _drip(self, interval: float, until: float) -> None:
        while not self._stop.wait(interval) and time.monotonic() < until:
            for sock in self.socks:
                with contextlib.suppress(OSError):  # closed by the server: that is the point
                    sock.sendall(b"X-Slow: 1\r\n")

    def still_open(self) -> int:
        """How many of the connections the server has not closed."""
        open_ = 0
        for sock in self.socks:
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                if not readable or sock.recv(1024, socket.MSG_DONTWAIT) != b"":
                    open_ += 1
            except (BlockingIOError, InterruptedError):
                open_ += 1
            except OSError:
                pass
        return open_

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def _slowloris_run(tree: Path, work: Path, slow: int, requests: int, interval: float,
                   wait: float) -> tuple[list[tuple[int, float]], int, int]:
    """A real `capwatch serve` from ``tree`` (its own code: PYTHONPATH and cwd), ``slow`` slow-loris sockets,
    then ``requests`` requests of the token's holder one after another; then, ``wait`` s later, how many slow
    sockets are still open. Returns (the (status, seconds) of each request, sockets opened, still open)."""
    home = work / f"home-{tree.name}-{slow}"
    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
           "XDG_CACHE_HOME": str(home / "cache"), "XDG_CONFIG_HOME": str(home / "config"), "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(work / "config.toml"), "serve",
                             "--port", "0"], env=env, cwd=tree, stderr=subprocess.PIPE, text=True)
    loris = None
    try:
        assert proc.stderr is not None
        match = None
        for _ in range(20):
            match = SERVING.search(proc.stderr.readline())
            if match:
                break
        assert match, f"capwatch serve from {tree} did not start"
        port, token = int(match.group(2)), match.group(3)
        assert _get(port, "/?q=cat", token, timeout=30)[0] == 200  # warm: templates, the index opened
        loris = _SlowLoris(port, slow, interval, limit=wait + 30)
        time.sleep(0.5)
        answers = [_get(port, "/?q=cat", token, timeout=10) for _ in range(requests)]
        time.sleep(wait)
        return answers, len(loris.socks), loris.still_open()
    finally:
        if loris is not None:
            loris.stop()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def bench_slowloris(anchor: Path, work: Path, counts: list[int], requests: int, interval: float,
                    wait: float) -> None:
    """Issue 20 item 7: the token holder's requests while N slow-loris sockets are open, on ``anchor`` (main's
    tree) and on this tree, side by side."""
    work.mkdir(parents=True, exist_ok=True)
    root = work / "photos"
    root.mkdir(exist_ok=True)
    if not (root / "cat.jpg").exists():
        Image.new("RGB", (64, 48), (120, 90, 60)).save(root / "cat.jpg")
    db = work / "slow.db"
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=db))
    with Index.open(db) as index:
        reconcile(config.library.roots[0], config, index)
    (work / "config.toml").write_text(f'[library]\nroots = ["{root}"]\n[index]\npath = "{db}"\n')
    print(f"slow loris: N sockets from 127.0.0.1 each sending a header line every {interval:g} s; then {requests} "
          f"GET /?q=cat of the token's holder one after another (10 s timeout each); {wait:g} s later, how many "
          "slow sockets are still open. A shared, noisy 2-core box: latencies are rough.")
    print(f"{'N':>5} | {'main: 200s':>10} {'p50 ms':>8} {'max ms':>8} {'open':>9} | "
          f"{'branch: 200s':>12} {'p50 ms':>8} {'max ms':>8} {'open':>9}")
    for slow in counts:
        row = [f"{slow:>5}"]
        for tree in (anchor, REPO):
            answers, opened, still = _slowloris_run(tree, work, slow, requests, interval, wait)
            ok = [t * 1000 for status, t in answers if status == 200]
            codes = sorted({status for status, _ in answers if status != 200})
            width = 10 if tree == anchor else 12
            label = f"{len(ok)}/{len(answers)}" + (f" ({','.join(map(str, codes))})" if codes else "")
            row.append(f"{label:>{width}} {statistics.median(ok) if ok else float('nan'):8.1f} "
                       f"{max(ok) if ok else float('nan'):8.1f} {f'{still}/{opened}':>9}")
        print(" | ".join(row), flush=True)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _big_png(path: Path, side: int, *, cut_at: int | None = None, noise: bool = True) -> None:
    """A ``side`` x ``side`` RGB PNG written row by row (never held whole): smooth rows, with a little noise
    unless ``noise`` is False (then they compress ~100:1, so a few hundred KB hold many rows); ``cut_at``: keep
    only that many bytes (a file cut off in transfer)."""
    import struct
    import zlib

    rng = np.random.default_rng(11)
    ramp = (np.arange(side * 3, dtype=np.uint32) * 255 // (side * 3)).astype(np.uint8)
    packer = zlib.compressobj(6)
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)))
        written = out.tell()
        for y in range(side):
            row = (ramp + np.uint8(y % 256) + (rng.integers(0, 4, side * 3, dtype=np.uint8) if noise else 0))
            row = row.astype(np.uint8).tobytes()
            data = packer.compress(b"\x00" + row)
            if data:
                out.write(_png_chunk(b"IDAT", data))
                written += len(data) + 12
            if cut_at is not None and written >= cut_at:
                break
        else:
            out.write(_png_chunk(b"IDAT", packer.flush()) + _png_chunk(b"IEND", b""))
    if cut_at is not None:
        with open(path, "r+b") as out:
            out.truncate(cut_at)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_tree(tree: Path, config: Path, home: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_STATE_HOME": str(home / "state"), "XDG_CONFIG_HOME": str(home / "config")}
    proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), "serve", "--port", "0"],
                            env=env, cwd=tree, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for _ in range(20):
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", proc.stderr.readline())
        if match:
            # Whatever it logs later goes nowhere (a full pipe would stall the server).
            import threading

            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"capwatch serve of {tree} did not start")


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def _token_headers(home: Path) -> dict[str, str]:
    # A tree that asks for its access token on loopback keeps it in the state folder.
    token = home / "state" / "capwatch" / "serve-token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}


def bench_pictures(work: Path, anchor: Path | None, requests: int) -> None:
    import urllib.error
    import urllib.request

    root = work / "pictures"
    root.mkdir(parents=True, exist_ok=True)
    files = {"truncated 13000x13000 PNG (0.5 MB)": root / "cut-13000.png",
             "valid 13000x13000 PNG (169 MP)": root / "full-13000.png"}
    if not files["truncated 13000x13000 PNG (0.5 MB)"].exists():
        _big_png(files["truncated 13000x13000 PNG (0.5 MB)"], 13000, cut_at=512 * 1024, noise=False)
    if not files["valid 13000x13000 PNG (169 MP)"].exists():
        print("writing a valid 13000x13000 PNG (once) ...", flush=True)
        _big_png(files["valid 13000x13000 PNG (169 MP)"], 13000)
    db = work / "pictures.db"
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)), index=IndexConfig(path=db))
    with Index.open(db) as index:
        reconcile(config.library.roots[0], config, index)
        ids = index.ids_for(str(p) for p in files.values())
    config_file = work / "pictures.toml"
    config_file.write_text(f'[library]\nroots = ["{root}"]\n[index]\npath = "{db}"\n')
    trees = [("this tree", REPO)] + ([("anchor " + str(anchor), anchor)] if anchor else [])
    results: dict[tuple[str, str], tuple[list[float], float, list[int]]] = {}
    for label, path in files.items():
        for tree_label, tree in trees:
            home = Path(tempfile.mkdtemp(prefix="bench-serve-"))
            proc, url = _serve_tree(tree, config_file, home)
            try:
                time.sleep(1.0)
                idle = _rss_mb(proc.pid, "VmHWM")
                cpu, codes = [], []
                for _ in range(requests):
                    before = _cpu_seconds(proc.pid)
                    request = urllib.request.Request(f"{url}thumb/{ids[str(path)]}", headers=_token_headers(home))
                    try:
                        with urllib.request.urlopen(request, timeout=600) as answer:
                            codes.append(answer.status)
                    except urllib.error.HTTPError as exc:
                        codes.append(exc.code)
                    cpu.append(_cpu_seconds(proc.pid) - before)
                peak = _rss_mb(proc.pid, "VmHWM") - idle
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                shutil.rmtree(home, ignore_errors=True)
            results[(label, tree_label)] = (cpu, peak, codes)
    print(f"pictures that cost: GET /thumb/ID x{requests}, a fresh server per file and tree "
          "(server CPU seconds per request; peak RSS over idle, MB; shared 2-core box, noisy)")
    for label in files:
        for tree_label, _ in trees:
            cpu, peak, codes = results[(label, tree_label)]
            print(f"  {label:36} {tree_label:22} CPU/request " + " ".join(f"{c:6.2f}" for c in cpu)
                  + f"  total {sum(cpu):6.2f} s  peak +{peak:6.0f} MB  status {codes}")
        if anchor:
            mine, theirs = results[(label, "this tree")], results[(label, trees[1][0])]
            print(f"  {'':36} anchor / this tree: CPU {sum(theirs[0]) / max(sum(mine[0]), 0.01):.0f}x, "
                  f"peak memory {max(theirs[1], 1) / max(mine[1], 1):.0f}x")


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--thumb-runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work")
    parser.add_argument("--slowloris", action="store_true", help="only the slow-loris comparison (issue 20): this "
                        "tree next to --anchor")
    parser.add_argument("--anchor", type=Path, default=Path("/work/main"), help="the tree to compare with "
                        "(default /work/main, main's code)")
    parser.add_argument("--slow", default="0,64,200", help="numbers of slow-loris sockets, comma-separated")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between a slow socket's header lines")
    parser.add_argument("--wait", type=float, default=12.0, help="seconds after the requests before counting the "
                        "slow sockets still open")
    parser.add_argument("--pictures", action="store_true", help="only the costly-pictures bench (issue 20 item 10)")
    parser.add_argument("--anchor-tree", type=Path, default=None,
                        help="another checkout (e.g. /work/main) to run side by side in --pictures")
    parser.add_argument("--picture-requests", type=int, default=3)
    parser.add_argument("--tiles", action="store_true", help="only the embedded-preview tiles (issue 24)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.slowloris:
        bench_slowloris(args.anchor.resolve(), args.work / "slowloris", [int(n) for n in args.slow.split(",")],
                        args.requests, args.interval, args.wait)
        return
    if args.pictures:
        bench_pictures(args.work, args.anchor_tree, args.picture_requests)
        return
    if args.tiles:
        bench_tiles(args.work / "serve", args.thumb_runs)
        return
    search: object = _search_bench()
    db = args.work / f"search-{args.images}.db"
    rng = random.Random(args.seed)
    if not db.exists():
        print(f"building {args.images:,} images into {db} (bench/search.py's builder) ...", flush=True)
        _, vocab, weights = search.build(db, args.images, args.seed)  # type: ignore[attr-defined]
    else:
        vocab = search._vocabulary(6000, rng)  # type: ignore[attr-defined]
        weights = search._zipf_weights(len(vocab))  # type: ignore[attr-defined]
    queries = search.make_queries(vocab, weights, args.queries, args.seed)  # type: ignore[attr-defined]
    print(f"index: {db} ({args.images:,} images)")
    bench_pages(db, queries, args.cli_runs)
    bench_thumbnails(args.work / "serve", args.thumb_runs)
    bench_memory(db, queries[0])


if __name__ == "__main__":
    main()
