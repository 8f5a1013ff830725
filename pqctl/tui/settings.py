"""The dashboard's remembered settings: a small TOML file in the pqctl config directory.

The directory is ``$PQCTL_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/pqctl``, else
``~/.config/pqctl``. It holds ``dashboard.toml`` (settings) and ``themes/`` (user theme files,
docs/themes.md). A missing or broken settings file gives the defaults and a warning, never a
crash.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

SETTINGS_FILE = "dashboard.toml"


def config_dir() -> Path:
    """Where pqctl keeps its user configuration."""
    if os.environ.get("PQCTL_CONFIG_DIR"):
        return Path(os.environ["PQCTL_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pqctl"


def user_theme_dir() -> Path:
    """The directory of user theme files."""
    return config_dir() / "themes"


@dataclass(frozen=True, slots=True)
class Settings:
    """What the dashboard remembers between runs.

    Attributes:
        theme: name of the last theme chosen (None: the default theme).
    """

    theme: str | None = None


def load_settings(path: Path | None = None) -> tuple[Settings, str | None]:
    """The saved settings, and a warning when the file could not be used."""
    path = path or config_dir() / SETTINGS_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings(), None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return Settings(), f"{path}: ignored ({exc})"
    theme = data.get("theme")
    if theme is not None and not isinstance(theme, str):
        return Settings(), f"{path}: theme: expected a string, got {type(theme).__name__}"
    return Settings(theme=theme), None


def save_settings(settings: Settings, path: Path | None = None) -> str | None:
    """Write the settings atomically; a warning when that failed."""
    path = path or config_dir() / SETTINGS_FILE
    lines = ["# pqctl dashboard settings (written by the dashboard)"]
    if settings.theme is not None:
        lines.append(f"theme = {json.dumps(settings.theme)}")  # a JSON string is a TOML string
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        return f"could not save settings to {path} ({exc.strerror})"
    return None
