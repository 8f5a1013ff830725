"""Live device figures for the Cluster view: this host's devices sampled here
(:class:`HostSampler`), or every host's through a telemetry actor on each Ray node
(:class:`RaySampler`). Devices that cannot be sampled report nothing (None means "N/A", never
zero). Every call here blocks briefly, so the dashboard calls it from a thread worker, never from
the UI loop.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from planner.cluster import DeviceSpec
from runtime.cluster.telemetry import (
    NOT_AVAILABLE,
    CpuSampler,
    DeviceSample,
    NodeTelemetry,
    NvmlSampler,
)

__all__ = [
    "NOT_AVAILABLE",
    "CpuSampler",
    "DeviceSample",
    "HostSampler",
    "NvmlSampler",
    "RaySampler",
    "local_host_names",
]


def local_host_names() -> set[str]:
    """Names under which this host may appear in a cluster."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    return names


class HostSampler:
    """Samples the devices of a cluster that live on this host, keyed by device key."""

    def __init__(self, device_keys: Iterable[str], local_names: set[str] | None = None) -> None:
        names = local_names if local_names is not None else local_host_names()
        self.local: dict[str, int] = {}
        for key in device_keys:
            host, _, device = key.rpartition("/")
            if host in names:
                self.local[key] = -1 if device == "cpu" else int(device.removeprefix("cuda:"))
        self.cpu = CpuSampler()
        self.gpus = NvmlSampler()
        self._gpus_open = False

    def sample(self) -> dict[str, DeviceSample]:
        """A reading of every local device (others are absent from the result)."""
        if not self._gpus_open and any(i >= 0 for i in self.local.values()):
            self.gpus.open()
            self._gpus_open = True
        cpu = self.cpu.sample() if any(i < 0 for i in self.local.values()) else NOT_AVAILABLE
        return {
            key: cpu if index < 0 else self.gpus.sample(index) for key, index in self.local.items()
        }

    def close(self) -> None:
        self.gpus.close()


class RaySampler:
    """Every host's devices through a telemetry actor pinned to each Ray node (one per host of
    the cluster that Ray has), keyed by device key. Connects to Ray for its lifetime."""

    def __init__(self, address: str, devices: Sequence[DeviceSpec], timeout_s: float = 2.0) -> None:
        from runtime.cluster.ray_nodes import alive_nodes, connect, pinned, ray_module

        self.address, self.timeout_s = connect(address), timeout_s
        self._ray = ray_module()
        nodes = {n.host: n for n in alive_nodes()}
        actor = self._ray.remote(num_cpus=0, max_restarts=-1)(NodeTelemetry)
        self.actors: dict[str, Any] = {}
        self.local: dict[str, int] = {}
        for host in dict.fromkeys(d.host for d in devices):
            if host not in nodes:
                continue
            mine = [d for d in devices if d.host == host]
            gpus = [d.index for d in mine if d.index >= 0]
            self.actors[host] = actor.options(scheduling_strategy=pinned(nodes[host])).remote(
                gpus, any(d.index < 0 for d in mine)
            )
            self.local.update({d.key: d.index for d in mine})

    def sample(self) -> dict[str, DeviceSample]:
        """The latest reading of every device whose node answered within the timeout."""
        hosts = list(self.actors)
        refs = [self.actors[h].latest.remote() for h in hosts]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        samples: dict[str, DeviceSample] = {}
        for host, ref in zip(hosts, refs, strict=True):
            if ref not in ready:
                continue
            try:
                readings = self._ray.get(ref)
            except self._ray.exceptions.RayError:
                continue
            for key, index in self.local.items():
                if key.rpartition("/")[0] == host and index in readings:
                    samples[key] = DeviceSample(*readings[index])
        return samples

    def close(self) -> None:
        for handle in self.actors.values():
            with contextlib.suppress(Exception):
                self._ray.kill(handle)
        self._ray.shutdown()
