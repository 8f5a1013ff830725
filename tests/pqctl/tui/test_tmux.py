"""Start-up in a real terminal: the dashboard under tmux at 80×24 draws its tabs, the cluster
and a plan, and quits cleanly with Ctrl+Q. Skipped when tmux is not installed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_dashboard_starts_draws_and_quits_in_a_real_terminal(tmp_path: Path) -> None:
    tmux = Tmux(f"pqctl-test-{os.getpid()}")
    env = {
        "PQCTL_CONFIG_DIR": str(tmp_path / "config"),
        "PQCTL_STATE_DIR": str(tmp_path / "state"),
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command = (
        f"env {exports} {shlex.quote(sys.executable)} -m pqctl.tui --cluster "
        f"{shlex.quote(str(HOME_LAB))}; echo pqctl-exit=$?; sleep 60"
    )
    tmux.run("new-session", "-d", "-s", "pqctl", "-x", "80", "-y", "24", "-c", str(ROOT), command)
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
