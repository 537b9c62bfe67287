"""``python -m capwatch``: the same as the ``capwatch`` command."""

from capwatch.cli import main

main()
