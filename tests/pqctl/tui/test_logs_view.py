"""The Logs tab driven by keys: tail a deployment's gateway log, follow what is appended,
pause, filter, switch to a stage's log; the Serve tab's event log recording a stage's crash
and restart, and its history chart (``c``)."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Log

from pqctl.tui.app import PqctlApp
from pqctl.tui.messages import DeploymentSnapshot
from pqctl.tui.views.logs import LogsView
from pqctl.tui.widgets.stage_chart import StageChart
from tests.pqctl.tui.helpers import HOME_LAB, PLAN_FILE, wait_for


def _shown(app: PqctlApp) -> list[str]:
    return list(app.query_one("#log-lines", Log).lines)


async def test_tail_follow_filter_and_switch_logs(dashboard_dirs: Path) -> None:
    logs = dashboard_dirs / "state" / "logs" / "dashboard"
    logs.mkdir(parents=True)
    gateway = logs / "gateway.log"
    gateway.write_text("".join(f"old line {n}\n" for n in range(3000)))
    (logs / "stage-0.log").write_text("stage 0: loading\nstage 0: ready\n")
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(LogsView)
        view.show_dir(logs)  # as when a deployment starts or is attached
        await pilot.press("5")
        assert app.active_tab == "logs" and app.focused is app.query_one("#log-lines")
        await wait_for(pilot, lambda: _shown(app)[-1:] == ["old line 2999"], 5, "the tail")
        assert len(view.lines) == 2000  # the last lines only

        with gateway.open("a") as f:
            f.write("INFO request 1 done\nERROR stage 1 exited (code 1)\n")
        await wait_for(pilot, lambda: "ERROR" in _shown(app)[-1], 5, "followed")

        await pilot.press("f")  # pause: new lines are kept, the view stays put
        assert not view.follow and "paused" in str(app.query_one("#log-status").render())
        await pilot.press("f")
        assert view.follow

        await pilot.press("shift+tab", *"ERROR")
        assert app.focused is app.query_one("#log-filter")
        assert _shown(app) == ["ERROR stage 1 exited (code 1)"]
        assert '1 matching "ERROR"' in str(app.query_one("#log-status").render())
        await pilot.press(*["backspace"] * 5)
        assert len(_shown(app)) == 2000

        await pilot.press("shift+tab", "enter", "down", "enter")  # the source list: stage-0
        await wait_for(pilot, lambda: view.path == logs / "stage-0.log", 5, "stage 0 chosen")
        await wait_for(pilot, lambda: _shown(app) == ["stage 0: loading", "stage 0: ready"], 5,
                       "stage 0's log")  # fmt: skip


async def test_the_event_log_records_stage_crashes_and_restarts() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        app.plan_view.load_plan(PLAN_FILE)
        await pilot.press("3")
        view = app.serve_view
        ready = [{"index": k, "state": "ready"} for k in view.monitors]
        view._apply_status({"phase": "serving", "stages": ready})  # as the gateway reports
        crashed = {"index": 1, "state": "failed", "error": "exit code -9 (killed)"}
        view._apply_status({"phase": "serving", "stages": [ready[0], crashed]})
        back = {"index": 1, "state": "ready", "restarts": 1, "last_failure": "exit code -9"}
        view._apply_status({"phase": "serving", "stages": [ready[0], back]})
        view._apply_status({"phase": "serving", "stages": [ready[0], back]})  # no news
        await pilot.pause()
        events = [line for line in app.query_one("#serve-log", Log).lines if "stage 1" in line]
        assert len(events) == 2, events
        assert "stage 1 (workstation/cuda:0) failed: exit code -9 (killed)" in events[0]
        assert "restarted (1× so far) after: exit code -9" in events[1]


async def test_c_cycles_the_history_chart_of_measured_against_predicted() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 40)) as pilot:
        app.plan_view.load_plan(PLAN_FILE)
        await pilot.press("3")
        chart = app.query_one(StageChart)
        assert not chart.display  # nothing measured yet: the monitors keep the room
        view = app.serve_view
        for second in range(5):
            for monitor in view.monitors.values():
                monitor.add_metrics(
                    {"time": float(second), "prefill": {"busy_tokens_per_s": 900.0},
                     "decode": {"busy_tokens_per_s": 100.0 + second}}
                )  # fmt: skip
        view.on_deployment_snapshot(DeploymentSnapshot(None, {}))  # no deployment: ignored
        view._show_chart()
        await pilot.pause()
        assert chart.display and chart.phase == "decode"
        decode = chart.series[0]
        assert list(decode.measured) == [100.0, 101.0, 102.0, 103.0, 104.0]
        assert list(decode.times_s) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert decode.predicted == view.monitors[0].predicted_decode
        await pilot.press("c")
        assert chart.phase == "prefill" and chart.series[0].measured[0] == 900.0
        await pilot.press("c")
        assert not chart.display
        await pilot.press("c")
        assert chart.display and chart.phase == "decode"
