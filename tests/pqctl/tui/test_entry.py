"""Opening the dashboard: errors before any screen is drawn, and quitting stops what the
dashboard launched."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqctl.tui import launch
from pqctl.tui.app import DashboardError, PqctlApp, run_dashboard
from runtime.serve.deployment import DeploymentState, pid_alive
from tests.pqctl.tui.helpers import HOME_LAB, ROOT, wait_for


def test_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="--cluster: no file"):
        run_dashboard(None, tmp_path / "missing.toml", None)
    with pytest.raises(DashboardError, match='--theme: no theme "neon"'):
        run_dashboard("neon", HOME_LAB, None)
    with pytest.raises(DashboardError, match="needs a terminal"):
        run_dashboard("light", HOME_LAB, None)  # pytest's stdin is not a terminal


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` without a terminal; stderr's whitespace collapsed (rich wraps
    at the terminal width)."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    out.stderr = " ".join(out.stderr.split())
    return out


def test_module_entry_point_reports_and_exits_2(dashboard_dirs: Path) -> None:
    out = _run_module("pqctl.tui", "--theme", "neon")
    assert out.returncode == 2
    assert 'error: --theme: no theme "neon"' in out.stderr


async def test_quit_stops_the_deployment_it_launched(dashboard_dirs: Path) -> None:
    # a stand-in gateway: a process with a state file, stopped the way pqctl stop does it
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    state = DeploymentState(
        "dashboard",
        process.pid,
        "plan.json",
        "m",
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.1:2",
        time.time(),
        str(dashboard_dirs),
    )
    state.save()
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            app.serve_view.launched = launch.Launched(
                process, state, dashboard_dirs / "plan.json", dashboard_dirs / "gateway.log"
            )
            await pilot.press("ctrl+q")
            await wait_for(pilot, lambda: not pid_alive(process.pid), 15, "gateway stopped")
        assert process.poll() is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_the_command_line_loads_textual_only_for_the_dashboard() -> None:
    code = "import sys, pqctl.cli; print('textual' in sys.modules, 'themes' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_pqctl_without_a_command_opens_the_dashboard_or_says_why(dashboard_dirs: Path) -> None:
    out = _run_module("pqctl")
    assert out.returncode == 2
    assert "error: cannot open the dashboard: the dashboard needs a terminal" in out.stderr
    out = _run_module("pqctl", "--theme", "neon", "show", "plan.json")
    assert out.returncode == 2
    assert "before a command apply to the dashboard only" in out.stderr
