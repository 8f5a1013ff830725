"""One pipeline stage of a plan: device, layers, the precision strip, predicted times, memory."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from planner.plan import Stage
from pqctl.tui.widgets.bits_strip import BitsStrip
from pqctl.tui.widgets.figures import GIB, human_seconds, markup_escape


def markup_bar(fraction: float, width: int) -> str:
    """A memory bar in Textual markup: success below 75 %, warning to 90 %, error above."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    color = "$success" if fraction < 0.75 else "$warning" if fraction < 0.9 else "$error"
    return f"[{color}]{'█' * filled}[/][$foreground 25%]{'░' * (width - filled)}[/]"


def precision_counts(layer_bits: tuple[int, ...]) -> str:
    """``"16×3 4×5"``."""
    counts = {b: layer_bits.count(b) for b in sorted(set(layer_bits), reverse=True)}
    return " ".join(f"{b}×{n}" for b, n in counts.items())


class StageCard(Vertical):
    """A stage of the plan; the bottleneck stage gets the ``-bottleneck`` class."""

    DEFAULT_CSS = """
    StageCard {
        height: auto;
        border-left: outer $primary;
        padding: 0 1;
        margin-bottom: 1;
    }
    StageCard.-bottleneck { border-left: outer $warning; background: $warning 10%; }
    StageCard .stage-head { text-style: bold; }
    """

    def __init__(self, index: int, stage: Stage, bottleneck: str = "") -> None:
        super().__init__(classes=f"stage-{index}")
        self.index, self.stage, self.bottleneck = index, stage, bottleneck
        self.set_class(bool(bottleneck), "-bottleneck")

    def compose(self) -> ComposeResult:
        s, r = self.stage, self.stage.layer_range
        ends = " +embedding" * s.holds_embedding + " +LM head" * s.holds_lm_head
        badge = f"  [b $warning]◀ {self.bottleneck} bottleneck[/]" if self.bottleneck else ""
        yield Static(
            f"{self.index}  {markup_escape(s.device.key)}  "
            f"[$text-muted]{markup_escape(s.device.device_type)}[/]  "
            f"layers {r.start}–{r.stop - 1} ({len(r)}){ends}{badge}",
            classes="stage-head",
        )
        yield BitsStrip(s.layer_bits)
        p = s.predicted
        fraction = p.memory_bytes / p.memory_capacity_bytes if p.memory_capacity_bytes else 1.0
        yield Static(
            f"prefill {human_seconds(p.prefill_s)}  decode {human_seconds(p.decode_s)}  "
            f"{markup_bar(fraction, 12)} {p.memory_bytes / GIB:,.1f}/"
            f"{p.memory_capacity_bytes / GIB:,.1f} GiB  [$text-muted]"
            f"{precision_counts(s.layer_bits)}[/]",
            classes="stage-figures",
        )
