"""Text renderers for figures: units, sparklines and bars (plain functions, no widgets).

Sparklines and bars are rich ``Text`` so that they fit in a ``DataTable`` cell as well as in a
``Static``; colours come in as styles resolved from the theme by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.style import Style
from rich.text import Text

GIB = 1024**3
MIB = 1024**2
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
NOT_AVAILABLE = "N/A"


def count(n: int, noun: str) -> str:
    """``"1 stage"``, ``"3 stages"``: a number and its noun, plural unless it is one."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def markup_escape(text: str) -> str:
    """``text`` for Textual markup, shown as it is: every "[" escaped, so that "[Exit]" stays
    (Textual's own ``escape`` passes tags that start with a capital letter, which the markup
    then drops). A backslash right before a "[" is still read as an escape: text that may
    hold one (streamed tokens) goes into a ``Content`` instead of markup."""
    return text.replace("[", "\\[")


def human_bytes(value: float | None) -> str:
    """``"12.3G"``, ``"512M"``; N/A for None."""
    if value is None:
        return NOT_AVAILABLE
    if value >= GIB:
        return f"{value / GIB:,.1f}G"
    return f"{value / MIB:,.0f}M"


def human_rate(value: float | None) -> str:
    """Tokens per second: ``"845"``, ``"12.3k"``, ``"1.2M"``; "–" for None."""
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def human_seconds(value: float) -> str:
    """``"3.42 ms"``, ``"1.20 s"``."""
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.2f} ms"


def spark(values: Sequence[float | None], width: int, maximum: float | None = None) -> str:
    """The last ``width`` values as block characters scaled to ``maximum`` (default: their
    max); None is a blank, and the line is left-padded with blanks to ``width``."""
    recent = list(values)[-width:]
    known = [v for v in recent if v is not None]
    top = maximum if maximum is not None else max(known, default=0.0)
    chars = []
    for v in recent:
        if v is None:
            chars.append(" ")
        elif top <= 0:
            chars.append(SPARK_LEVELS[0])
        else:
            level = round(min(max(v / top, 0.0), 1.0) * (len(SPARK_LEVELS) - 1))
            chars.append(SPARK_LEVELS[level])
    return " " * (width - len(chars)) + "".join(chars)


def bar(fraction: float | None, width: int, full: Style, empty: Style) -> Text:
    """A horizontal bar ``width`` cells long, ``fraction`` (0-1) of it filled; dotted for
    None."""
    if fraction is None:
        return Text("·" * width, style=empty)
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return Text.assemble(("█" * filled, full), ("░" * (width - filled), empty))


def level_style(fraction: float | None, ok: Style, high: Style, critical: Style) -> Style:
    """The style of a usage figure: ok below 75 %, high to 90 %, critical above."""
    if fraction is None or fraction < 0.75:
        return ok
    return high if fraction < 0.9 else critical
