"""The dashboard's text field: an ``Input`` that leaves the tab keys (Alt+1-6) to the app."""

from __future__ import annotations

from textual.widgets import Input

ALT_DIGIT_KEYS = (
    "inverted_exclamation_mark",
    "trade_mark_sign",
    "pound_sign",
    "cent_sign",
    "infinity",
    "section_sign",
)
"""What Alt+1-6 arrive as where the terminal sends ESC + digit (xterm, tmux, GNOME Terminal):
Textual reads ESC 1 as "¡" (macOS Option+1), ESC 2 as "™", ESC 3 as "£", ESC 4 as "¢", ESC 5
as "∞", ESC 6 as "§". Only terminals with the kitty keyboard protocol report "alt+1"."""


class Field(Input):
    """An ``Input`` that does not take the keys Alt+1-6 arrive as, so that the app's tab
    bindings see them (Textual hides a binding from the chain when the focused ``Input`` would
    insert its character, priority or not)."""

    def check_consume_key(self, key: str, character: str | None = None) -> bool:
        return key not in ALT_DIGIT_KEYS and super().check_consume_key(key, character)
