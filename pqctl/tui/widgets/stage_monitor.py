"""One running stage: its state, and measured prefill/decode tokens/s beside the plan's."""

from __future__ import annotations

from collections import deque
from typing import Any

from textual.widgets import Static

from planner.plan import Stage
from pqctl.tui.widgets.figures import human_bytes, human_rate, markup_escape, spark

HISTORY = 60
SPARK_WIDTH = 24
STATE_COLOURS = {"ready": "$success", "failed": "$error", "loading": "$warning"}


class StageMonitor(Static):
    """Stage header, then one line per phase: a sparkline of measured tokens/s (per busy
    second, the figure the plan predicts), the latest value and the prediction."""

    DEFAULT_CSS = """
    StageMonitor { height: auto; border-left: outer $primary; padding: 0 1; margin-bottom: 1; }
    StageMonitor.-failed { border-left: outer $error; }
    StageMonitor.-bottleneck { border-left: outer $warning; }
    """

    def __init__(self, index: int, stage: Stage, predicted: tuple[float, float]) -> None:
        super().__init__(classes=f"stage-{index}")
        self.index, self.stage = index, stage
        self.predicted_prefill, self.predicted_decode = predicted
        self.prefill: deque[float | None] = deque(maxlen=HISTORY)
        self.decode: deque[float | None] = deque(maxlen=HISTORY)
        self.times: deque[float] = deque(maxlen=HISTORY)  # each reading's time stamp, s
        self.state = "starting"
        self.error: str | None = None
        self.metrics: dict[str, Any] = {}
        self.last_time: float | None = None
        self.resident_bytes: int | None = None
        self.restarts = 0
        self.loaded: tuple[int, int] | None = None

    def on_mount(self) -> None:
        self._render_lines()

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """A metrics message; only a new one (by its time stamp) extends the sparklines."""
        if metrics.get("time") == self.last_time:
            return
        self.last_time, self.metrics = metrics.get("time"), metrics
        self.times.append(float(metrics.get("time") or 0.0))
        self.prefill.append(metrics.get("prefill", {}).get("busy_tokens_per_s"))
        self.decode.append(metrics.get("decode", {}).get("busy_tokens_per_s"))
        self._render_lines()

    def set_state(
        self,
        state: str,
        error: str | None = None,
        resident_bytes: int | None = None,
        restarts: int = 0,
        loaded: tuple[int, int] | None = None,
    ) -> None:
        """The gateway's view of the stage: its state, last error, its memory so far (while
        loading), how often it was restarted and, while loading, (parts loaded, parts)."""
        new = (state, error, resident_bytes, restarts, loaded)
        if new != (self.state, self.error, self.resident_bytes, self.restarts, self.loaded):
            self.state, self.error, self.resident_bytes, self.restarts, self.loaded = new
            self.set_class(state == "failed", "-failed")
            self._render_lines()

    @property
    def measured(self) -> tuple[float | None, float | None]:
        """The latest measured (prefill, decode) tokens per busy second."""
        return (self._last(self.prefill), self._last(self.decode))

    @staticmethod
    def _last(values: deque[float | None]) -> float | None:
        return next((v for v in reversed(values) if v is not None), None)

    def _phase_line(self, name: str, values: deque[float | None], predicted: float) -> str:
        top = max([predicted, *(v for v in values if v is not None)])
        last = self._last(values)
        ratio = f" ({last / predicted:.0%})" if last is not None and predicted > 0 else ""
        return (
            f"{name:<7} [$primary]{spark(list(values), SPARK_WIDTH, top)}[/] "
            f"[b]{human_rate(last):>6}[/] tok/s  [$text-muted]pred {human_rate(predicted)}"
            f"{ratio}[/]"
        )

    def _state_text(self) -> str:
        if self.state == "loading" and self.loaded is not None:
            return f"loading {self.loaded[0]}/{self.loaded[1]}"
        return self.state

    def _render_lines(self) -> None:
        s, r, m = self.stage, self.stage.layer_range, self.metrics
        colour = STATE_COLOURS.get(self.state, "$text-muted")
        queue = m.get("queue_depth", "–")
        busy = f"{100 * m['busy']:.0f}%" if "busy" in m else "–"
        memory = m.get("rss_bytes") or self.resident_bytes
        head = (
            f"[b]{self.index}[/]  {markup_escape(s.device.key)}  layers {r.start}–{r.stop - 1}  "
            f"[{colour}]{markup_escape(self._state_text())}[/]  mem {human_bytes(memory)}  "
            f"queue {queue}  busy {busy}"
            + (f"  [$warning]restarted {self.restarts}×[/]" if self.restarts else "")
        )
        lines = [
            head,
            self._phase_line("prefill", self.prefill, self.predicted_prefill),
            self._phase_line("decode", self.decode, self.predicted_decode),
        ]
        if self.error:
            lines.append(f"[$error]{markup_escape(self.error)}[/]")
        self.update("\n".join(lines))
