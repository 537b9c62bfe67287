"""Killing a real process inside one schema migration, for the tests that a migration is one transaction: whatever
statement it dies after (or just before its COMMIT), the index keeps the schema before it whole and the next open
finishes the migration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_KILLER = textwrap.dedent("""
    import os, signal, sys
    import capwatch.library.index as ix
    import capwatch.library.migrations as m
    version, stop_after = int(sys.argv[2]), int(sys.argv[3])
    migration = next(f for v, _, f in m.MIGRATIONS if v == version)

    def killed_midway(db):
        done = [0]
        real = db.execute

        def execute(*args, **kwargs):
            result = real(*args, **kwargs)
            done[0] += 1
            if done[0] == stop_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        db.execute = execute
        migration(db)
        os.kill(os.getpid(), signal.SIGKILL)  # every statement ran; the COMMIT did not

    ix.MIGRATIONS = tuple((v, n, killed_midway if v == version else f) for v, n, f in m.MIGRATIONS)
    ix.Index.open(sys.argv[1])
""")


def open_killed_in_migration(db: Path, version: int, stop_after: int) -> int:
    """Open the index ``db`` in a child process that is SIGKILLed inside migration ``version``, right after its
    ``stop_after``-th statement (or, when it has fewer, after all of them, before the COMMIT); the child's return
    code (-9 when it died there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", _KILLER, str(db), str(version), str(stop_after)], env=env,
                           timeout=120)
    return child.returncode
