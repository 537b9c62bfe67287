"""Work split into parts run side by side: the calling thread does part 0, a thread of its own each other part.

For numpy loops and SQLite reads, which release the GIL while they work (capwatch.library.signbits' Hamming scan,
capwatch.library.vectors' row readers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_parts(count: int, work: Callable[[int], None], *, name: str) -> None:
    """Run ``work(k)`` for every k below ``count``: k = 0 in the calling thread, each other on a thread of its own
    (named ``name``), side by side; return once all have ended. What ``work(0)`` raises is raised here, after the
    others have ended; ``work`` must catch what the other parts may raise (there it would end that thread only)."""
    helpers = [threading.Thread(target=work, args=(k,), name=name, daemon=True) for k in range(1, count)]
    for helper in helpers:
        helper.start()
    try:
        work(0)
    finally:
        for helper in helpers:
            helper.join()
