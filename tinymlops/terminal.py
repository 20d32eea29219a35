"""The CLI's consoles: a terminal's own width, and wide output where there is no terminal."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Piped into a file or a CI log, rich would assume 80 columns and wrap every table row.
PIPE_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    """A console for the CLI; ``COLUMNS`` wins, a terminal gives its width, anything else :data:`PIPE_WIDTH`."""
    stream = sys.stderr if stderr else sys.stdout
    if "COLUMNS" in os.environ or stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPE_WIDTH)
