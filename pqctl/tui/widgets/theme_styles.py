"""Rich styles from the current theme's variables, for text built outside Textual markup
(``DataTable`` cells)."""

from __future__ import annotations

from rich.style import Style
from textual.app import App
from textual.color import Color, ColorParseError


def theme_style(app: App[object], variable: str, **attributes: bool) -> Style:
    """The theme's ``$variable`` as a foreground style (plain when it is not a colour)."""
    value = app.theme_variables.get(variable, "")
    try:
        color = Color.parse(value)
    except ColorParseError:
        return Style(**attributes)  # type: ignore[arg-type]
    return Style(color=color.rich_color, **attributes)  # type: ignore[arg-type]
