"""Progress of a long command on stderr: a rich bar with elapsed time and ETA on a terminal, one
plain line per step otherwise (logs and CI keep a record without control codes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pqctl.render.console import make_console

Update = Callable[[str, int, int], None]
"""Called with (what is being done, steps done, steps planned)."""

LINE_EVERY_S = 5.0
"""Without a terminal, a step of the same task prints at most this often (the last always)."""


@contextmanager
def progress(unit: str = "", *, console: Console | None = None) -> Iterator[Update]:
    """Yields the callback a long operation reports to; ``unit`` names its steps ("samples").

    On a terminal each distinct task (the first argument) gets a bar with done/planned, elapsed
    time and the time remaining; otherwise a line is printed when a task starts, at most every
    :data:`LINE_EVERY_S` seconds while it runs, and when it completes.
    """
    out = console or make_console(stderr=True)
    if out.is_terminal:
        with _bars(out, unit) as update:
            yield update
    else:
        lines = _Lines(out, unit)
        yield lines.update
        lines.finish()


@contextmanager
def _bars(console: Console, unit: str) -> Iterator[Update]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}" + (f" {unit}" if unit else "")),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(escape(what), total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield update


class _Lines:
    """One line when a task starts, then at most every :data:`LINE_EVERY_S` seconds, and its
    last state when the operation ends (a task's planned total may still grow meanwhile)."""

    def __init__(self, console: Console, unit: str) -> None:
        self.console, self.unit = console, unit
        self.started: dict[str, float] = {}
        self.said: dict[str, float] = {}
        self.latest: dict[str, tuple[int, int]] = {}
        self.shown: dict[str, tuple[int, int]] = {}

    def update(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        first = what not in self.started
        self.started.setdefault(what, now)
        self.latest[what] = (done, total)
        if first or now - self.said.get(what, 0.0) >= LINE_EVERY_S:
            self._say(what, now)

    def finish(self) -> None:
        now = time.monotonic()
        for what, latest in self.latest.items():
            if self.shown.get(what) != latest:
                self._say(what, now)

    def _say(self, what: str, now: float) -> None:
        done, total = self.latest[what]
        self.said[what], self.shown[what] = now, (done, total)
        elapsed = now - self.started[what]
        line = f"{what}: {done}/{total}" + (f" {self.unit}" if self.unit else "")
        if total > 0 and done >= total:
            line += f", {elapsed:.1f} s"
        elif done > 0:
            line += f", {elapsed:.0f} s, about {elapsed * (total - done) / done:.0f} s left"
        self.console.print(escape(line), highlight=False, soft_wrap=True)
