"""Remembered settings: the config directory, the settings file, and the theme chosen with
--theme or from the command palette coming back on the next start."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.command import CommandList

from pqctl.tui.app import DashboardError, PqctlApp
from pqctl.tui.settings import Settings, config_dir, load_settings, save_settings
from tests.pqctl.tui.helpers import HOME_LAB, wait_for


def test_config_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PQCTL_CONFIG_DIR", str(tmp_path / "a"))
    assert config_dir() == tmp_path / "a"
    monkeypatch.delenv("PQCTL_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "pqctl"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_dir() == tmp_path / "home" / ".config" / "pqctl"


def test_settings_round_trip_and_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.toml"
    assert load_settings(path) == (Settings(), None)
    assert save_settings(Settings(theme='odd "name"'), path) is None
    assert load_settings(path) == (Settings(theme='odd "name"'), None)
    path.write_text("theme = [")
    settings, warning = load_settings(path)
    assert settings == Settings() and warning is not None and str(path) in warning
    path.write_text("theme = 3\n")
    settings, warning = load_settings(path)
    assert settings == Settings() and warning is not None and "theme: expected a string" in warning


def test_unknown_theme_is_an_error_naming_the_choices() -> None:
    with pytest.raises(DashboardError, match=r'no theme "neon"; use dark, light, high-contrast'):
        PqctlApp(theme="neon")


async def test_theme_from_the_palette_is_remembered() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.theme == "pqctl-dark"
        await pilot.press("ctrl+p")
        await pilot.press(*"pqctl-light")
        hits = app.screen.query_one(CommandList)
        await wait_for(pilot, lambda: hits.option_count > 0, 5, "palette hits")
        assert "pqctl-light" in str(hits.get_option_at_index(0).prompt)
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.theme == "pqctl-light", 5, "theme applied")
    assert load_settings()[0].theme == "pqctl-light"

    again = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with again.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert again.theme == "pqctl-light"


async def test_theme_option_wins_and_is_remembered() -> None:
    save_settings(Settings(theme="pqctl-light"))
    app = PqctlApp(theme="high-contrast", cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app.theme == "pqctl-high-contrast"
    assert load_settings()[0].theme == "pqctl-high-contrast"


async def test_a_forgotten_user_theme_falls_back_with_a_warning() -> None:
    save_settings(Settings(theme="deleted-theme"))
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app.theme == "pqctl-dark"
        assert any("deleted-theme" in n.message for n in app._notifications)
