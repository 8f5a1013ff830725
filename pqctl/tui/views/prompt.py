"""Prompt view: send a prompt with sampling options to the dashboard's deployment and watch the
tokens stream. The client (``runtime.serve.client.Client``, blocking pyzmq) runs in a thread
worker."""

from __future__ import annotations

import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.widgets import Input, Label, Static
from textual.worker import get_current_worker

from pqctl.tui.messages import GenerationEnded, TokensArrived
from runtime.serve.client import Client, ServerError

REPLY_TIMEOUT_S = 60.0
OPTION_FIELDS = (  # input id, label, width, default, kind
    ("max-new-tokens", "max new", 5, "32", int),
    ("temperature", "temp", 5, "0", float),
    ("top-k", "top-k", 4, "0", int),
    ("top-p", "top-p", 5, "1", float),
    ("seed", "seed", 6, "", int),
)


class PromptView(Vertical):
    """Enter sends the prompt; Esc cancels the request in flight."""

    DEFAULT_CSS = """
    PromptView #prompt-text { margin: 0 1; }
    PromptView #prompt-options { height: 1; padding: 0 1; margin-top: 1; }
    PromptView #prompt-options Label { padding: 0 1; }
    PromptView #prompt-target { height: auto; padding: 0 1; color: $text-muted; }
    PromptView #prompt-output { height: 1fr; border: round $panel; padding: 0 1; }
    PromptView #prompt-usage { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.endpoint: str | None = None
        self.request_number = 0
        self.running = False
        self.prompt_text = ""
        self.generated = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="a prompt, e.g. ROMEO:  (Enter sends)", id="prompt-text")
        with Horizontal(id="prompt-options"):
            for field, label, width, default, _kind in OPTION_FIELDS:
                yield Label(label)
                box = Input(default, id=field, compact=True, type="number", placeholder="–")
                box.styles.width = width
                yield box
        yield Static("", id="prompt-target")
        with VerticalScroll(id="prompt-output"):
            yield Static("", id="completion")
        yield Static("", id="prompt-usage")

    def on_mount(self) -> None:
        self.set_endpoint(None)

    def set_endpoint(self, endpoint: str | None, name: str = "", max_new_tokens: int = 0) -> None:
        """Where prompts go (None: no deployment is serving), and the plan's token limit."""
        self.endpoint = endpoint
        if max_new_tokens:
            box = self.query_one("#max-new-tokens", Input)
            current = int(box.value) if box.value.isdigit() else max_new_tokens
            box.value = str(min(max_new_tokens, current))
        self.query_one("#prompt-target", Static).update(
            f"sends to [b]{escape(name)}[/] at {escape(endpoint)} · Esc cancels"
            if endpoint
            else "no deployment is serving: launch one on the Serve tab (l)"
        )

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for field, _label, _width, _default, kind in OPTION_FIELDS:
            text = self.query_one(f"#{field}", Input).value.strip()
            if not text:
                continue
            try:
                options[field.replace("-", "_")] = kind(text)
            except ValueError:
                raise ValueError(f"{field}: {text!r} is not a number") from None
        return options

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.send()

    def send(self) -> None:
        prompt = self.query_one("#prompt-text", Input).value
        if not prompt.strip():
            self._usage("[$warning]type a prompt first[/]")
            return
        if self.endpoint is None:
            self._usage("[$warning]no deployment is serving: launch one on the Serve tab[/]")
            return
        if self.running:
            self._usage("[$warning]a request is running: Esc cancels it[/]")
            return
        try:
            options = self._options()
        except ValueError as exc:
            self._usage(f"[$error]{escape(str(exc))}[/]")
            return
        self.request_number += 1
        self.running = True
        self.prompt_text, self.generated = prompt, ""
        self._show_completion()
        self._usage("generating…")
        self.generate(self.request_number, self.endpoint, prompt, options)

    def action_cancel(self) -> None:
        if self.running:
            self.workers.cancel_group(self, "generate")
            self._usage("cancelling…")

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, number: int, endpoint: str, prompt: str, options: dict[str, Any]) -> None:
        """Stream one request; on cancel, ask the server to end it and wait for its end."""
        worker = get_current_worker()
        max_new = int(options.pop("max_new_tokens", 32))
        try:
            with Client(endpoint, timeout_s=REPLY_TIMEOUT_S) as client:
                request_id = client.submit(prompt, max_new_tokens=max_new, stream=True, **options)
                self._relay(number, client, request_id, worker)
        except Exception as exc:  # reported in the view; the dashboard keeps running
            self.post_message(GenerationEnded(number, error=f"{exc}"))

    def _relay(self, number: int, client: Client, request_id: str, worker: Any) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        cancel_sent = False
        while time.monotonic() < deadline:
            if worker.is_cancelled and not cancel_sent:
                client.cancel(request_id)
                cancel_sent = True
                deadline = min(deadline, time.monotonic() + 5.0)
            try:
                message = client.receive(0.1)
            except TimeoutError:
                continue
            if message.get("id") != request_id:
                continue
            kind = message.get("type")
            if kind == "token":
                deadline = time.monotonic() + REPLY_TIMEOUT_S
                self.post_message(TokensArrived(number, str(message.get("text", ""))))
            elif kind == "done":
                usage = dict(message.get("usage", {}))
                self.post_message(GenerationEnded(number, str(message["finish_reason"]), usage))
                return
            elif kind == "error":
                error = ServerError(str(message.get("code")), str(message.get("message")))
                self.post_message(GenerationEnded(number, error=str(error)))
                return
        self.post_message(GenerationEnded(number, error=f"no reply in {REPLY_TIMEOUT_S:.0f} s"))

    def on_tokens_arrived(self, message: TokensArrived) -> None:
        message.stop()
        if message.request == self.request_number:
            self.generated += message.text
            self._show_completion()

    def on_generation_ended(self, message: GenerationEnded) -> None:
        message.stop()
        if message.request != self.request_number:
            return
        self.running = False
        if message.error:
            self._usage(f"[$error]{escape(message.error)}[/]")
            return
        u = message.usage
        self._usage(
            f"{escape(message.finish_reason)} · {u.get('completion_tokens', '?')} tokens · "
            f"first token {u.get('first_token_s', 0):.2f} s · total {u.get('total_s', 0):.2f} s"
            f" · seed {u.get('seed', '?')}"
        )

    def _show_completion(self) -> None:
        self.query_one("#completion", Static).update(
            f"[b]{escape(self.prompt_text)}[/]{escape(self.generated)}"
        )
        self.query_one("#prompt-output", VerticalScroll).scroll_end(animate=False)

    def _usage(self, markup: str) -> None:
        self.query_one("#prompt-usage", Static).update(markup)
