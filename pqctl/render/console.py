"""The consoles the commands print to."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

PIPE_WIDTH = 1000
"""Columns of output that is not a terminal (a pipe, a file, CI): wide enough that tables keep
their natural width and lines their length, so names and commands to copy are never cut."""


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A console on stdout (or stderr): the terminal's width on a terminal; without one,
    ``$COLUMNS`` when set, else :data:`PIPE_WIDTH` (rich's own default is 80)."""
    made = Console(stderr=stderr, **options)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = PIPE_WIDTH
    return made
