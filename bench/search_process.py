"""Whole `capwatch search` processes, this tree against another capwatch tree, alternating: A, B, A, B, ...

    python bench/search_process.py --against /work/wt/before [--runs 15] [--by meaning] [--daemon]
    git worktree add --detach /work/wt/before REV     # the other tree: any older commit, checked out beside this one

On the index and model that ``python bench/search.py --vectors N --embed-model DIR`` leaves in bench/_work
(``vectors-N-DIM.db`` and its bench home, whose stamp key and derived cache a scan would have made), each run is
``python -m capwatch --db DB search QUERY --by BY --json`` with PYTHONPATH set to one tree or the other, from this
small process (a parent holding gigabytes makes every fork slower: ~25 ms a run measured), queries taken in turn
from five plain phrases. Alternating runs share whatever the shared machine is doing at the time, which one-sided
figures do not: on the 2-core VMs here the same command's p50 drifted by a third between runs minutes apart.
Prints per side the p50, p90 and spread (ms) and the ratio of the p50s. With ``--daemon``, a ``capwatch watch
--no-caption`` of this tree runs meanwhile (the search asks it for the query's embedding and nearest images).

Both trees are compiled to bytecode first (an installed capwatch runs from cached bytecode); the first run of each
side is a warm-up, not counted (page cache, the first search's derived graphs).
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
QUERIES = ("a dog on a couch", "sunset at the beach", "red bike leaning on a wall", "two people standing on sand",
           "snowy mountain")


def environment(home: Path, model: Path) -> dict[str, str]:
    env = {**os.environ, "CAPWATCH_OFFLINE": "1", "CAPWATCH_EMBED_MODEL": str(model), "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config"), "STATE_DIRECTORY": str(home / "state"),
           "CACHE_DIRECTORY": str(home / "cache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run(tree: Path, env: dict[str, str], db: Path, query: str, by: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "capwatch", "--db", str(db), "search", query, "--by", by, "--json"],
                          env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True, cwd=tree)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: capwatch search failed: {proc.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, required=True, help="the other capwatch tree (a git worktree)")
    parser.add_argument("--runs", type=int, default=15, help="runs per side, after one warm-up each")
    parser.add_argument("--by", default="meaning", choices=["meaning", "words", "both"])
    parser.add_argument("--db", type=Path, default=WORK / "vectors-1000000-512.db")
    parser.add_argument("--embed-model", type=Path, default=WORK / "embed-clip-vit-b32")
    parser.add_argument("--home", type=Path, default=WORK / "bench-home",
                        help="the bench home bench/search.py made (stamp key, config, derived cache)")
    parser.add_argument("--daemon", action="store_true", help="with `capwatch watch` of this tree running")
    args = parser.parse_args()
    other = args.against.resolve()
    if not (other / "capwatch" / "__init__.py").is_file():
        raise SystemExit(f"--against {other}: not a capwatch tree (no capwatch/__init__.py)")
    if not args.db.is_file() or not (args.home / "state").is_dir():
        raise SystemExit(f"{args.db} or {args.home}: run `python bench/search.py --vectors N --embed-model DIR` first")
    for tree in (ROOT, other):
        compileall.compile_dir(str(tree / "capwatch"), quiet=1)
    env = environment(args.home.resolve(), args.embed_model.resolve())
    # The other tree gets a home of its own (the same stamp key and config, its own derived cache): two capwatch
    # versions sharing one cache each prune the other's entries of another recipe version and make their own
    # again at every run (seen: both sides ~1.7 s instead of ~0.5 s). Its first, uncounted run makes them.
    other_home = WORK / "bench-home-against"
    shutil.rmtree(other_home, ignore_errors=True)
    for part in ("state", ".config"):
        if (args.home / part).is_dir():
            shutil.copytree(args.home / part, other_home / part)
    other_env = environment(other_home.resolve(), args.embed_model.resolve())
    daemon = None
    if args.daemon:
        from capwatch.daemon.textserver import ask

        empty = WORK / "bench-empty-root"
        empty.mkdir(exist_ok=True)
        daemon = subprocess.Popen([sys.executable, "-m", "capwatch", "--db", str(args.db), "watch", "--no-caption",
                                   str(empty)], env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while ask(args.db, "probe") is None:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("capwatch watch did not start answering text embeddings")
            time.sleep(0.2)
    sides = {"this tree": (ROOT, env), "against": (other, other_env)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    load = os.getloadavg()[0]
    try:
        for k in range(args.runs + 1):
            for name, (tree, side_env) in sides.items():
                elapsed = run(tree, side_env, args.db, QUERIES[k % len(QUERIES)], args.by)
                if k:
                    times[name].append(elapsed)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=60)
    print(f"`capwatch search WORDS --by {args.by} --json`{' with a daemon' if args.daemon else ''}, {args.runs} runs "
          f"a side, alternating; load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        ms = sorted(v * 1000 for v in values)
        print(f"{name:10} p50 {statistics.median(ms):6.0f} ms  p90 {ms[int(0.9 * (len(ms) - 1))]:6.0f} ms  "
              f"({ms[0]:.0f}-{ms[-1]:.0f})  {sides[name][0]}")
    ratio = statistics.median(times["against"]) / statistics.median(times["this tree"])
    print(f"ratio     against / this tree, p50: {ratio:.2f}")


if __name__ == "__main__":
    main()
