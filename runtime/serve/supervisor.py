"""The process that owns a deployment: it runs the gateway and restarts it when it dies.

``pqctl apply`` (detached or not) and the dashboard start ``python -m runtime.serve.supervisor``
in a session of its own; it starts the gateway as its child and waits. When the gateway dies
unexpectedly (a signal such as ``kill -9``, or a crash once it had written its state file), the
supervisor ends what the gateway had started on this host (its stage processes; stages on Ray
die with their owner) and starts a new gateway on the same client and status endpoints with the
plan it was serving. Clients in flight see their connection drop (the Python client raises at
once); the next request is served once the new gateway's stages are ready. Restarts are counted
in a sliding window; one more than ``--restarts`` within ``--restart-window`` ends the
deployment. A clean exit of the gateway (stopped: 0; its stages failed past their budget: 4; it
could not start: 1 before any state file) ends the supervisor with the same code.

The deployment's state file names the supervisor's pid (``pid``: what ``pqctl stop`` signals,
and the process group it kills last) and the current gateway's (``gateway_pid``). Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from runtime.serve.deployment import DeploymentError, DeploymentState, state_dir
from runtime.serve.launcher import API_KEY_ENV, MAX_RESTARTS, RESTART_WINDOW_S, RestartWindow

EXIT_GAVE_UP = 4


class Supervisor:
    """Runs ``gateway_argv`` until it exits cleanly, restarting it after a crash."""

    def __init__(
        self,
        gateway_argv: list[str],
        name: str,
        restarts: int,
        window_s: float,
        http: str | None = None,
    ) -> None:
        self.argv, self.name = gateway_argv, name
        self.restarts, self.window_s = restarts, window_s
        self.failures = RestartWindow(restarts, window_s)
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.http = http
        self.http_child: subprocess.Popen[bytes] | None = None
        self.http_failures = RestartWindow(restarts, window_s)

    def stop(self, *_: object) -> None:
        """SIGTERM / SIGINT: relay a stop to the gateway (it stops its stages), then exit."""
        self.stopping = True
        for child in (self.child, self.http_child):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self._end_http()

    def _start_http(self) -> None:
        """The HTTP endpoint (runtime.serve.http): it binds at once, then serves the gateway
        this supervisor runs, through any restart of it. The API key stays in its environment
        and out of the gateway's."""
        assert self.http is not None
        argv = [sys.executable, "-m", "runtime.serve.http", "--name", self.name]
        argv += ["--listen", self.http, "--owner-pid", str(os.getpid())]
        self.http_child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def _check_http(self) -> None:
        """Restart the HTTP endpoint if it died, within its own restart budget."""
        child = self.http_child
        if child is None or child.poll() is None or self.stopping:
            return
        failures = self.http_failures.fail()
        if self.http_failures.exhausted:
            _say(f"the HTTP endpoint exited ({_describe(child.returncode)}) {failures} times; "
                 "not restarting it (the ZeroMQ endpoint still serves)")  # fmt: skip
            self.http_child = None
            return
        _say(f"the HTTP endpoint exited ({_describe(child.returncode)}); restarting it")
        self._start_http()

    def _end_http(self) -> None:
        child = self.http_child
        if child is None:
            return
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _run(self) -> int:
        extra: list[str] = ["--owner-pid", str(os.getpid())]
        gateway_env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        if self.http is not None:
            self._start_http()
        while True:
            self.child = subprocess.Popen(
                [*self.argv, *extra], stdin=subprocess.DEVNULL, env=gateway_env
            )
            code = self._wait(self.child)
            state = self._state()
            if self.stopping or (code >= 0 and (code != 1 or state is None)):
                return code
            _end_leftovers(keep={self.http_child.pid} if self.http_child else set())
            if state is None:
                _say(f"the gateway exited ({_describe(code)}) before it served; not restarting")
                return code if code > 0 else 1
            failures = self.failures.fail()
            if self.failures.exhausted:
                _say(
                    f"the gateway exited ({_describe(code)}): {failures} failures "
                    f"within {self.window_s:g} s, more than --restarts {self.restarts}; "
                    "the deployment ends"
                )
                state.remove()
                return EXIT_GAVE_UP
            _say(
                f"the gateway (pid {self.child.pid}) exited ({_describe(code)}); restarting it "
                f"on {state.client_endpoint} ({failures}/{self.restarts} within "
                f"{self.window_s:g} s)"
            )
            extra = [
                "--owner-pid", str(os.getpid()),
                "--plan", state.plan,
                "--endpoint", state.client_endpoint,
                "--status-endpoint", state.status_endpoint,
                "--deployment-started", repr(state.started),
                "--gateway-restarts", str(state.gateway_restarts + 1),
            ]  # fmt: skip
            if state.run_dir:
                extra += ["--run-dir", state.run_dir]

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self._check_http()
            except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled by stop()
                continue

    def _state(self) -> DeploymentState | None:
        """The state file the gateway left for this deployment, if it is this supervisor's."""
        try:
            state = DeploymentState.load(self.name)
        except DeploymentError:
            return None
        return state if state.pid == os.getpid() else None


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _say(message: str) -> None:
    print(f"supervisor: {message}", file=sys.stderr, flush=True)


def _end_leftovers(keep: set[int]) -> None:
    """SIGKILL every other process of this process group (the dead gateway's stage workers)
    but those in ``keep`` (the HTTP endpoint, which outlives a gateway)."""
    group, me = os.getpgrp(), os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep | {me}:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # reap whatever was ours
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve.supervisor", description=__doc__)
    parser.add_argument("--name", required=True, help="the deployment's name")
    parser.add_argument(
        "--restarts", type=int, default=MAX_RESTARTS, help="gateway restarts in the window"
    )
    parser.add_argument("--restart-window", type=float, default=RESTART_WINDOW_S, help="seconds")
    parser.add_argument(
        "--http", default=None, help="HOST:PORT: also run the HTTP endpoint (runtime.serve.http)"
    )
    parser.add_argument("gateway", nargs=argparse.REMAINDER, help="-- then the gateway's argv")
    args = parser.parse_args(argv)
    gateway = args.gateway[1:] if args.gateway[:1] == ["--"] else args.gateway
    if not gateway:
        parser.error("give the gateway's command after --")
    state_dir().mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(gateway, args.name, args.restarts, args.restart_window, args.http)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
