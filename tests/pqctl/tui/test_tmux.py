"""Start-up in a real terminal: the dashboard under tmux at 80×24 draws its tabs, the cluster
and a plan, and quits cleanly with Ctrl+Q. Skipped when tmux is not installed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.serve.deployment import DeploymentState, pid_alive
from tests.pqctl.tui.helpers import HOME_LAB, ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"
)


class Tmux:
    """One private tmux server (its own socket) running one session."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "pqctl")

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not on screen after {timeout_s:.0f} s:\n{screen}")


def _start(tmux: Tmux, tmp_path: Path, *args: str) -> None:
    """``pqctl ARGS`` (no command: the dashboard) in an 80×24 tmux window; then
    ``pqctl-exit=<code>``."""
    env = {
        "PQCTL_CONFIG_DIR": str(tmp_path / "config"),
        "PQCTL_STATE_DIR": str(tmp_path / "state"),
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    argv = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "pqctl", *args))
    command = f"env {exports} {argv}; echo pqctl-exit=$?; sleep 60"
    tmux.run("new-session", "-d", "-s", "pqctl", "-x", "80", "-y", "24", "-c", str(ROOT), command)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_dashboard_starts_draws_and_quits_in_a_real_terminal(tmp_path: Path) -> None:
    tmux = Tmux(f"pqctl-test-{os.getpid()}")
    _start(tmux, tmp_path, "--cluster", str(HOME_LAB))
    try:
        screen = tmux.wait_for("gaming-pc/cuda:0", 60)
        lines = screen.splitlines()
        assert "1 Cluster" in screen and "2 Plan" in screen and "4 Prompt" in screen
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        tmux.wait_for("stage 0", 60)  # the first plan is solved in the background
        tmux.run("send-keys", "-t", "pqctl", "2")
        screen = tmux.wait_for("tokens/s predicted", 10)
        assert "opt-30b" in screen and "bottleneck" in screen
        tmux.run("send-keys", "-t", "pqctl", "C-q")
        tmux.wait_for("pqctl-exit=0", 20)
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.multiproc
def test_closing_the_terminal_stops_the_launched_deployment(tmp_path: Path) -> None:
    tmux = Tmux(f"pqctl-hangup-{os.getpid()}")
    _start(tmux, tmp_path)  # this host, the built-in model
    state_dir = tmp_path / "state"
    pid = None
    dashboards: list[int] = []
    try:
        tmux.wait_for("stage 0", 60)
        tmux.run("send-keys", "-t", "pqctl", "3")
        tmux.wait_for("l launches it", 10)
        tmux.run("send-keys", "-t", "pqctl", "l")
        tmux.wait_for("serving", 90)
        pid = DeploymentState.load("dashboard", state_dir).pid
        shell = int(tmux.run("list-panes", "-t", "pqctl", "-F", "#{pane_pid}").split()[0])
        dashboards = _children(shell)
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], timeout=10)  # SIGHUP
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.2)
        assert not pid_alive(pid), "the gateway outlived the dashboard"
        assert not (state_dir / "dashboard.json").exists()
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, timeout=10)
        if pid is not None and pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        for child in dashboards:  # the test leaves no dashboard behind either way
            if pid_alive(child):
                os.kill(child, signal.SIGKILL)


def test_keys_of_a_real_terminal_at_80x24(tmp_path: Path) -> None:
    """What tmux delivers: Alt+digit (ESC + digit, read as "™" etc.) switches tabs from inside
    a text field, "%" types into the quality field, PageDown scrolls the plan, and the Cluster
    table fits 80 columns."""
    tmux = Tmux(f"pqctl-keys-{os.getpid()}")
    _start(tmux, tmp_path, "--cluster", str(HOME_LAB))
    try:
        tmux.wait_for("stage 0", 60)
        screen = tmux.screen()
        header = next(line for line in screen.splitlines() if line.lstrip().startswith("device"))
        assert "util" in header  # the telling columns all show at 80 columns
        row = next(line for line in screen.splitlines() if "cpu-server/cpu" in line)
        assert row.rstrip().endswith("N/A")  # its last column is whole, not cut
        tmux.run("send-keys", "-t", "pqctl", "M-2")  # the model field has the focus
        screen = tmux.wait_for("tokens/s predicted", 10)
        assert "Baselines" not in screen
        tmux.run("send-keys", "-t", "pqctl", "PageDown")
        tmux.wait_for("Baselines", 5)
        tmux.run("send-keys", "-t", "pqctl", "M-3")  # from inside the model field
        tmux.wait_for("pqctl --ray", 5)
        for key in ("M-2", "Tab", "Tab", "Tab", "Tab", "1", "%"):  # as typed, not in a burst
            tmux.run("send-keys", "-t", "pqctl", key)
            time.sleep(0.2)
        screen = tmux.wait_for("quality 1%", 5)
        model_line = next(line for line in screen.splitlines() if "quality" in line)
        assert "£" not in model_line and "™" not in model_line
        tmux.run("send-keys", "-t", "pqctl", "M-1")
        tmux.wait_for("x excludes", 5)
        tmux.run("send-keys", "-t", "pqctl", "C-q")
        tmux.wait_for("pqctl-exit=0", 20)
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, timeout=10)
