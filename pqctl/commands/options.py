"""Option values that several commands parse alike."""

from __future__ import annotations

from rich.markup import escape

from pqctl.exits import EXIT_BAD_INPUT, fail
from pqctl.render.console import make_console

RAY_OPTION_HELP = (
    "A Ray cluster: HOST:PORT of its head, or auto (RAY_ADDRESS, else the head started on "
    "this machine); every alive node's GPUs (NVML), else its CPU, and the measured links. "
    "Needs pip install 'pqctl[ray]'."
)


def int_list(text: str, flag: str, allowed: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """A comma-separated list of positive integers (of ``allowed`` when given), each once, in
    the order given; exit 2 naming ``flag`` when it is not one."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    bad = not values or any(v <= 0 for v in values)
    if allowed is not None:
        bad = bad or any(v not in allowed for v in values)
    if bad:
        what = ", ".join(map(str, allowed)) if allowed else "positive integers"
        raise fail(
            "bad option",
            f'{flag}: "{text}" is not a comma-separated list of {what}',
            EXIT_BAD_INPUT,
        )
    return tuple(dict.fromkeys(values))


def say_step(line: str) -> None:
    """One step of a longer command (a Ray inventory, a remote profile), dimmed on stderr."""
    make_console(stderr=True).print(f"[dim]{escape(line)}…[/]", highlight=False)
