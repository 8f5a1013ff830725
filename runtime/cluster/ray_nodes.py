"""The nodes of a Ray cluster as pqctl uses them: connect (failing fast with the address named
when nothing answers), list the alive nodes, run a function pinned to each node, and measure the
link between every two hosts with a ZeroMQ ping-pong between two pinned actors.

Ray is an optional dependency (``pip install 'pqctl[ray]'``): it is imported only here, only
when a Ray address is given. Every remote call is pinned with node-affinity scheduling that is
not soft (a node that disappears fails the call rather than moving it), asks for no CPU (an
inventory must work on a cluster whose CPUs are busy), and is waited for with a timeout.

A node's host name is the value of a ``pqctl-host-NAME`` custom resource when it has one (so
simulated hosts on one machine, or nodes whose hostnames say nothing, get the names an operator
chose: ``ray start --resources='{"pqctl-host-gpu-a": 1}'``), else its hostname; repeated names
get ``-2``, ``-3``... in the order of their node ids.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAY_INSTALL_HINT = "install Ray with: pip install 'pqctl[ray]'"
HOST_RESOURCE_PREFIX = "pqctl-host-"

_ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+):(?P<port>\d{1,5})$")
PING_SIZES = (4 * 1024, 1024**2, 8 * 1024**2)
"""Message sizes of the link measurement, bytes: latency from the first, bandwidth from the
slope through all three."""


class RayClusterError(RuntimeError):
    """Ray is missing, not reachable, or a node did not answer: ``str()`` says which and what
    to do."""


@dataclass(frozen=True, slots=True)
class RayNode:
    """One alive node: its Ray id, the host name pqctl gives it, its address and resources."""

    node_id: str
    host: str
    hostname: str
    ip: str
    resources: Mapping[str, float]

    @property
    def cpus(self) -> int:
        """The CPUs this node offers Ray (at least 1)."""
        return max(1, int(self.resources.get("CPU", 1)))


@dataclass(frozen=True, slots=True)
class LinkFit:
    """A link between two hosts fitted as one-way time = latency + bytes / bandwidth, from the
    best round trip per message size (``samples``: size in bytes, seconds)."""

    latency_s: float
    bandwidth_gb_s: float
    samples: tuple[tuple[int, float], ...]


def resolve_address(address: str) -> str:
    """``HOST:PORT`` as given, or for ``auto`` the ``RAY_ADDRESS`` environment variable, else the
    head this machine started (``ray start --head``)."""
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS", "").strip()
        recorded = current_cluster_file()
        if not found and recorded.is_file():
            found = recorded.read_text().strip()
        if not found:
            raise RayClusterError(
                "--ray auto: RAY_ADDRESS is not set and no Ray head was started on this machine; "
                "give the head's address (--ray HOST:6379)"
            )
        address = found
    address = address.removeprefix("ray://")
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise RayClusterError(f'--ray: "{address}" is not HOST:PORT (e.g. 10.0.0.1:6379) or auto')
    return address


def current_cluster_file() -> Path:
    """Where ``ray start --head`` records the address of the head it started: ``ray`` under
    ``RAY_TMPDIR``, else ``TMPDIR``, else ``/tmp`` (Ray's own rule)."""
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(temp) / "ray" / "ray_current_cluster"


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A TCP connection to the Ray head's port, so that a wrong address fails in seconds (Ray
    itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayClusterError(
            f"Ray is not reachable at {address} ({exc.strerror or exc}); start it there "
            "(ray start --head) or give the head's address"
        ) from exc


def ray_module() -> Any:
    """The ray package (imported on first use; a clear error naming the extra when absent)."""
    try:
        import ray
    except ImportError as exc:
        raise RayClusterError(
            f"--ray needs Ray, which is not installed; {RAY_INSTALL_HINT}"
        ) from exc
    return ray


def node_ip() -> str:
    """The address of the Ray node this process runs on."""
    return str(ray_module().util.get_node_ip_address())


def connect(address: str) -> str:
    """Connect this process to the Ray cluster at ``address`` (or ``auto``) as a driver; the
    resolved address. Starts no Ray process of its own; ``ray_module().shutdown()`` ends it."""
    resolved = resolve_address(address)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # before Ray's core starts
    ray = ray_module()
    check_reachable(resolved)
    with _real_std_streams():
        ray.init(
            address=resolved,
            logging_level="ERROR",
            log_to_driver=False,
            configure_logging=True,
            namespace="pqctl",
        )
    return resolved


@contextlib.contextmanager
def _real_std_streams() -> Iterator[None]:
    """Ray's start-up needs file descriptors behind ``sys.stdout`` and ``sys.stderr``; a
    terminal UI (Textual) replaces them with objects that have none: the process's own streams
    stand in meanwhile."""
    saved = sys.stdout, sys.stderr
    for name in ("stdout", "stderr"):
        try:
            os.fstat(getattr(sys, name).fileno())
        except (AttributeError, OSError, ValueError, RuntimeError):
            setattr(sys, name, getattr(sys, f"__{name}__"))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def connected(address: str) -> Iterator[str]:
    """Connected to the Ray cluster at ``address`` (or ``auto``) for the duration; yields the
    resolved address."""
    resolved = connect(address)
    try:
        yield resolved
    finally:
        ray_module().shutdown()


def alive_nodes() -> list[RayNode]:
    """Every alive node of the connected cluster, named as the module docstring says."""
    return name_nodes(n for n in ray_module().nodes() if n.get("Alive"))


def name_nodes(raw: Iterable[Mapping[str, Any]]) -> list[RayNode]:
    """Nodes as ``ray.nodes()`` lists them, named (module docstring), in the order of names."""
    named = []
    for node in sorted(raw, key=lambda n: n["NodeID"]):
        labels = sorted(r for r in node["Resources"] if r.startswith(HOST_RESOURCE_PREFIX))
        base = labels[0][len(HOST_RESOURCE_PREFIX) :] if labels else node["NodeManagerHostname"]
        named.append((_safe_host_name(base), node))
    seen: dict[str, int] = {}
    nodes = []
    for base, node in named:
        seen[base] = seen.get(base, 0) + 1
        nodes.append(
            RayNode(
                node_id=node["NodeID"],
                host=base if seen[base] == 1 else f"{base}-{seen[base]}",
                hostname=node["NodeManagerHostname"],
                ip=node["NodeManagerAddress"],
                resources=dict(node["Resources"]),
            )
        )
    return sorted(nodes, key=lambda n: n.host)


def _safe_host_name(name: str) -> str:
    """Host names of plans and cluster files have no "/" or spaces."""
    return re.sub(r"[/\s]+", "-", name.strip()) or "node"


def pinned(node: RayNode) -> Any:
    """Node-affinity scheduling onto ``node`` that is not soft."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)


def run_on_each(
    nodes: Sequence[RayNode],
    function: Callable[..., Any],
    args_for: Callable[[RayNode], tuple[Any, ...]] = lambda node: (),
    timeout_s: float = 120.0,
) -> list[Any]:
    """``function(*args_for(node))`` on every node at once, each pinned to its node; results in
    the order of ``nodes``. A node that does not answer within ``timeout_s`` is named."""
    ray = ray_module()
    task = ray.remote(num_cpus=0, max_retries=0)(function)
    refs = [task.options(scheduling_strategy=pinned(n)).remote(*args_for(n)) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    late = [n.host for n, ref in zip(nodes, refs, strict=True) if ref not in ready]
    if late:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise RayClusterError(
            f"no answer within {timeout_s:g} s from {', '.join(late)}; is pqctl installed there "
            "(the same version, in the Python that runs Ray)?"
        )
    return [ray.get(ref) for ref in refs]


class PingEnd:
    """One end of a link measurement, as a Ray actor pinned to its node: ``serve`` answers
    every message with one byte on a REP socket bound to the node's address; ``ping`` sends
    messages of each size to another end and keeps the best round trip."""

    def __init__(self) -> None:
        import zmq

        self._zmq = zmq
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serve(self, ip: str) -> str:
        """Bind on ``ip`` (the node's address, never 0.0.0.0); returns the endpoint."""
        socket_ = self._context.socket(self._zmq.REP)
        socket_.setsockopt(self._zmq.LINGER, 0)
        port = socket_.bind_to_random_port(f"tcp://{ip}")

        def answer() -> None:
            poller = self._zmq.Poller()
            poller.register(socket_, self._zmq.POLLIN)
            while not self._stop.is_set():
                if poller.poll(100):
                    socket_.recv(copy=False)
                    socket_.send(b"k")
            socket_.close()

        self._thread = threading.Thread(target=answer, daemon=True)
        self._thread.start()
        host = f"[{ip}]" if ":" in ip else ip
        return f"tcp://{host}:{port}"

    def ping(self, endpoint: str, sizes: Sequence[int], repeats: int) -> list[tuple[int, float]]:
        """Best round trip per size, seconds (one warm-up message per size first)."""
        zmq = self._zmq
        socket_ = self._context.socket(zmq.REQ)
        socket_.setsockopt(zmq.LINGER, 0)
        socket_.setsockopt(zmq.RCVTIMEO, 10_000)
        socket_.setsockopt(zmq.SNDTIMEO, 10_000)
        socket_.connect(endpoint)
        try:
            best = []
            for size in sizes:
                payload = bytes(size)
                times = []
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    socket_.send(payload, copy=False)
                    socket_.recv()
                    times.append(time.perf_counter() - started)
                best.append((size, min(times[1:])))
            return best
        finally:
            socket_.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._context.term()


def fit_link(samples: Sequence[tuple[int, float]]) -> LinkFit:
    """Least squares of round trip = a + b·bytes; one-way latency a/2 (the reply is one byte)
    and bandwidth 1/b. A slope too small to measure (loopback) is read as 100 GB/s."""
    n = len(samples)
    mean_x = sum(s for s, _ in samples) / n
    mean_y = sum(t for _, t in samples) / n
    var = sum((s - mean_x) ** 2 for s, _ in samples)
    slope = sum((s - mean_x) * (t - mean_y) for s, t in samples) / var if var else 0.0
    intercept = mean_y - slope * mean_x
    smallest = min(samples)[1]
    latency = max(intercept, smallest * 0.1) / 2
    bandwidth = min(1e-9 / slope, 100.0) if slope > 0 else 100.0
    return LinkFit(latency_s=latency, bandwidth_gb_s=bandwidth, samples=tuple(samples))


def measure_links(
    nodes: Sequence[RayNode],
    sizes: Sequence[int] = PING_SIZES,
    repeats: int = 10,
    timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> dict[frozenset[str], LinkFit]:
    """The link between every two hosts (one node per host), one pair at a time so that pairs
    do not share the wire while measured."""
    ray = ray_module()
    actor = ray.remote(num_cpus=0, max_restarts=0)(PingEnd)
    ends = {n.host: actor.options(scheduling_strategy=pinned(n)).remote() for n in nodes}
    links: dict[frozenset[str], LinkFit] = {}
    try:
        endpoints = dict(
            zip(
                ends,
                _get(ray, [ends[n.host].serve.remote(n.ip) for n in nodes], timeout_s, nodes),
                strict=True,
            )
        )
        pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :]]
        for k, (a, b) in enumerate(pairs):
            if progress is not None:
                progress(f"link {k + 1}/{len(pairs)}: {a.host} ↔ {b.host}")
            ref = ends[a.host].ping.remote(endpoints[b.host], list(sizes), repeats)
            (samples,) = _get(ray, [ref], timeout_s, [a])
            links[frozenset((a.host, b.host))] = fit_link(samples)
    finally:
        for handle in ends.values():
            with contextlib.suppress(Exception):
                ray.get(handle.close.remote(), timeout=5)
            ray.kill(handle)
    return links


def _get(ray: Any, refs: list[Any], timeout_s: float, nodes: Sequence[RayNode]) -> list[Any]:
    try:
        return list(ray.get(refs, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError as exc:
        names = ", ".join(n.host for n in nodes)
        raise RayClusterError(f"no answer within {timeout_s:g} s from {names}") from exc
    except ray.exceptions.RayError as exc:
        names = ", ".join(n.host for n in nodes)
        raise RayClusterError(f"a link measurement failed on {names}: {exc}") from exc
