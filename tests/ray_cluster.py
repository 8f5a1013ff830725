"""A real multi-node Ray cluster for the tests, in a network namespace of its own.

``python -m tests.ray_cluster HOST...`` (run inside the namespace) starts one Ray node per host
with ``ray.cluster_utils.Cluster``, each carrying the custom resource ``pqctl-host-HOST`` that
names it, prints one JSON line ``{"address": ..., "hosts": [...]}``, then obeys lines on its
standard input: ``remove HOST`` removes that node (answering ``removed HOST``); ``stop`` or the
end of input shuts the cluster down (answering ``down``).

:class:`RayNamespace` starts that script under ``unshare -n`` (loopback only: every address Ray
and ZeroMQ use is 127.0.0.1), runs commands inside the same namespace with ``nsenter``, and on
close kills every process left in the namespace, so that no Ray process outlives the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def namespaces_available() -> str:
    """Empty when this machine can make a network namespace, else why not."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(
        ["unshare", "-n", "true"], capture_output=True, text=True, timeout=10, check=False
    )
    return "" if probe.returncode == 0 else f"unshare -n failed: {probe.stderr.strip()}"


class RayNamespace:
    """A Ray cluster of ``hosts`` in a network namespace; commands run inside it."""

    def __init__(self, hosts: Sequence[str], start_timeout_s: float = 90.0) -> None:
        names = " ".join(hosts)
        script = f"ip link set lo up && exec {sys.executable} -m tests.ray_cluster {names}"
        self.temp_dir = tempfile.mkdtemp(prefix="pqray")  # short: Ray's socket paths live here
        self.env = {**os.environ, "RAY_TMPDIR": self.temp_dir}
        self.env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", script],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.namespace = f"/proc/{self.process.pid}/ns/net"
        try:
            ready = json.loads(self._line(start_timeout_s))
        except BaseException:
            self.close()
            raise
        self.address: str = ready["address"]
        self.hosts: list[str] = ready["hosts"]

    def _line(self, timeout_s: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the Ray cluster did not answer within {timeout_s:g} s")
        return line

    def run(
        self, command: Sequence[str], timeout_s: float = 120.0, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """``command`` inside the namespace (its output captured as text; the environment is
        the cluster's unless ``env`` is given)."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            ["nsenter", f"--net={self.namespace}", *command],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            **kwargs,
        )

    def popen(self, command: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """``command`` started inside the namespace."""
        kwargs.setdefault("env", self.env)
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            ["nsenter", f"--net={self.namespace}", *command], text=True, **kwargs
        )

    def remove(self, host: str, timeout_s: float = 60.0) -> None:
        """Remove that host's Ray node (the others stay)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"remove {host}\n")
        self.process.stdin.flush()
        answer = self._line(timeout_s).strip()
        if answer != f"removed {host}":
            raise RuntimeError(f"removing {host}: {answer}")

    def close(self) -> None:
        """Shut the cluster down, then kill whatever still runs in the namespace."""
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=60)
        self._kill_namespace()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def processes(self) -> list[int]:
        """Every process in the namespace but the cluster's own script (none once it ended)."""
        try:
            ours = os.readlink(self.namespace)
        except OSError:
            return []
        return [pid for pid in _pids() if _netns(pid) == ours and pid != self.process.pid]

    def _kill_namespace(self) -> None:
        for _ in range(3):
            left = self.processes()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def __enter__(self) -> RayNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def main(hosts: Sequence[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {f"pqctl-host-{hosts[0]}": 1},
            "include_dashboard": False,
        },
    )
    nodes: dict[str, Any] = {hosts[0]: cluster.head_node}
    for host in hosts[1:]:
        nodes[host] = cluster.add_node(num_cpus=1, resources={f"pqctl-host-{host}": 1})
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "hosts": list(hosts)}), flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["remove"] and len(words) == 2 and words[1] in nodes:
                cluster.remove_node(nodes.pop(words[1]))
                print(f"removed {words[1]}", flush=True)
            elif words[:1] == ["stop"]:
                break
            else:
                print(f"unknown command: {line.strip()}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        print("down", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
