"""A per-layer precision strip: one cell per decoder layer, coloured by its bit width."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.widget import Widget

BIT_CLASSES = {16: "b16", 8: "b8", 4: "b4", 3: "b3", 2: "b2"}


class BitsStrip(Widget):
    """``layer_bits`` as coloured cells (16 bits: success, 8: primary, 4: accent, 3: warning,
    2: error), wrapping when there are more layers than columns."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {f"bits-strip--{name}" for name in BIT_CLASSES.values()}
    DEFAULT_CSS = """
    BitsStrip { height: auto; width: 1fr; }
    BitsStrip > .bits-strip--b16 { color: $success; }
    BitsStrip > .bits-strip--b8 { color: $primary; }
    BitsStrip > .bits-strip--b4 { color: $accent; }
    BitsStrip > .bits-strip--b3 { color: $warning; }
    BitsStrip > .bits-strip--b2 { color: $error; }
    """

    def __init__(self, layer_bits: Sequence[int] = (), cell: str = "█", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.layer_bits = tuple(layer_bits)
        self.cell = cell

    def set_bits(self, layer_bits: Sequence[int]) -> None:
        self.layer_bits = tuple(layer_bits)
        self.refresh(layout=True)

    def render(self) -> Text:
        text = Text(no_wrap=False, overflow="fold")
        for bits in self.layer_bits:
            name = BIT_CLASSES.get(bits, "b16")
            text.append(self.cell, style=self.get_component_rich_style(f"bits-strip--{name}"))
        return text


class BitsLegend(BitsStrip):
    """``■16 ■8 ■4 ■3 ■2``: the strip's colour key."""

    DEFAULT_CSS = "BitsLegend { width: auto; }"

    def render(self) -> Text:
        text = Text(no_wrap=True)
        for bits, name in BIT_CLASSES.items():
            text.append("■", style=self.get_component_rich_style(f"bits-strip--{name}"))
            text.append(f"{bits} ")
        return text
