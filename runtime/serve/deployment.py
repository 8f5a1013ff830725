"""Where a running deployment can be found: a state file per deployment name.

The gateway writes ``<state dir>/<name>.json`` once its sockets are bound and removes it when
it exits. ``pqctl generate`` reads the client endpoint from it, ``pqctl stop`` the pid of the
deployment's supervisor (:mod:`runtime.serve.supervisor`, which restarts a dead gateway), the
dashboard and ``pqctl apply`` the status endpoint. The state directory is
``$PQCTL_STATE_DIR``, else ``$XDG_STATE_HOME/pqctl``, else ``~/.local/state/pqctl``.
No torch here: clients import this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_NAME = "default"


class DeploymentError(RuntimeError):
    """No such deployment, or a state file that cannot be read."""


def state_dir() -> Path:
    """The directory holding the state files of running deployments."""
    if os.environ.get("PQCTL_STATE_DIR"):
        return Path(os.environ["PQCTL_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pqctl"


def check_name(name: str) -> str:
    """A deployment name: letters, digits, ``_ . -``, at most 64 characters."""
    if not NAME_PATTERN.match(name):
        raise DeploymentError(
            f'deployment name "{name}" must be 1-64 letters, digits, "_", "." or "-"'
        )
    return name


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What the gateway publishes about itself."""

    name: str
    pid: int
    plan: str
    model: str
    client_endpoint: str
    status_endpoint: str
    started: float
    log_dir: str
    keys: str | None = None
    internal_keys: str | None = None  # the deployment's own keys (status, stages), with keys
    run_dir: str | None = None  # private directory of its internal Unix sockets (one host)
    gateway_pid: int = 0  # the gateway now serving (``pid`` is the deployment's supervisor)
    gateway_restarts: int = 0  # times the supervisor restarted a dead gateway
    control_endpoint: str | None = None  # the gateway's control ROUTER (stages; the operator)
    http_endpoint: str | None = None  # the OpenAI-compatible HTTP endpoint, HOST:PORT

    def save(self, directory: Path | None = None) -> Path:
        """Write atomically (readers never see half a file)."""
        directory = directory or state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, name: str = DEFAULT_NAME, directory: Path | None = None) -> DeploymentState:
        """The state of a running deployment.

        Raises:
            DeploymentError: none is running under that name, or its file is unreadable.
        """
        path = (directory or state_dir()) / f"{check_name(name)}.json"
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DeploymentError(
                f'no deployment "{name}" is running (no {path}); start one with pqctl apply'
            ) from None
        except (OSError, ValueError) as exc:
            raise DeploymentError(f"{path}: unreadable state file ({exc})") from None
        try:
            state = cls(**data)
        except TypeError as exc:
            raise DeploymentError(f"{path}: unexpected state file ({exc})") from None
        if not pid_alive(state.pid):
            path.unlink(missing_ok=True)
            raise DeploymentError(
                f'deployment "{name}" is not running (its process, pid {state.pid}, is gone)'
            )
        return state

    def monitor_keys_dir(self) -> Path | None:
        """The key directory a tool on this host watches the deployment's status with."""
        return Path(self.internal_keys) if self.internal_keys else None

    def remove(self, directory: Path | None = None) -> None:
        """Remove the state file (while it is still this deployment's) and the private
        directory of its Unix sockets."""
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        path = (directory or state_dir()) / f"{self.name}.json"
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == self.pid:
                path.unlink()
        except (OSError, ValueError):
            pass


def running_deployments(directory: Path | None = None) -> list[DeploymentState]:
    """Every deployment running on this host (its state file's process alive), by name; the
    state files of those that died are removed."""
    found = []
    for path in sorted((directory or state_dir()).glob("*.json")):
        if not NAME_PATTERN.match(path.stem):
            continue
        with contextlib.suppress(DeploymentError):
            found.append(DeploymentState.load(path.stem, directory))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_deployment(state: DeploymentState, timeout_s: float = 20.0) -> bool:
    """Ask the deployment to shut down (SIGTERM to its supervisor, which stops the gateway,
    which stops its stages) and wait; SIGKILL its process group after ``timeout_s``. Returns
    whether it stopped cleanly."""
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(state.pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(state.pid, signal.SIGKILL)
    state.remove()
    return False
