"""Logs view: the gateway's and each stage's log of the deployment shown (tail, follow, filter).

The files live in the deployment's log directory (``state/logs/NAME/``: ``gateway.log``,
``stage-N.log``). A thread worker tails the chosen file every :data:`POLL_INTERVAL_S` and posts
the new lines; the view keeps the last :data:`KEEP_LINES` and shows those that contain the
filter text. ``f`` (outside the filter field) stops or resumes following the end.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Log, Select, Static
from textual.worker import get_current_worker

from pqctl.tui.widgets.field import Field
from pqctl.tui.widgets.figures import markup_escape
from runtime.serve.deployment import state_dir

POLL_INTERVAL_S = 0.5
KEEP_LINES = 2000
TAIL_BYTES = 256 * 1024
"""How much of a file's end is read when it is chosen (then it is followed)."""


@dataclass
class LogLines(Message):
    """New lines of ``path`` (``reset``: they replace what was shown: the file was chosen,
    or it was truncated)."""

    path: Path
    lines: list[str]
    reset: bool = False


def log_sources(log_dir: Path) -> list[tuple[str, Path]]:
    """(label, file) of the gateway's log, then each stage's in stage order."""
    stages = sorted(log_dir.glob("stage-*.log"), key=lambda p: _stage_number(p.stem))
    return [("gateway", log_dir / "gateway.log"), *((p.stem, p) for p in stages)]


def _stage_number(stem: str) -> int:
    number = stem.removeprefix("stage-")
    return int(number) if number.isdigit() else 1 << 30


class LogsView(Vertical):
    """The chosen log's last lines, filtered; ``f`` toggles following the end."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("f", "toggle_follow", "Follow")]
    DEFAULT_CSS = """
    LogsView #log-bar { height: 3; padding: 0 1; }
    LogsView #log-source { width: 24; }
    LogsView #log-bar Label { padding: 1 1 0 2; }
    LogsView #log-filter { width: 1fr; margin-top: 1; }
    LogsView #log-status { height: 1; padding: 0 1; color: $text-muted; }
    LogsView #log-lines { height: 1fr; border: round $panel; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.log_dir: Path | None = None
        self.path: Path | None = None
        self.lines: deque[str] = deque(maxlen=KEEP_LINES)
        self.follow = True
        self.sources: list[tuple[str, Path]] = []

    def compose(self) -> ComposeResult:
        with Horizontal(id="log-bar"):
            yield Select[str]([], id="log-source", prompt="log", allow_blank=True)
            yield Label("filter")
            yield Field(placeholder="text the lines must contain", id="log-filter", compact=True)
        yield Static("no deployment yet: its logs show here once one is launched or attached",
                     id="log-status")  # fmt: skip
        yield Log(id="log-lines", max_lines=KEEP_LINES, auto_scroll=True)

    # ----------------------------------------------------------------- inputs
    def show_dir(self, log_dir: Path) -> None:
        """Offer the logs of ``log_dir`` (a deployment's) and tail the gateway's."""
        self.log_dir = log_dir
        self._offer_sources()
        self.choose(log_dir / "gateway.log")

    def _offer_sources(self) -> None:
        if self.log_dir is None:
            return
        sources = log_sources(self.log_dir)
        if sources == self.sources:
            return
        self.sources = sources
        select = self.query_one("#log-source", Select)
        with select.prevent(Select.Changed):
            select.set_options([(label, str(path)) for label, path in sources])
            if self.path is not None:
                select.value = str(self.path)

    def choose(self, path: Path) -> None:
        """Show ``path`` from its last lines, then follow it."""
        self.path = path
        select = self.query_one("#log-source", Select)
        if select.value != str(path):
            with select.prevent(Select.Changed):
                select.value = str(path)
        self.lines.clear()
        self._redraw()
        self.tail(path)

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if isinstance(event.value, str):
            self.choose(Path(event.value))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        self.query_one("#log-lines", Log).auto_scroll = self.follow
        if self.follow:
            self.query_one("#log-lines", Log).scroll_end(animate=False)
        self._show_status()

    # ----------------------------------------------------------------- tailing
    @work(thread=True, exclusive=True, group="tail")
    def tail(self, path: Path) -> None:
        """Post the end of ``path``, then each new line, until another file is chosen."""
        worker = get_current_worker()
        offset, first = 0, True
        while not worker.is_cancelled:
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            if 0 <= size < offset:  # truncated or replaced: start again
                offset, first = 0, True
            if size > offset:
                start = max(offset, size - TAIL_BYTES) if first else offset
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read(size - start)
                end = data.rfind(b"\n") + 1  # a partial last line waits for its end
                if end:
                    text = data[:end].decode("utf-8", errors="replace")
                    lines = text.splitlines()
                    if first and start > 0:
                        lines = lines[1:]  # the first line was cut by the seek
                    self.post_message(LogLines(path, lines, reset=first))
                    offset, first = start + end, False
            self.app.call_from_thread(self._offer_sources)
            deadline = time.monotonic() + POLL_INTERVAL_S
            while not worker.is_cancelled and time.monotonic() < deadline:
                time.sleep(0.05)

    def on_log_lines(self, message: LogLines) -> None:
        message.stop()
        if message.path != self.path:
            return
        if message.reset:
            self.lines.clear()
            self.query_one("#log-lines", Log).clear()
        self.lines.extend(message.lines)
        wanted = self._filter()
        self.query_one("#log-lines", Log).write_lines(
            [line for line in message.lines if wanted in line]
        )
        self._show_status()

    # ----------------------------------------------------------------- showing
    def _filter(self) -> str:
        return self.query_one("#log-filter", Input).value

    def _redraw(self) -> None:
        log = self.query_one("#log-lines", Log)
        log.clear()
        wanted = self._filter()
        log.write_lines([line for line in self.lines if wanted in line])
        self._show_status()

    def _show_status(self) -> None:
        if self.path is None:
            return
        wanted = self._filter()
        shown = sum(wanted in line for line in self.lines) if wanted else len(self.lines)
        follow = "following (f stops)" if self.follow else "[$warning]paused[/] (f follows)"
        where = markup_escape(_shown_path(self.path)) + ("" if self.path.exists() else " (not yet)")
        matching = f', {shown} matching "{markup_escape(wanted)}"' if wanted else ""
        self.query_one("#log-status", Static).update(
            f"{where} · {len(self.lines)} lines{matching} · {follow}"
        )


def _shown_path(path: Path) -> str:
    """``path``, relative to the state directory when it lies there (short, and the same on
    every host)."""
    try:
        return f"{path.relative_to(state_dir())} in the state dir"
    except ValueError:
        return str(path)
