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
from pqctl.tui.launch import Launched
from pqctl.tui.views import serve as serve_module
from pqctl.tui.views.logs import LogsView
from pqctl.tui.views.prompt import Output
from pqctl.tui.views.requests import RequestsView
from runtime.serve.deployment import DeploymentState
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


def test_cluster_tab_80x24(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_showing("cluster"))


def test_cluster_tab_wide_140x30(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=(140, 30), run_before=_showing("cluster"))


def _live(pilot: Pilot[Any]) -> None:
    """Serve as if the plan ran: stage states, then a minute of measured tokens/s (stage 1
    restarted once), fed as the gateway's status and metrics messages read."""
    app = pilot.app
    assert isinstance(app, PqctlApp)
    view = app.serve_view
    state = DeploymentState(
        "dashboard", 0, "plan.json", "opt-30b", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556",
        0.0, "logs/dashboard",
    )  # fmt: skip
    view.launched = Launched(None, state, Path("plan.json"), Path("logs/dashboard/gateway.log"))
    view.serving_plan, view.phase = view.plan, "loading"
    stages = [
        {"index": k, "state": "ready", "restarts": int(k == 1), "resident_bytes": (k + 1) << 33}
        for k in view.monitors
    ]
    for second, generated in ((0, 0), (1, 180)):
        requests = {"active": 4, "waiting": 1, "completed": 12}
        status = {"time": 1000.0 + second, "generated_tokens": generated, "requests": requests}
        view._apply_status({"phase": "serving", "stages": stages, **status})
    for second in range(60):
        for k, monitor in view.monitors.items():
            wave = 0.8 + 0.15 * ((second * (k + 2)) % 7) / 7
            monitor.add_metrics(
                {
                    "time": 1000.0 + second,
                    "busy": 0.5 + 0.1 * k,
                    "queue_depth": k,
                    "prefill": {"busy_tokens_per_s": monitor.predicted_prefill * wave},
                    "decode": {"busy_tokens_per_s": monitor.predicted_decode * wave},
                }
            )
    view._show_chart()


def _serving(tab: str) -> Callable[[Pilot[Any]], Any]:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _showing("serve")(pilot)
        _live(pilot)
        pilot.app.action_show_tab(tab)  # type: ignore[attr-defined]
        await pilot.pause()
        pilot.app.query_one(Tabs).focus()
        await pilot.pause()

    return run_before


def test_serve_tab_live_100x40(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "clock", lambda: "12:00:00")  # the event log's stamps
    assert snap_compare(_app(), terminal_size=(100, 40), run_before=_serving("serve"))


def test_prompt_tab_with_several_replies(snap_compare: Any) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _showing("prompt")(pilot)
        app = pilot.app
        assert isinstance(app, PqctlApp)
        view = app.prompt_view
        view.set_endpoint("tcp://127.0.0.1:5555", "dashboard", 32)
        view.outputs = [
            Output("ROMEO: [Exit]", " But soft, what light", True, "length", USAGE),
            Output("JULIET:", " O Romeo, Romeo!", True, "length", USAGE),
        ]
        view._show_completion()
        view._show_usage()
        await pilot.pause()

    assert snap_compare(_app(), terminal_size=(80, 24), run_before=run_before)


USAGE = {"completion_tokens": 5, "first_token_s": 0.12, "total_s": 0.4, "seed": 0}


def test_logs_tab(snap_compare: Any, dashboard_dirs: Path) -> None:
    logs = dashboard_dirs / "state" / "logs" / "snap"  # shown relative to the state dir
    logs.mkdir(parents=True)
    (logs / "gateway.log").write_text(
        "".join(f"gateway: step {n} [ok]\n" for n in range(30)) + "stage 1 failed: exit 1\n"
    )
    (logs / "stage-0.log").write_text("loading layers 0-25\n")

    async def run_before(pilot: Pilot[Any]) -> None:
        await _showing("logs")(pilot)
        app = pilot.app
        assert isinstance(app, PqctlApp)
        view = app.query_one(LogsView)
        view.show_dir(logs)
        await wait_for(pilot, lambda: len(view.lines) == 31, 5, "gateway log")
        await pilot.pause()

    assert snap_compare(_app(), terminal_size=(80, 24), run_before=run_before)


REQUEST_ROWS = [
    {"id": "chat-7", "client": "00a1b2c3", "state": "running", "prompt_tokens": 41,
     "generated_tokens": 12, "max_new_tokens": 64, "ttft_s": 0.212, "tokens_per_s": 38.5,
     "age_s": 0.6},
    {"id": "http-19-3", "client": "00d4e5f6", "state": "waiting", "prompt_tokens": 7,
     "generated_tokens": 0, "max_new_tokens": 16, "ttft_s": None, "tokens_per_s": None,
     "age_s": 0.1},
    {"id": "batch-[1]", "client": "00a1b2c3", "state": "cancelled", "prompt_tokens": 3,
     "generated_tokens": 5, "max_new_tokens": 64, "ttft_s": 0.101, "tokens_per_s": 41.0,
     "age_s": 9.0},
]  # fmt: skip


def test_requests_tab(snap_compare: Any) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _showing("requests")(pilot)
        app = pilot.app
        assert isinstance(app, PqctlApp)
        view = app.query_one(RequestsView)
        view.show_rows(REQUEST_ROWS)
        await pilot.pause()

    assert snap_compare(_app(), terminal_size=(80, 24), run_before=run_before)
