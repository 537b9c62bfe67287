"""The ``capwatch`` command line: parse, load config, call one library function, format the output.

A thin click layer over the library. ``app`` holds the group, the global options and ``main``; each command lives
with its kin (``find``: search and status; ``captioning``: caption, scan, recaption; ``models``; ``running``: watch
and service install). Importing this package registers them all.

Exit codes (the CLI contract): 0 ok; 1 some files failed (the others were still done); 2 usage, config, query or
index error, reported as ONE line on stderr (``capwatch: error: ...``), never a traceback.
"""

from capwatch.cli import captioning, find, meaning, models, running, serving
from capwatch.cli.app import cli, main

__all__ = ["captioning", "cli", "find", "main", "meaning", "models", "running", "serving"]
