"""Starting and stopping the deployment the dashboard owns.

The gateway is started as ``pqctl apply --detach`` starts it
(:func:`runtime.serve.launcher.start_gateway`: ``python -m runtime.serve.gateway`` in a new
session); it then starts one process per stage. The dashboard watches it through
:class:`runtime.serve.monitor.Monitor` and stops it on request and on exit. Everything here
blocks: call it from a thread worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from planner.plan import Plan
from pqctl.tui.telemetry import local_host_names
from runtime.serve.deployment import (
    DeploymentError,
    DeploymentState,
    pid_alive,
    state_dir,
    stop_deployment,
)
from runtime.serve.launcher import (
    API_KEY_ENV,
    GatewayExited,
    GatewayLaunch,
    log_tail,
    start_gateway,
    wait_for_gateway,
)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:*"
"""The dashboard binds any free port on loopback; the Serve view shows the one it got."""


class LaunchError(RuntimeError):
    """The deployment could not be started; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Launched:
    """A running deployment the dashboard watches: one it started (``process``, its supervisor;
    stopped when the dashboard quits) or one it attached to by name (``process`` None; left
    running when the dashboard quits)."""

    process: subprocess.Popen[bytes] | None
    state: DeploymentState
    plan_file: Path
    log: Path

    @property
    def log_dir(self) -> Path:
        return self.log.parent

    @property
    def owned(self) -> bool:
        """Whether this dashboard started it (and stops it when it quits)."""
        return self.process is not None

    def exit_code(self) -> int | None:
        """None while the deployment runs."""
        if self.process is not None:
            return self.process.poll()
        return None if pid_alive(self.state.pid) else 0


def attach(name: str) -> Launched:
    """The running deployment ``name`` (started by pqctl apply or another dashboard).

    Raises:
        LaunchError: none runs under that name.
    """
    try:
        state = DeploymentState.load(name)
    except DeploymentError as exc:
        raise LaunchError(str(exc)) from exc
    return Launched(None, state, Path(state.plan), Path(state.log_dir) / "gateway.log")


def remote_hosts(plan: Plan) -> list[str]:
    """Hosts of the plan's stages that are not this host (they need Ray to start)."""
    local = local_host_names()
    return sorted({s.device.host for s in plan.stages if s.device.host not in local})


def free_name(base: str = "dashboard") -> str:
    """``base``, or ``base-2``, ``base-3``... : the first name no running deployment uses."""
    for n in range(1, 100):
        name = base if n == 1 else f"{base}-{n}"
        try:
            DeploymentState.load(name)
        except DeploymentError:
            return name
    raise LaunchError(f"99 deployments named {base}-N are running; stop some with pqctl stop")


def launch(
    plan: Plan,
    name: str,
    endpoint: str = DEFAULT_ENDPOINT,
    timeout_s: float = 60.0,
    cancelled: Callable[[], bool] = lambda: False,
    ray: str | None = None,
    http: str | None = None,
) -> Launched:
    """Start the gateway of ``plan`` and wait until its state file appears (sockets bound).
    With ``http`` (HOST:PORT) the deployment also serves the OpenAI-compatible HTTP API there,
    guarded by ``$PQCTL_API_KEY`` when set.

    Stages load afterwards: follow them with a Monitor on ``state.status_endpoint``.

    Raises:
        LaunchError: stages on other hosts, the gateway exited, or no state file in time.
    """
    remote = remote_hosts(plan)
    if remote and ray is None:
        raise LaunchError(
            f"the plan puts stages on {', '.join(remote)}, not this host; open the dashboard "
            "over their Ray cluster (pqctl --ray HOST:PORT) to launch there, or plan on this "
            "host (no cluster file) to serve here."
        )
    logs = state_dir() / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    plan_file, log = logs / "plan.json", logs / "gateway.log"
    plan.save(plan_file)
    launch = GatewayLaunch(
        plan_file, name, endpoint, ray=ray, replan_on_loss=ray is not None, http=http,
        api_key=os.environ.get(API_KEY_ENV) if http else None,
    )  # fmt: skip
    process = start_gateway(launch, log)
    try:
        state = wait_for_gateway(process, name, timeout_s, cancelled)
    except GatewayExited as exc:
        raise LaunchError(
            f"the gateway exited ({exc.exit_code}): {log_tail(log, 8) or 'no output'}"
        ) from exc
    if state is not None:
        return Launched(process, state, plan_file, log)
    _kill(process)
    if cancelled():
        raise LaunchError("launch cancelled")
    raise LaunchError(f"the gateway wrote no state file in {timeout_s:.0f} s; see {log}")


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def stop(launched: Launched, timeout_s: float = 20.0) -> bool:
    """Stop the deployment (its supervisor stops the gateway, which stops its stages) and reap
    it; whether it stopped cleanly."""
    clean = stop_deployment(launched.state, timeout_s)
    if launched.process is None:
        return clean
    try:
        launched.process.wait(5)
    except subprocess.TimeoutExpired:
        _kill(launched.process)
        clean = False
    return clean
