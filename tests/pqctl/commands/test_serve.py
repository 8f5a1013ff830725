"""``pqctl apply`` / ``generate`` / ``stop`` as a user runs them: real processes, bounded waits."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.plan import Plan
from pqctl.render.deployment import load_state
from runtime.model.assets import builtin_model_dir
from runtime.serve.client import Client, ConnectionLost
from runtime.serve.deployment import DeploymentState, pid_alive
from tests.runtime.serve.plans import serving_plan, write_plan

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[3]


def pqctl(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PQCTL_STATE_DIR=str(state), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "pqctl", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    return write_plan(serving_plan("bard-tiny", [0, 4], batch=4, max_new=24), tmp_path)


def _cleanup(state: Path, name: str = "default") -> None:
    try:
        info = DeploymentState.load(name, state)
    except Exception:
        return
    os.killpg(info.pid, signal.SIGKILL)
    info.remove(state)  # what the killed gateway would have removed: its private directory


def test_apply_detach_generate_stop(plan_file: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        up = pqctl(state, "apply", str(plan_file), "--detach", "--endpoint", "tcp://127.0.0.1:*")
        assert up.returncode == 0, up.stderr
        assert "serving bard-tiny (2 stages) at tcp://127.0.0.1:" in up.stderr
        deployment = DeploymentState.load("default", state)

        again = pqctl(state, "apply", str(plan_file), "--detach")
        assert again.returncode == 2
        assert 'deployment "default" is serving at' in again.stderr

        out = pqctl(state, "generate", "ROMEO:", "KING:", "--max-new", "8", "--json")
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert [line["prompt"] for line in lines] == ["ROMEO:", "KING:"]
        assert all(line["usage"]["completion_tokens"] <= 8 for line in lines)

        # Internal sockets are Unix sockets in a private directory: the only TCP port any of
        # the deployment's processes listens on is the client endpoint's.
        run_dir = Path(deployment.run_dir or "")
        assert run_dir.is_dir() and run_dir.stat().st_mode & 0o777 == 0o700
        assert deployment.status_endpoint == f"ipc://{run_dir}/status"
        assert {p.name for p in run_dir.iterdir()} >= {"control", "results", "status"}
        port = int(deployment.client_endpoint.rsplit(":", 1)[1])
        assert _listening_tcp_ports(_group(deployment.pid)) == {port}

        listed = pqctl(state, "status", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert (row["name"], row["phase"], row["pid"]) == ("default", "serving", deployment.pid)
        assert row["endpoint"] == deployment.client_endpoint
        assert row["plan"] == str(plan_file.resolve()) and row["model"] == "bard-tiny"
        assert [st["state"] for st in row["stages"]] == ["ready", "ready"]
        assert row["requests"]["completed"] == 2 and row["uptime_s"] > 0
        table = pqctl(state, "status")
        assert table.returncode == 0
        cells = [c.strip() for c in table.stdout.splitlines()[4].split("│")[1:-1]]
        assert cells[:3] == ["default", "serving", "bard-tiny"], table.stdout
        assert cells[3] == deployment.client_endpoint and cells[4] == "2/2 ready"
        assert "2 done" in table.stdout

        streamed = pqctl(state, "generate", "ROMEO:", "--max-new", "8")
        assert streamed.returncode == 0
        assert streamed.stdout.startswith("ROMEO:" + lines[0]["text"])  # greedy: same text

        bad = pqctl(state, "generate", "ROMEO:", "--max-new", "25")
        assert bad.returncode == 2
        assert "bad_field (max_new_tokens)" in bad.stderr and "from 1 to 24" in bad.stderr

        down = pqctl(state, "stop")
        assert down.returncode == 0 and 'stopped "default"' in down.stderr
        assert not pid_alive(deployment.pid)
        assert pqctl(state, "stop").returncode == 5
        assert not run_dir.exists()
        assert json.loads(pqctl(state, "status", "--json").stdout) == []
        assert pqctl(state, "status", "--name", "default").returncode == 5
        gone = pqctl(state, "generate", "ROMEO:")
        assert gone.returncode == 5 and "no deployment" in gone.stderr
    finally:
        _cleanup(state)


def test_apply_in_the_foreground_stops_on_interrupt(plan_file: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = dict(os.environ, PQCTL_STATE_DIR=str(state), COLUMNS="200")
    argv = [
        sys.executable,
        "-m",
        "pqctl",
        "apply",
        str(plan_file),
        "--endpoint",
        "tcp://127.0.0.1:*",
    ]
    process = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            out = pqctl(state, "generate", "ROMEO:", "--max-new", "4", "--timeout", "5")
            if out.returncode == 0:
                break
            time.sleep(0.5)
        assert out.returncode == 0, out.stderr
        gateway = DeploymentState.load("default", state).pid
        time.sleep(1.5)  # one refresh of the live table
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert "per-stage throughput" in stdout and "127.0.0.1/cpu" in stdout
        assert not pid_alive(gateway)
        assert not (state / "default.json").exists()
    finally:
        if process.poll() is None:
            process.kill()
        _cleanup(state)


def test_apply_reports_a_stage_that_cannot_load(tmp_path: Path) -> None:
    state = tmp_path / "state"
    checkpoint = Path(shutil.copytree(builtin_model_dir(), tmp_path / "model"))
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = json.loads(serving_plan("bard-tiny", [0, 4]).to_json())
    data["model"]["source"] = str(checkpoint)
    path = write_plan(Plan.from_dict(data), tmp_path)
    try:
        out = pqctl(state, "apply", str(path), "--detach", "--endpoint", "tcp://127.0.0.1:*")
        assert out.returncode == 4, out.stderr
        # Both stages find the file truncated; whichever reports first is named.
        assert re.search(
            r"stage [01] \(cpu on [a-z0-9.]+, layers [0-7]–[0-7]\) failed: bad checkpoint",
            out.stderr,
        )
        assert "truncated" in out.stderr
        assert not (state / "default.json").exists()
    finally:
        _cleanup(state)


def test_apply_refuses_bad_plans_and_other_hosts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1}')
    out = pqctl(state, "apply", str(bad))
    assert out.returncode == 2 and "invalid plan" in out.stderr

    plan = serving_plan("bard-tiny", [0, 4]).to_dict()
    plan["stages"][1]["device"]["host"] = "gpu-node-7"
    remote = tmp_path / "remote.json"
    remote.write_text(json.dumps(plan))
    out = pqctl(state, "apply", str(remote))
    assert out.returncode == 2
    assert "the plan puts stages on gpu-node-7" in out.stderr
    assert not state.exists() or not list(state.glob("*.json"))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--heartbeat-timeout", "1"], "--heartbeat-timeout"),  # < twice the 1 s interval
        (["--heartbeat-interval", "3", "--heartbeat-timeout", "5"], "--heartbeat-timeout"),
        (["--restart-window", "0"], "--restart-window"),
    ],
)
def test_apply_refuses_bad_supervision_options_naming_the_flag(
    tmp_path: Path, plan_file: Path, flags: list[str], named: str
) -> None:
    out = pqctl(tmp_path / "state", "apply", str(plan_file), *flags)
    assert out.returncode == 2, out.stderr
    assert named in out.stderr
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").glob("*.json"))


def test_loading_state_names_the_parts_loaded() -> None:
    assert load_state({"state": "loading", "loaded": [2, 6]}) == "loading 2/6"
    assert load_state({"state": "loading", "loaded": None}) == "loading"
    assert load_state({"state": "ready", "loaded": [6, 6]}) == "ready"


def _group(pgid: int) -> set[int]:
    """Live processes of process group ``pgid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def test_a_killed_gateway_is_restarted_and_its_clients_told_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("PQCTL_STATE_DIR", str(state))
    plan = write_plan(serving_plan("bard-tiny", [0, 4], batch=4, max_new=256), tmp_path)
    try:
        up = pqctl(state, "apply", str(plan), "--detach", "--endpoint", "tcp://127.0.0.1:*")
        assert up.returncode == 0, up.stderr
        first = DeploymentState.load("default", state)
        stages = _group(first.pid) - {first.pid, first.gateway_pid}
        assert len(stages) == 2
        with Client(timeout_s=60) as client:
            pieces = client.stream("ROMEO:", max_new_tokens=256, ignore_eos=True)
            next(pieces)  # in flight
            os.kill(first.gateway_pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ConnectionLost):
                for _ in pieces:
                    pass
            assert time.monotonic() - killed < 3
            # the next request is served by a new gateway on the same endpoint, unasked
            done = client.generate("KING:", max_new_tokens=8)
            assert done.usage["completion_tokens"] >= 1
        after = DeploymentState.load("default", state)
        assert (after.pid, after.client_endpoint) == (first.pid, first.client_endpoint)
        assert after.status_endpoint == first.status_endpoint
        assert after.gateway_pid != first.gateway_pid and after.gateway_restarts == 1
        assert not any(pid_alive(p) for p in stages)  # the old stages went with their gateway
        assert "restarting it on" in (Path(after.log_dir) / "gateway.log").read_text()
        assert pqctl(state, "stop").returncode == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group(first.pid):
            time.sleep(0.1)
        assert not _group(first.pid)
    finally:
        _cleanup(state)


def _listening_tcp_ports(pids: set[int]) -> set[int]:
    """TCP ports the processes ``pids`` listen on (from their sockets' inodes)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_stage_process_holds_what_the_plan_predicts(tmp_path: Path) -> None:
    """The plan's per-stage process_bytes (weights, KV cache, activations and the runtime's own
    baseline) is within 15 % of the stage process's peak resident memory once it has served."""
    state = tmp_path / "state"
    plan_path = tmp_path / "plan.json"
    made = pqctl(state, "plan", "--local", "--bits", "16", "-o", str(plan_path))
    assert made.returncode == 0, made.stderr
    (stage,) = Plan.load(plan_path).stages
    try:
        up = pqctl(state, "apply", str(plan_path), "--detach", "--endpoint", "tcp://127.0.0.1:*")
        assert up.returncode == 0, up.stderr
        assert pqctl(state, "generate", "ROMEO:", "KING:", "-n", "16").returncode == 0
        (row,) = json.loads(pqctl(state, "status", "--json").stdout)
        status = Path(f"/proc/{row['stages'][0]['pid']}/status").read_text()
        peak = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) << 10
        predicted = stage.predicted.process_bytes
        assert abs(predicted - peak) <= 0.15 * peak, (predicted >> 20, peak >> 20)
        assert pqctl(state, "stop").returncode == 0
    finally:
        _cleanup(state)
