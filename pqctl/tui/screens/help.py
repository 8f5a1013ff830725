"""The help screen: what each tab does and its keys."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# pqctl dashboard

Plan and serve a language model on a heterogeneous cluster. Tabs: **1** Cluster, **2** Plan,
**3** Serve, **4** Prompt, **5** Logs, **6** Requests (or click them). **Alt+1**…**Alt+6** and
**Ctrl+PgUp**/**Ctrl+PgDn** switch tabs from anywhere, text fields included; the plain number
keys outside a text field. **Ctrl+P** opens the command palette (every action below, and
**Theme** to change and remember the theme). **?** or **F1** shows this help, **Ctrl+Q** quits
(stopping the deployment the dashboard launched). **Esc** cancels what runs (a solve, a
generation), else leaves the text field.

## Cluster
Every host and device: type, memory used/total, utilisation and memory sparklines (this host's
devices, every second, from NVML or /proc; other hosts show N/A), the precisions each device
can run, and whether its latency figures come from a profile or the datasheet.
**x** excludes the selected device from planning (again: include it); the plan is re-solved.

## Plan
Model, batch, prompt length, new tokens and the quality target: a maximum perplexity increase
such as **1%** (where the model has calibration: pqctl calibrate; the built-in model ships it)
or a Σω budget such as **0.05** (the normalised ω indicator: 0 = every layer at 16 bits, 1 =
every layer at 2 bits). Empty fields take the defaults shown. **Enter** in any field or
**F5** solves (in the background: the interface never blocks); **Esc** cancels (the search
stops at once). **PgUp**/**PgDn** scroll the result. The result shows
each stage (device, layers, a strip of per-layer precision: 16 8 4 3 2 bits, predicted prefill
and decode time per micro-batch, memory), the bottleneck stage highlighted, and the baselines.
**Ctrl+S** saves the plan to a file, **Ctrl+O** loads one.

## Serve
**l** launches the plan on this host (one process per stage and a gateway on a free loopback
port; over Ray when the dashboard runs with --ray; a plan with stages on other hosts needs
--ray), shows each stage loading, then its measured prefill and decode tokens/s (per busy
second) beside the plan's prediction, queue depth, memory and errors, and a chart of their
history against the prediction (**c**: decode, prefill, none). The event log below records
launches, stage crashes and restarts. **s** stops it.

## Prompt
Type a prompt and press **Enter**; tokens stream in. Several prompts separated by **||** go
out at once, each **×** times (the server batches them). Options: max new tokens,
temperature (0 = greedy), top-k, top-p, seed. **Esc** cancels.

## Logs
The gateway's log and each stage's, of the deployment shown: the last lines, followed as they
grow (**f** pauses or follows again). Type in the filter field to keep the lines containing
that text; pick the log in the list beside it.

## Requests
Every running, waiting and recently finished request of the deployment shown, from any client
(ZeroMQ or HTTP): id, client connection, state, prompt and generated tokens, time to first
token, decode tokens/s, age. **c** cancels the highlighted request (its client gets a
`cancelled` reply).
"""


class HelpScreen(ModalScreen[None]):
    """Help over the dashboard; Esc, q or ? closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("q", "dismiss", "Close", show=False),
        Binding("question_mark", "dismiss", "Close", show=False),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)
