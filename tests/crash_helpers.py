"""A real writer process for the kill -9 tests: it imports capwatch first and writes only when told to, so the test
spins on the file (to kill at a moment inside the write) for the write alone, not for Python's start-up too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from capwatch.metadata import Provenance

REPO = Path(__file__).resolve().parent.parent

_CODE = """
    import sys
    from pathlib import Path
    from capwatch.config import MetadataConfig
    from capwatch.metadata import Journal, Provenance, write_caption
    target, journal, caption, model, revision, created_at = sys.argv[1:7]
    config, prov = MetadataConfig(), Provenance(model, revision or None, created_at)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)
    write_caption(Path(target), caption, prov, config, journal=Journal(Path(journal)))
"""


class Writer:
    """``write_caption(target, caption, prov)`` in a child process of its own (with its own write journal), held
    after its imports until :meth:`go`."""

    def __init__(self, target: Path, journal: Path, caption: str, prov: Provenance) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_CODE), str(target), str(journal), caption, prov.model,
             prov.revision or "", prov.created_at],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks (no CPU) while the child starts
        assert line == b"ready\n", (line, self.proc.wait(60))

    def go(self) -> subprocess.Popen[bytes]:
        """Let the write begin; returns the process (to poll and kill)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        return self.proc

    def close(self) -> None:
        """Reap the process (killed or finished) and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
