"""Starting a deployment's processes: its gateway, and stage workers behind an interface, so a
stage can be started on another host.

:func:`start_gateway` starts ``python -m runtime.serve.gateway`` for ``pqctl apply`` and the
dashboard alike. :class:`LocalLauncher` starts each stage as a child process of the gateway on
this host; :class:`runtime.serve.ray_launcher.RayLauncher` (``--ray``) implements the same
:class:`Launcher` protocol with a Ray actor on the stage's host.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from runtime.errors import RuntimeFailure
from runtime.serve.deployment import DeploymentError, DeploymentState

BEAT_INTERVAL_S = 1.0
"""Default seconds between a stage's heartbeats."""
BEAT_TIMEOUT_S = 4.0
"""Default silence after which a serving stage is lost: a hung stage's requests fail within
5 s."""
MAX_RESTARTS = 3
"""Default stage failures restarted within :data:`RESTART_WINDOW_S`; one more ends it."""
RESTART_WINDOW_S = 600.0


class RestartWindow:
    """Failures counted over a sliding window: more than ``allowed`` within ``window_s``
    seconds exhaust it (failures further apart do not add up). The gateway counts its stages'
    failures so, the supervisor its gateway's."""

    def __init__(self, allowed: int, window_s: float) -> None:
        self.allowed, self.window_s = allowed, window_s
        self.times: collections.deque[float] = collections.deque()

    def fail(self) -> int:
        """Count a failure now; the failures within the window, this one included."""
        now = time.monotonic()
        self.times.append(now)
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        return len(self.times)

    @property
    def exhausted(self) -> bool:
        return len(self.times) > self.allowed


IPC_PREFIX = "ipc://"
MAX_IPC_PATH = 100  # under the 107 bytes a Unix socket path may have, with room for names


def bind_endpoint(bind: str, name: str) -> str:
    """Where an internal socket named ``name`` binds: ``bind`` is a host address (a TCP port
    picked by the system) or ``ipc://DIR``, a deployment's private directory (a Unix socket
    ``DIR/name``: only its owner can connect)."""
    if bind.startswith(IPC_PREFIX):
        return f"{bind}/{name}"
    return f"tcp://{bind}:*"


def make_run_dir() -> Path | None:
    """A fresh private directory (mode 0700) for a deployment's Unix sockets; None where the
    temporary directory's path is too long for one."""
    path = Path(tempfile.mkdtemp(prefix="pqctl-"))
    if len(str(path)) + 20 > MAX_IPC_PATH:
        path.rmdir()
        return None
    return path


@dataclass(frozen=True, slots=True)
class StageLaunch:
    """What a stage worker needs to start."""

    plan: Path
    stage: int
    control: str
    bind_host: str = "127.0.0.1"
    checkpoint: Path | None = None
    keys: Path | None = None
    log: Path | None = None
    impl: str = "auto"
    threads: int | None = None  # CPU threads for the stage's kernels (None: torch's default)
    beat_interval_s: float | None = None  # heartbeat period (None: the worker's default)
    max_frame_bytes: int | None = None  # largest step frame its data socket accepts

    def argv(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "runtime.serve.worker",
            "--plan",
            str(self.plan),
            "--stage",
            str(self.stage),
            "--control",
            self.control,
            "--bind-host",
            self.bind_host,
            "--impl",
            self.impl,
        ]
        if self.checkpoint is not None:
            args += ["--checkpoint", str(self.checkpoint)]
        if self.keys is not None:
            args += ["--keys", str(self.keys)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.beat_interval_s is not None:
            args += ["--beat-interval", repr(self.beat_interval_s)]
        if self.max_frame_bytes is not None:
            args += ["--max-frame-bytes", str(self.max_frame_bytes)]
        return args


class StageHandle(Protocol):
    """A started stage worker."""

    @property
    def pid(self) -> int: ...

    def exit_code(self) -> int | None:
        """None while it runs."""
        ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts stage workers wherever their device is."""

    def start(self, launch: StageLaunch) -> StageHandle: ...


class LocalProcess:
    """A stage worker that is a child process on this host."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


API_KEY_ENV = "PQCTL_API_KEY"
"""The environment variable holding the key the HTTP endpoint requires (unset: none)."""


def child_env() -> dict[str, str]:
    """This process's environment, with the project root importable (runs from a checkout)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _spawn(
    argv: list[str], out: IO[bytes] | int, env: dict[str, str], *, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with no standard input, its output and errors to ``out``."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=new_session,
    )


class LocalLauncher:
    """Starts stage workers as child processes, stdout/stderr to a log file per stage."""

    def start(self, launch: StageLaunch) -> LocalProcess:
        env = child_env()
        if launch.threads is not None:  # OpenMP / MKL pools sized before torch starts them
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(launch.threads)
        out = open(launch.log, "ab") if launch.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            process = _spawn(launch.argv(), out, env)
        finally:
            if launch.log:
                out.close()  # type: ignore[union-attr]
        return LocalProcess(process)


def available_cores() -> int:
    """The CPU cores this process may use: those it may run on, at most ``OMP_NUM_THREADS``
    where the operator set it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(cores, int(cap)) if cap.isdigit() and int(cap) > 0 else cores


def stages_take_turns(global_batch: int, prefill_size: int) -> bool:
    """Whether a plan's stages never compute at once: its whole batch is one prefill micro-batch
    (and so one decode micro-batch), so a single micro-batch is ever in the pipeline."""
    return global_batch <= prefill_size


def stage_threads(cpu_stages: list[int], cores: int, *, take_turns: bool = False) -> dict[int, int]:
    """CPU threads for each of ``cpu_stages`` sharing ``cores``: the cores split evenly (at
    least one each) when there are several, so the stages' kernels run side by side instead of
    every stage's thread pool contending for every core; every core for each when the stages
    take turns (:func:`stages_take_turns`: only one computes at a time, and an idle OpenMP pool
    sleeps after a short spin); none when one stage has the CPU."""
    if len(cpu_stages) < 2:
        return {}
    share = cores if take_turns else max(1, cores // len(cpu_stages))
    return {index: share for index in cpu_stages}


def stop_all(handles: list[StageHandle], grace_s: float = 5.0) -> None:
    """Ask every worker to stop, then kill those still running after ``grace_s``."""
    for handle in handles:
        handle.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(h.exit_code() is None for h in handles):
        time.sleep(0.05)
    for handle in handles:
        if handle.exit_code() is None:
            handle.kill()


@dataclass(frozen=True, slots=True)
class GatewayLaunch:
    """What a deployment's gateway needs to start; it then starts the plan's stages."""

    plan: Path
    name: str
    endpoint: str
    restarts: int | None = None  # restarts of a failed stage (None: the gateway's default)
    keys: Path | None = None
    ray: str | None = None  # start stages through the Ray cluster at this address
    replan_on_loss: bool = False  # with ray: re-plan on the hosts left when one is lost
    beat_interval_s: float | None = None  # stage heartbeat period (None: the default)
    beat_timeout_s: float | None = None  # silence after which a stage is lost (None: default)
    restart_window_s: float | None = None  # restarts counted over this window (None: default)
    http: str | None = None  # HOST:PORT of the OpenAI-compatible HTTP endpoint (runtime.serve.http)
    api_key: str | None = None  # the key the HTTP endpoint requires (passed in the environment)

    def argv(self) -> list[str]:
        """The supervisor's command line, the gateway's after its ``--``."""
        supervisor = [sys.executable, "-m", "runtime.serve.supervisor", "--name", self.name]
        supervisor += ["--restarts", str(MAX_RESTARTS if self.restarts is None else self.restarts)]
        if self.http is not None:
            supervisor += ["--http", self.http]
        window = RESTART_WINDOW_S if self.restart_window_s is None else self.restart_window_s
        return [*supervisor, "--restart-window", repr(window), "--", *self.gateway_argv()]

    def gateway_argv(self) -> list[str]:
        args = [sys.executable, "-m", "runtime.serve.gateway", "--plan", str(self.plan)]
        args += ["--name", self.name, "--endpoint", self.endpoint]
        if self.http is not None:
            args += ["--http-endpoint", self.http]
        if self.restarts is not None:
            args += ["--restarts", str(self.restarts)]
        if self.keys is not None:
            args += ["--keys", str(self.keys)]
        if self.ray is not None:
            args += ["--ray", self.ray]
        if self.replan_on_loss:
            args.append("--replan-on-loss")
        for flag, value in (
            ("--beat-interval", self.beat_interval_s),
            ("--beat-timeout", self.beat_timeout_s),
            ("--restart-window", self.restart_window_s),
        ):
            if value is not None:
                args += [flag, repr(value)]
        return args


class GatewayExited(RuntimeFailure):
    """The gateway exited before it wrote its state file."""

    title = "gateway did not start"

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"exit code {exit_code}")
        self.exit_code = exit_code


def start_gateway(launch: GatewayLaunch, log: Path) -> subprocess.Popen[bytes]:
    """Start the deployment's supervisor (which starts the gateway and restarts it if it dies)
    in a session of its own, so that it outlives a detached caller and a Ctrl-C reaches it only
    when relayed; its output and the gateway's go to ``log``."""
    env = child_env()
    if launch.api_key:
        env[API_KEY_ENV] = launch.api_key  # never on a command line (ps shows those)
    with open(log, "wb") as out:
        return _spawn(launch.argv(), out, env, new_session=True)


def wait_for_gateway(
    process: subprocess.Popen[bytes],
    name: str,
    timeout_s: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> DeploymentState | None:
    """The state of deployment ``name`` once the gateway ``process`` has bound its sockets and
    written its state file; None when ``timeout_s`` passes or ``cancelled()`` first.

    Raises:
        GatewayExited: the gateway exited before that.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not cancelled():
        code = process.poll()
        if code is not None:
            raise GatewayExited(code)
        with contextlib.suppress(DeploymentError):
            state = DeploymentState.load(name)
            if state.pid == process.pid:
                return state
        time.sleep(0.1)
    return None


def log_tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
