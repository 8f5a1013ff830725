"""Real gateways and stage processes on loopback, always torn down (bounded waits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.serve.deployment import DeploymentError, DeploymentState, pid_alive

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Served:
    """A running gateway started by a test."""

    process: subprocess.Popen[bytes]
    state: DeploymentState
    state_dir: Path

    def stage_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def log(self) -> str:
        logs = Path(self.state.log_dir)
        return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))


def start_gateway(
    plan: Path,
    state_dir: Path,
    name: str = "t",
    *extra: str,
    timeout_s: float = 90.0,
    keys: Path | None = None,
) -> Served:
    """Start ``python -m runtime.serve.gateway`` and wait until every stage is ready."""
    env = dict(os.environ, PQCTL_STATE_DIR=str(state_dir), PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "runtime.serve.gateway", "--plan", str(plan), "--name", name]
    argv += ["--endpoint", "tcp://127.0.0.1:*", *extra]
    if keys is not None:
        argv += ["--keys", str(keys)]
    log = open(state_dir / f"{name}-gateway.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log.close()
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            state = DeploymentState.load(name, state_dir)
            break
        except DeploymentError:
            time.sleep(0.05)
    if state is None:
        stop_gateway(process)
        raise AssertionError((state_dir / f"{name}-gateway.log").read_text())
    served = Served(process, state, state_dir)
    from runtime.serve.client import Client

    with Client(state.client_endpoint, timeout_s=5, keys=keys) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(served.log())
            if client.info()["state"] == "serving":
                return served
            time.sleep(0.1)
    stop_gateway(process)
    raise AssertionError(f"not serving after {timeout_s} s:\n{served.log()}")


def stop_gateway(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM, wait, then kill the whole process group if needed. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-9", "-P", str(process.pid)], check=False)
            process.kill()
            return process.wait(timeout=10)
    return process.returncode


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    monkeypatch.setenv("PQCTL_STATE_DIR", str(directory))
    return directory


@pytest.fixture
def gateways() -> Iterator[list[Served]]:
    """Collects the gateways a test starts; stops them and checks nothing is left."""
    started: list[Served] = []
    yield started
    for served in started:
        pids = served.stage_pids()
        stop_gateway(served.process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in pids), "stage processes outlived their gateway"
