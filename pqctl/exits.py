"""Exit codes of every pqctl command, and the one way commands report a failure."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from planner.plan import Plan, PlanValidationError
from pqctl.render.console import make_console

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_STAGE_FAILED = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130


def fail(title: str, message: str, code: int) -> typer.Exit:
    """Print ``error: title: message`` on stderr; the exception to raise with ``code``."""
    make_console(stderr=True).print(
        f"[bold red]error:[/] {escape(title)}: {escape(message)}", highlight=False
    )
    return typer.Exit(code)


def load_plan(path: Path, option: str | None = None) -> Plan:
    """Read and validate a plan file; on a bad one, report it (naming ``option`` when the file
    came through one, and the bad field) and exit with EXIT_BAD_INPUT."""
    try:
        return Plan.load(path)
    except PlanValidationError as exc:
        title = f"invalid plan {path}" if option is None else f"{option}: invalid plan {path}"
        raise fail(title, f"{exc.field}: {exc.problem}", EXIT_BAD_INPUT) from exc
