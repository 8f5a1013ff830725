"""Exit codes of every pqctl command, and the one way commands report a failure."""

from __future__ import annotations

import typer
from rich.console import Console

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_STAGE_FAILED = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130


def fail(title: str, message: str, code: int) -> typer.Exit:
    """Print ``error: title: message`` on stderr; the exception to raise with ``code``."""
    Console(stderr=True).print(f"[bold red]error:[/] {title}: {message}", highlight=False)
    return typer.Exit(code)
