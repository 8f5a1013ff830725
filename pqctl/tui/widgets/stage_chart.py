"""History chart of one phase's tokens/s per stage, measured against the plan's prediction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual_plotext import PlotextPlot

PHASES = ("decode", "prefill")


@dataclass(frozen=True, slots=True)
class StageSeries:
    """One stage's history: seconds since the first reading, measured tokens per busy second
    (None: no reading), and the plan's prediction (tokens/s)."""

    label: str
    times_s: Sequence[float]
    measured: Sequence[float | None]
    predicted: float


class StageChart(PlotextPlot):
    """Measured tokens/s of each stage over time (a line each, dots for readings) and its
    predicted tokens/s (a dashed line in the same colour); axes in seconds and tokens/s."""

    DEFAULT_CSS = """
    StageChart { height: 1fr; min-height: 8; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.phase = PHASES[0]
        self.series: list[StageSeries] = []

    def show(self, phase: str, series: list[StageSeries]) -> None:
        """Draw ``series`` of ``phase`` ("prefill" or "decode")."""
        self.phase, self.series = phase, series
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"{phase} tokens/s per stage: measured (line), predicted (dashes)")
        plt.xlabel("seconds since the first reading")
        plt.ylabel("tokens/s")
        end = max((s.times_s[-1] for s in series if s.times_s), default=1.0)
        top = 0.0
        for colour, s in enumerate(series, 1):
            points = [(t, v) for t, v in zip(s.times_s, s.measured, strict=True) if v is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                plt.plot(list(xs), list(ys), color=colour)
                top = max(top, *ys)
            plt.plot(  # the legend names each stage once, by its prediction's colour
                [0.0, max(end, 1.0)], [s.predicted] * 2, label=s.label, color=colour, marker="-"
            )
            top = max(top, s.predicted)
        plt.ylim(0, 1.4 * top if top > 0 else 1.0)  # room above the lines for the legend
        self.refresh()
