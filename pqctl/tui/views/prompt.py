"""Prompt view: send prompts with sampling options to the dashboard's deployment and watch the
tokens stream. Several at once (prompts separated by ``||``, each sent ``×`` times) go out
together on one connection, so the server batches them and the Serve tab shows it. The client
(``runtime.serve.client.Client``, blocking pyzmq) runs in a thread worker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Input, Label, Static
from textual.worker import get_current_worker

from pqctl.tui.messages import GenerationEnded, TokensArrived
from pqctl.tui.widgets.field import Field
from pqctl.tui.widgets.figures import count, markup_escape
from runtime.serve.client import Client, ServerError

REPLY_TIMEOUT_S = 60.0
SEPARATOR = "||"
"""Separates prompts typed in the one field."""
MAX_REQUESTS = 64
OPTION_FIELDS = (  # input id, label, width, default, kind
    ("copies", "×", 3, "1", int),
    ("max-new-tokens", "max new", 5, "32", int),
    ("temperature", "temp", 5, "0", float),
    ("top-k", "top-k", 4, "0", int),
    ("top-p", "top-p", 5, "1", float),
    ("seed", "seed", 6, "", int),
)


@dataclass
class Output:
    """One request of a send: its prompt, the text so far, and how it ended."""

    prompt: str
    generated: str = ""
    ended: bool = False
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class PromptView(Vertical):
    """Enter sends the prompts; Esc cancels the requests in flight."""

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
        self.outputs: list[Output] = []
        self.started = 0.0

    def compose(self) -> ComposeResult:
        yield Field(
            placeholder=f"a prompt, e.g. ROMEO:  ({SEPARATOR} separates prompts; Enter sends)",
            id="prompt-text",
        )
        with Horizontal(id="prompt-options"):
            for name, label, width, default, _kind in OPTION_FIELDS:
                yield Label(label)
                box = Field(default, id=name, compact=True, type="number", placeholder="–")
                box.styles.width = width
                yield box
        yield Static("", id="prompt-target")
        with VerticalScroll(id="prompt-output"):
            yield Static("", id="completion")
        yield Static("", id="prompt-usage")

    def on_mount(self) -> None:
        self.set_endpoint(None)

    @property
    def running(self) -> bool:
        return any(not o.ended for o in self.outputs)

    @property
    def generated(self) -> str:
        """The text generated so far for the first prompt."""
        return self.outputs[0].generated if self.outputs else ""

    def set_endpoint(self, endpoint: str | None, name: str = "", max_new_tokens: int = 0) -> None:
        """Where prompts go (None: no deployment is serving), and the plan's token limit."""
        self.endpoint = endpoint
        if max_new_tokens:
            box = self.query_one("#max-new-tokens", Input)
            current = int(box.value) if box.value.isdigit() else max_new_tokens
            box.value = str(min(max_new_tokens, current))
        self.query_one("#prompt-target", Static).update(
            f"sends to [b]{markup_escape(name)}[/] at {markup_escape(endpoint)} · "
            f"{SEPARATOR} separates prompts, × sends each several times at once · Esc cancels"
            if endpoint
            else "no deployment is serving: launch one on the Serve tab (l)"
        )

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for name, _label, _width, _default, kind in OPTION_FIELDS:
            text = self.query_one(f"#{name}", Input).value.strip()
            if not text:
                continue
            try:
                options[name.replace("-", "_")] = kind(text)
            except ValueError:
                raise ValueError(f"{name}: {text!r} is not a number") from None
        return options

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.send()

    def send(self) -> None:
        text = self.query_one("#prompt-text", Input).value
        prompts = [p.strip() for p in text.split(SEPARATOR) if p.strip()]
        if not prompts:
            self._usage("[$warning]type a prompt first[/]")
            return
        if self.endpoint is None:
            self._usage("[$warning]no deployment is serving: launch one on the Serve tab[/]")
            return
        if self.running:
            self._usage("[$warning]requests are running: Esc cancels them[/]")
            return
        try:
            options = self._options()
        except ValueError as exc:
            self._usage(f"[$error]{markup_escape(str(exc))}[/]")
            return
        copies = max(1, int(options.pop("copies", 1)))
        prompts = [p for p in prompts for _ in range(copies)]
        if len(prompts) > MAX_REQUESTS:
            self._usage(f"[$warning]at most {MAX_REQUESTS} requests at once[/]")
            return
        self.request_number += 1
        self.outputs = [Output(p) for p in prompts]
        self.started = time.monotonic()
        self._show_completion()
        self._usage(f"generating {count(len(prompts), 'request')}…")
        self.generate(self.request_number, self.endpoint, prompts, options)

    def action_cancel(self) -> None:
        if self.running:
            self.workers.cancel_group(self, "generate")
            self._usage("cancelling…")

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(
        self, number: int, endpoint: str, prompts: list[str], options: dict[str, Any]
    ) -> None:
        """Send every prompt at once and stream them; on cancel, ask the server to end them."""
        worker = get_current_worker()
        max_new = int(options.pop("max_new_tokens", 32))
        try:
            with Client(endpoint, timeout_s=REPLY_TIMEOUT_S) as client:
                pending = {
                    client.submit(p, max_new_tokens=max_new, stream=True, **options): k
                    for k, p in enumerate(prompts)
                }
                self._relay(number, client, pending, worker)
        except Exception as exc:  # reported in the view; the dashboard keeps running
            for k in range(len(prompts)):
                self.post_message(GenerationEnded(number, error=f"{exc}", index=k))

    def _relay(self, number: int, client: Client, pending: dict[str, int], worker: Any) -> None:
        """Post each reply of the requests ``pending`` (id -> prompt index) until all ended."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        cancel_sent = False
        while pending and time.monotonic() < deadline:
            if worker.is_cancelled and not cancel_sent:
                for request_id in pending:
                    client.cancel(request_id)
                cancel_sent = True
                deadline = min(deadline, time.monotonic() + 5.0)
            try:
                message = client.receive(0.1)
            except TimeoutError:
                continue
            index = pending.get(str(message.get("id")))
            if index is None:
                continue
            kind = message.get("type")
            if kind == "token":
                deadline = time.monotonic() + REPLY_TIMEOUT_S
                self.post_message(TokensArrived(number, str(message.get("text", "")), index))
            elif kind == "done":
                usage = dict(message.get("usage", {}))
                reason = str(message.get("finish_reason", ""))
                self.post_message(GenerationEnded(number, reason, usage, index=index))
                del pending[str(message.get("id"))]
            elif kind == "error":
                error = ServerError(str(message.get("code")), str(message.get("message")))
                self.post_message(GenerationEnded(number, error=str(error), index=index))
                del pending[str(message.get("id"))]
        for index in pending.values():
            silent = f"no reply in {REPLY_TIMEOUT_S:.0f} s"
            self.post_message(GenerationEnded(number, error=silent, index=index))

    def on_tokens_arrived(self, message: TokensArrived) -> None:
        message.stop()
        if message.request == self.request_number and message.index < len(self.outputs):
            self.outputs[message.index].generated += message.text
            self._show_completion()

    def on_generation_ended(self, message: GenerationEnded) -> None:
        message.stop()
        if message.request != self.request_number or message.index >= len(self.outputs):
            return
        output = self.outputs[message.index]
        output.ended, output.error = True, message.error
        output.finish_reason, output.usage = message.finish_reason, message.usage
        self._show_completion()
        if not self.running:
            self._show_usage()

    def _show_usage(self) -> None:
        if len(self.outputs) == 1:
            o, u = self.outputs[0], self.outputs[0].usage
            if o.error:
                self._usage(f"[$error]{markup_escape(o.error)}[/]")
                return
            self._usage(
                f"{markup_escape(o.finish_reason)} · {u.get('completion_tokens', '?')} tokens · "
                f"first token {u.get('first_token_s', 0):.2f} s · total "
                f"{u.get('total_s', 0):.2f} s · seed {u.get('seed', '?')}"
            )
            return
        failed = sum(bool(o.error) for o in self.outputs)
        tokens = sum(int(o.usage.get("completion_tokens", 0)) for o in self.outputs)
        firsts = [
            float(o.usage["first_token_s"]) for o in self.outputs if "first_token_s" in o.usage
        ]
        totals = [float(o.usage["total_s"]) for o in self.outputs if "total_s" in o.usage]
        elapsed = max(totals or [time.monotonic() - self.started, 1e-9])  # all ran at once
        first = f"first token {min(firsts):.2f}–{max(firsts):.2f} s · " if firsts else ""
        self._usage(
            f"{count(len(self.outputs), 'request')} at once"
            + (f" ([$error]{failed} failed[/])" if failed else "")
            + f" · {tokens} tokens in {elapsed:.2f} s · {first}{tokens / elapsed:,.1f} tokens/s "
            "together (the server batches them: see the Serve tab)"
        )

    def _show_completion(self) -> None:
        """Every request's prompt (bold) and text as plain ``Content``: nothing in them is read
        as markup, so "[Exit]" stays."""
        parts: list[Content | tuple[str, str] | str] = []
        several = len(self.outputs) > 1
        for k, o in enumerate(self.outputs):
            if several:
                parts.append((f"{'' if k == 0 else chr(10) * 2}#{k + 1} ", "dim"))
            parts += [(o.prompt, "bold"), o.generated]
            if several and o.ended:
                parts.append((f"  ({_ending(o)})", "dim"))
        self.query_one("#completion", Static).update(Content.assemble(*parts))
        self.query_one("#prompt-output", VerticalScroll).scroll_end(animate=False)

    def _usage(self, markup: str) -> None:
        self.query_one("#prompt-usage", Static).update(markup)


def _ending(output: Output) -> str:
    """How one request of several ended, in a few words."""
    if output.error:
        return output.error
    u = output.usage
    return (
        f"{output.finish_reason}, {u.get('completion_tokens', '?')} tokens, first "
        f"{u.get('first_token_s', 0):.2f} s"
    )
