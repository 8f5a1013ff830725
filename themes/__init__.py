"""Textual themes of the pqctl dashboard: the built-in ones and user theme files.

``BUILTIN_THEMES`` holds dark, light and high-contrast; :func:`load_theme_dir` reads user
theme files (TOML, docs/themes.md) and reports broken ones instead of raising.
"""

from themes.builtin import BUILTIN_THEMES, DEFAULT_THEME, THEME_ALIASES
from themes.loader import ThemeFileError, ThemeLoad, load_theme_dir, load_theme_file

__all__ = [
    "BUILTIN_THEMES",
    "DEFAULT_THEME",
    "THEME_ALIASES",
    "ThemeFileError",
    "ThemeLoad",
    "load_theme_dir",
    "load_theme_file",
]
