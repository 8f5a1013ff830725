"""pqctl's own themes: dark, light and high-contrast.

Widgets colour everything through theme variables (``$primary``, ``$success``...); the
per-layer precision strip maps bit widths onto the semantic colours (16 bits ``$success``,
8 ``$primary``, 4 ``$accent``, 3 ``$warning``, 2 ``$error``), so every theme must keep those five
distinguishable. docs/themes.md describes the file format for user themes.
"""

from __future__ import annotations

from textual.theme import Theme

PQCTL_DARK = Theme(
    name="pqctl-dark",
    primary="#4EA1F3",
    secondary="#9A8CF8",
    accent="#F5A623",
    warning="#F2C94C",
    error="#EB5757",
    success="#6FCF97",
    foreground="#E6E8EB",
    background="#0F1419",
    surface="#161C23",
    panel="#1F2731",
    dark=True,
)

PQCTL_LIGHT = Theme(
    name="pqctl-light",
    primary="#0B63C5",
    secondary="#6B4FD8",
    accent="#B85C00",
    warning="#8A5A00",
    error="#C62828",
    success="#1B7F3B",
    foreground="#1B1F24",
    background="#F7F8FA",
    surface="#FFFFFF",
    panel="#E3E8EE",
    dark=False,
)

PQCTL_HIGH_CONTRAST = Theme(
    name="pqctl-high-contrast",
    primary="#00E5FF",
    secondary="#FF6BFF",
    accent="#FFD400",
    warning="#FF9F00",
    error="#FF4040",
    success="#00FF66",
    foreground="#FFFFFF",
    background="#000000",
    surface="#000000",
    panel="#202020",
    boost="#FFFFFF",
    dark=True,
    luminosity_spread=0.3,
    text_alpha=1.0,
    variables={
        "footer-key-foreground": "#FFD400",
        "block-cursor-foreground": "#000000",
        "block-cursor-background": "#FFD400",
        "block-cursor-text-style": "bold",
        "border": "#FFFFFF",
        "border-blurred": "#A0A0A0",
    },
)

BUILTIN_THEMES: dict[str, Theme] = {
    theme.name: theme for theme in (PQCTL_DARK, PQCTL_LIGHT, PQCTL_HIGH_CONTRAST)
}
"""The shipped themes by name; the first is the default."""

DEFAULT_THEME = PQCTL_DARK.name

THEME_ALIASES: dict[str, str] = {
    "dark": PQCTL_DARK.name,
    "light": PQCTL_LIGHT.name,
    "high-contrast": PQCTL_HIGH_CONTRAST.name,
    "contrast": PQCTL_HIGH_CONTRAST.name,
}
"""Short names accepted by ``--theme``."""
