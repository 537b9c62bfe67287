"""The ``capwatch`` command line: parse, load config, call one library function, format the output.

A thin click layer over the library. ``app`` holds the group, the global options and ``main``; each command lives
with its kin (``find``: search and status; ``captioning``: caption, scan, recaption; ``meaning``: similar and
duplicates; ``models``; ``running``: watch and service install; ``serving``: serve). The group imports a command's
module when that command is used (``capwatch.cli.app.COMMAND_MODULES``): a search does not pay for the others.

Exit codes (the CLI contract): 0 ok; 1 some files failed (the others were still done); 2 usage, config, query or
index error, reported as ONE line on stderr (``capwatch: error: ...``), never a traceback.
"""

from capwatch.cli.app import cli, main

__all__ = ["cli", "main"]
