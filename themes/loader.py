"""User theme files: one TOML file per theme, validated before Textual ever sees it.

A bad colour is accepted by ``Theme(...)`` and ``App.register_theme`` and only crashes the app
when the theme is applied, so every field is checked here. A broken file is reported
(file and field) and skipped; loading a directory never raises. The format is in
docs/themes.md.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

COLOR_FIELDS = (
    "primary",
    "secondary",
    "warning",
    "error",
    "success",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
)
"""Colour fields of a theme file; only ``primary`` is required."""

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TEXT_STYLE_WORDS = frozenset(
    {
        *("none", "not", "bold", "b", "dim", "d", "italic", "i", "underline", "u"),
        *("underline2", "uu", "reverse", "r", "strike", "s", "blink", "blink2", "overline", "o"),
    }
)
_PERCENT = re.compile(r"^(?P<base>.+?)\s+(?P<pct>\d{1,3}(\.\d+)?)%$")


class ThemeFileError(ValueError):
    """A theme file that cannot be used: ``path``, the bad ``field`` and what is wrong."""

    def __init__(self, path: Path, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path, self.field, self.problem = path, field, problem


@dataclass(frozen=True, slots=True)
class ThemeLoad:
    """What a theme directory held: the usable themes and one error per broken file."""

    themes: tuple[Theme, ...] = ()
    errors: tuple[ThemeFileError, ...] = ()


def _color(value: Any) -> str | None:
    """Why ``value`` is not a colour, or None when it is one."""
    if not isinstance(value, str):
        return f"expected a colour string, got {type(value).__name__}"
    try:
        Color.parse(value)
    except ColorParseError:
        return f'"{value}" is not a colour (use #rrggbb, rgb(r, g, b), hsl(...) or a name)'
    return None


def _variable(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the value of variable ``name``, or None."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if name.endswith("-style"):
        bad = [w for w in value.split() if w not in TEXT_STYLE_WORDS]
        return f'"{value}" is not a text style (e.g. "bold", "none")' if bad or not value else None
    if value in ("initial", "transparent"):
        return None
    match = _PERCENT.match(value)
    if match and (match["base"] == "auto" or _color(match["base"]) is None):
        return None if float(match["pct"]) <= 100 else f'"{value}": percentage over 100'
    return _color(value)


def _number(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {type(value).__name__}"
        return None if low <= value <= high else f"must be from {low:g} to {high:g}, got {value}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def _name(value: Any) -> str | None:
    if isinstance(value, str) and NAME_PATTERN.match(value):
        return None
    return f"expected 1-64 lower-case letters, digits, '-' or '_', got {value!r}"


FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _name,
    **dict.fromkeys(COLOR_FIELDS, _color),
    "dark": _boolean,
    "ansi": _boolean,
    "luminosity_spread": _number(0.0, 1.0),
    "text_alpha": _number(0.0, 1.0),
}


def theme_from_mapping(data: Mapping[str, Any], path: Path) -> Theme:
    """Check every field of a parsed theme file and build the theme.

    Raises:
        ThemeFileError: naming the first field at fault.
    """
    for key in ("name", "primary"):
        if key not in data:
            raise ThemeFileError(path, key, "missing (required)")
    for key, value in data.items():
        if key == "variables":
            _check_variables(value, path)
            continue
        check = FIELD_CHECKS.get(key)
        if check is None:
            known = ", ".join([*FIELD_CHECKS, "variables"])
            raise ThemeFileError(path, key, f"unknown field (known: {known})")
        problem = check(value)
        if problem:
            raise ThemeFileError(path, key, problem)
    fields = {k: v for k, v in data.items() if k != "variables"}
    return Theme(**fields, variables=dict(data.get("variables", {})))


def _check_variables(value: Any, path: Path) -> None:
    if not isinstance(value, Mapping):
        raise ThemeFileError(path, "variables", "expected a table of name = value")
    for name, text in value.items():
        problem = _variable(str(name), text)
        if problem:
            raise ThemeFileError(path, f"variables.{name}", problem)


def load_theme_file(path: Path) -> Theme:
    """Read and check one theme file.

    Raises:
        ThemeFileError: unreadable, not TOML, or a bad field (named).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ThemeFileError(path, "<file>", f"cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ThemeFileError(path, "<file>", "not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ThemeFileError(path, "<file>", f"not valid TOML ({exc})") from exc
    return theme_from_mapping(data, path)


def load_theme_dir(directory: Path, reserved: Collection[str] = ()) -> ThemeLoad:
    """Every ``*.toml`` theme of ``directory`` (none when it does not exist), in name order.

    Args:
        reserved: theme names already taken (built-in themes); a file reusing one is reported.
    """
    if not directory.is_dir():
        return ThemeLoad()
    themes: list[Theme] = []
    errors: list[ThemeFileError] = []
    taken = set(reserved)
    for path in sorted(directory.glob("*.toml")):
        try:
            theme = load_theme_file(path)
        except ThemeFileError as exc:
            errors.append(exc)
            continue
        if theme.name in taken:
            errors.append(ThemeFileError(path, "name", f'"{theme.name}" is already a theme'))
            continue
        taken.add(theme.name)
        themes.append(theme)
    return ThemeLoad(tuple(themes), tuple(errors))
