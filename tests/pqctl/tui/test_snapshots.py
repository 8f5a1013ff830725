"""Snapshots of stable screens (a saved plan, no live figures). After a deliberate change of
the look: ``pytest tests/pqctl/tui/test_snapshots.py --snapshot-update`` and review the SVGs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Tabs

from pqctl.tui.app import PqctlApp
from tests.pqctl.tui.helpers import PLAN_FILE, ROOT, wait_for

pytest.importorskip("pytest_textual_snapshot", reason="pip install -e '.[dev]'")

CLUSTER = Path("examples") / "clusters" / "mixed-home-lab.toml"  # relative: stable text


@pytest.fixture(autouse=True)
def _in_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _showing(tab: str) -> Callable[[Pilot[Any]], Any]:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, PqctlApp)
        await wait_for(pilot, lambda: app.cluster_view.resolved is not None, 30, "cluster")
        app.plan_view.load_plan(PLAN_FILE.relative_to(ROOT))
        app.action_show_tab(tab)
        await pilot.pause()
        app.query_one(Tabs).focus()  # no blinking text cursor in the picture
        await pilot.pause()

    return run_before


def _app(theme: str = "dark") -> PqctlApp:
    return PqctlApp(theme=theme, cluster=CLUSTER, auto_solve=False)


def test_plan_tab_dark_80x24(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_showing("plan"))


def test_plan_tab_light_120x40(snap_compare: Any) -> None:
    assert snap_compare(_app("light"), terminal_size=(120, 40), run_before=_showing("plan"))


def test_plan_tab_high_contrast_100x30(snap_compare: Any) -> None:
    app = _app("high-contrast")
    assert snap_compare(app, terminal_size=(100, 30), run_before=_showing("plan"))


def test_serve_tab_before_launch(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_showing("serve"))


def test_help_screen(snap_compare: Any) -> None:
    assert snap_compare(
        _app(), terminal_size=(80, 24), run_before=_showing("plan"), press=["question_mark"]
    )
