"""Requests view: every running, waiting and recently finished request of the deployment shown,
from its gateway's status (``request_list``, twice a second): id, client connection, state,
prompt and generated tokens, time to first token and decode tokens/s. ``c`` cancels the
highlighted request through the gateway's control socket (``runtime.serve.operator``): its
client gets the ``done`` reply with ``finish_reason`` ``cancelled``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from pqctl.tui.widgets.figures import markup_escape
from runtime.serve.deployment import DeploymentState
from runtime.serve.operator import OperatorError, cancel_request

COLUMNS = ("id", "client", "state", "prompt", "generated", "TTFT", "tok/s", "age")
CANCELLABLE = ("waiting", "running")


class RequestsView(Vertical):
    """A table of the deployment's requests; ``c`` cancels the highlighted one."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("c", "cancel_request", "Cancel request")]
    DEFAULT_CSS = """
    RequestsView #requests-status { height: 1; padding: 0 1; color: $text-muted; }
    RequestsView #request-table { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.state: DeploymentState | None = None
        self.rows: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Static(
            "no deployment yet: its requests show here once one is launched or attached",
            id="requests-status",
        )
        table: DataTable[str] = DataTable(id="request-table", cursor_type="row", zebra_stripes=True)
        yield table

    def on_mount(self) -> None:
        self.query_one("#request-table", DataTable).add_columns(*COLUMNS)

    def watch_deployment(self, state: DeploymentState | None) -> None:
        """Show ``state``'s requests from now on (None: no deployment)."""
        self.state = state
        if state is None:
            self.show_rows([])

    def show_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replace the table with ``rows`` (the status's ``request_list``), keeping the cursor
        on the same request where it is still listed."""
        table: DataTable[str] = self.query_one("#request-table", DataTable)
        highlighted = self.highlighted()
        self.rows = [r for r in rows if isinstance(r, dict)]
        table.clear()
        for row in self.rows:
            table.add_row(*_cells(row), key=_key(row))
        if highlighted is not None:
            keys = [_key(r) for r in self.rows]
            if _key(highlighted) in keys:
                table.move_cursor(row=keys.index(_key(highlighted)), animate=False)
        running = sum(r.get("state") == "running" for r in self.rows)
        waiting = sum(r.get("state") == "waiting" for r in self.rows)
        name = self.state.name if self.state else "-"
        self.query_one("#requests-status", Static).update(
            f"{markup_escape(name)}: {running} running, {waiting} waiting, "
            f"{len(self.rows) - running - waiting} recent · c cancels the highlighted request"
        )

    def highlighted(self) -> dict[str, Any] | None:
        table: DataTable[str] = self.query_one("#request-table", DataTable)
        if not self.rows or not 0 <= table.cursor_row < len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def action_cancel_request(self) -> None:
        row = self.highlighted()
        if row is None or self.state is None:
            self.app.bell()
            return
        if row.get("state") not in CANCELLABLE:
            self.app.notify(f"request {row.get('id')} has already finished", severity="warning")
            return
        self.cancel(self.state, str(row.get("client")), str(row.get("id")))

    @work(thread=True, group="cancel")
    def cancel(self, state: DeploymentState, client: str, request_id: str) -> None:
        """Send the cancel off the UI loop (delivering it may take a moment)."""
        try:
            cancel_request(state, client, request_id)
        except OperatorError as exc:
            self.app.call_from_thread(self.app.notify, str(exc), severity="error")
            return
        self.app.call_from_thread(self.app.notify, f"cancelling request {request_id}")


def _key(row: dict[str, Any]) -> str:
    return f"{row.get('client')}/{row.get('id')}"


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    ttft, rate, age = row.get("ttft_s"), row.get("tokens_per_s"), row.get("age_s")
    return (
        str(row.get("id")),
        str(row.get("client")),
        str(row.get("state")),
        str(row.get("prompt_tokens")),
        f"{row.get('generated_tokens')}/{row.get('max_new_tokens')}",
        "-" if not isinstance(ttft, int | float) else f"{1000 * ttft:.0f} ms",
        "-" if not isinstance(rate, int | float) else f"{rate:.1f}",
        "-" if not isinstance(age, int | float) else f"{age:.0f} s",
    )
