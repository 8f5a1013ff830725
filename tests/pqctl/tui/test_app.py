"""The app shell: tabs and keys, tab-specific bindings in the footer, help, command palette
entries, and every tab at 80×24 and on a large terminal."""

from __future__ import annotations

import pytest
from textual.widgets import Input, TabbedContent

from pqctl.tui.app import PqctlApp
from pqctl.tui.screens.help import HelpScreen
from tests.pqctl.tui.helpers import HOME_LAB, PLAN_FILE, wait_for


async def test_number_keys_switch_tabs_and_escape_leaves_a_field() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        tabs = app.query_one(TabbedContent)
        await pilot.press("2")
        assert tabs.active == "plan" and app.focused is app.query_one("#model")
        await pilot.press("3")  # typed into the model field
        assert tabs.active == "plan" and app.query_one("#model", Input).value == "3"
        await pilot.press("escape", "3")
        assert tabs.active == "serve"
        await pilot.press("4")
        assert tabs.active == "prompt" and isinstance(app.focused, Input)
        await pilot.press("escape", "1")
        assert tabs.active == "cluster" and app.focused is app.query_one("#devices")


async def test_alt_digits_and_ctrl_page_keys_switch_tabs_from_a_text_field() -> None:
    """Alt+3 as a kitty-protocol terminal reports it, and as tmux/xterm send it (ESC 3, which
    Textual reads as "£"); Ctrl+PgDn/PgUp: none of them types into the field."""
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        tabs = app.query_one(TabbedContent)
        for key, tab in (("alt+3", "serve"), ("pound_sign", "serve")):
            await pilot.press("trade_mark_sign")  # Alt+2 under tmux: the model field
            assert tabs.active == "plan" and app.focused is app.query_one("#model")
            await pilot.press(key)
            assert tabs.active == tab, key
        await pilot.press("alt+4")
        assert isinstance(app.focused, Input)
        await pilot.press("ctrl+pagedown")  # from the prompt field
        assert tabs.active == "logs"
        await pilot.press("ctrl+pagedown", "ctrl+pagedown")  # round to the first
        assert tabs.active == "cluster"
        await pilot.press("ctrl+pageup")
        assert tabs.active == "requests"
        await pilot.press("trade_mark_sign", "section_sign")  # Alt+6 from the model field
        assert tabs.active == "requests"
        assert app.query_one("#model", Input).value == ""
        assert app.query_one("#prompt-text", Input).value == ""


async def test_tab_keys_work_and_show_only_on_their_tab() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app.check_action("exclude", ()) and not app.check_action("launch", ())
        await pilot.press("3")
        assert app.check_action("launch", ()) and app.check_action("stop", ())
        assert not app.check_action("exclude", ()) and not app.check_action("solve", ())
        await pilot.press("x")  # not the Cluster tab: nothing is excluded
        assert app.cluster_view.excluded == set()


async def test_help_screen_opens_and_closes() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)


async def test_palette_lists_the_dashboard_commands() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {
            "Solve plan",
            "Cancel solving",
            "Save plan",
            "Load plan",
            "Launch plan",
            "Stop deployment",
            "Help",
            "Show Cluster",
            "Theme: pqctl-high-contrast",
        } <= titles
        await pilot.press("ctrl+p", *"solve plan")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.plan_view.plan is not None, 30, "plan from palette")
        assert app.query_one(TabbedContent).active == "plan"


@pytest.mark.parametrize("size", [(80, 24), (200, 60)])
async def test_every_tab_fits_small_and_large_terminals(size: tuple[int, int]) -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=size) as pilot:
        app.plan_view.load_plan(PLAN_FILE)
        for tab in ("cluster", "plan", "serve", "prompt", "logs"):
            app.action_show_tab(tab)
            await pilot.pause()
            view = app.query_one(f"#{tab}-view")
            assert view.region.width == size[0] and view.region.height >= size[1] - 6
        footer = app.query_one("Footer")
        assert footer.region.y == size[1] - 1
