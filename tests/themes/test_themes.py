"""Themes: every shipped theme loads and renders; broken user theme files are reported (file and
field) and skipped, never fatal."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.color import Color
from textual.widgets import TabbedContent

from pqctl.tui.app import TABS, PqctlApp
from tests.pqctl.tui.helpers import HOME_LAB, PLAN_FILE
from themes import BUILTIN_THEMES, THEME_ALIASES, ThemeFileError, load_theme_dir, load_theme_file
from themes.loader import COLOR_FIELDS

EXAMPLES = Path(__file__).resolve().parents[2] / "themes" / "examples"
GOOD = 'name = "{name}"\nprimary = "#336699"\ndark = false\n'


def test_three_builtin_themes_with_valid_colours() -> None:
    assert set(BUILTIN_THEMES) == {"pqctl-dark", "pqctl-light", "pqctl-high-contrast"}
    assert {THEME_ALIASES[a] for a in ("dark", "light", "high-contrast")} == set(BUILTIN_THEMES)
    for theme in BUILTIN_THEMES.values():
        for field in COLOR_FIELDS:
            value = getattr(theme, field)
            if value is not None:
                Color.parse(value)
        theme.to_color_system().generate()
    assert not BUILTIN_THEMES["pqctl-light"].dark


def test_shipped_example_theme_files_load() -> None:
    files = sorted(EXAMPLES.glob("*.toml"))
    assert files
    for path in files:
        assert load_theme_file(path).name == path.stem


@pytest.mark.parametrize("name", [*BUILTIN_THEMES, "solarized-pq"])
async def test_every_shipped_theme_renders(name: str, dashboard_dirs: Path) -> None:
    user = dashboard_dirs / "config" / "themes"
    user.mkdir(parents=True)
    for path in EXAMPLES.glob("*.toml"):
        (user / path.name).write_text(path.read_text())
    app = PqctlApp(theme=name, cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(80, 24)) as pilot:
        app.plan_view.load_plan(PLAN_FILE)
        for tab in ("2", "3", "4", "1"):
            await pilot.press(f"alt+{tab}")
            assert app.query_one(TabbedContent).active == TABS[int(tab) - 1][0]
        await pilot.press("question_mark")
        await pilot.pause()
        assert app.current_theme.name == name
        svg = app.export_screenshot()
        background = Color.parse(app.current_theme.background or "#000").hex.lower()
        assert background in svg.lower()
        assert not app._notifications or all(n.severity != "error" for n in app._notifications)


BROKEN = {
    "syntax.toml": ('name = "x"\nprimary = \n', "<file>", "not valid TOML"),
    "no-name.toml": ('primary = "#123456"\n', "name", "missing"),
    "no-primary.toml": ('name = "np"\n', "primary", "missing"),
    "bad-colour.toml": ('name = "bc"\nprimary = "#12345"\n', "primary", "not a colour"),
    "bad-accent.toml": ('name = "ba"\nprimary = "red"\naccent = "blurple"\n', "accent", "colour"),
    "colour-number.toml": ('name = "cn"\nprimary = 7\n', "primary", "expected a colour"),
    "unknown.toml": ('name = "uk"\nprimary = "red"\nprimery = "red"\n', "primery", "unknown"),
    "bad-dark.toml": ('name = "bd"\nprimary = "red"\ndark = "yes"\n', "dark", "true or false"),
    "bad-spread.toml": (
        'name = "bs"\nprimary = "red"\nluminosity_spread = 3\n',
        "luminosity_spread",
        "from 0 to 1",
    ),
    "bad-name.toml": ('name = "Has Spaces"\nprimary = "red"\n', "name", "lower-case"),
    "bad-variable.toml": (
        'name = "bv"\nprimary = "red"\n[variables]\nfooter-key-foreground = "nope"\n',
        "variables.footer-key-foreground",
        "not a colour",
    ),
    "bad-style.toml": (
        'name = "bst"\nprimary = "red"\n[variables]\nblock-cursor-text-style = "loud"\n',
        "variables.block-cursor-text-style",
        "text style",
    ),
    "variables-not-table.toml": ('name = "vt"\nprimary = "red"\nvariables = 3\n', "variables", ""),
}


@pytest.mark.parametrize("file_name", sorted(BROKEN))
def test_a_broken_file_names_file_and_field(file_name: str, tmp_path: Path) -> None:
    text, field, problem = BROKEN[file_name]
    path = tmp_path / file_name
    path.write_text(text)
    with pytest.raises(ThemeFileError) as caught:
        load_theme_file(path)
    assert caught.value.path == path and caught.value.field == field
    assert problem in caught.value.problem
    assert str(path) in str(caught.value)


def test_a_directory_loads_the_good_files_and_reports_the_rest(tmp_path: Path) -> None:
    (tmp_path / "ok.toml").write_text(GOOD.format(name="ok"))
    (tmp_path / "clash.toml").write_text(GOOD.format(name="pqctl-dark"))
    (tmp_path / "broken.toml").write_text('name = "b"\nprimary = "#zz"\n')
    (tmp_path / "not-a-theme.txt").write_text("ignored")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    result = load_theme_dir(tmp_path, reserved=BUILTIN_THEMES)
    assert [t.name for t in result.themes] == ["ok"]
    assert {(e.path.name, e.field) for e in result.errors} == {
        ("clash.toml", "name"),
        ("broken.toml", "primary"),
        ("binary.toml", "<file>"),
    }
    assert load_theme_dir(tmp_path / "missing").themes == ()


def test_accepted_variable_forms(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text(
        'name = "v"\nprimary = "red"\n[variables]\n'
        'footer-key-foreground = "#ffcc00"\nborder = "transparent"\n'
        'input-selection-background = "#336699 40%"\ntext-muted = "auto 60%"\n'
        'link-style = "bold not underline"\n'
    )
    theme = load_theme_file(path)
    assert theme.variables["link-style"] == "bold not underline"


async def test_the_app_reports_a_broken_user_theme_and_runs(dashboard_dirs: Path) -> None:
    user = dashboard_dirs / "config" / "themes"
    user.mkdir(parents=True)
    (user / "mine.toml").write_text(GOOD.format(name="mine"))
    (user / "broken.toml").write_text('name = "broken"\nprimary = "#12345"\n')
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert "mine" in app.available_themes and "broken" not in app.available_themes
        warnings = [n.message for n in app._notifications]
        assert any("broken.toml: primary:" in w for w in warnings), warnings
        app.theme = "mine"
        await pilot.pause()
        assert app.current_theme.name == "mine"
