"""``pqctl profile --ray``: the profiler run on one node of each distinct device type of a Ray
cluster (a task pinned to that node, ``num_gpus=1`` for a GPU), its profile files brought back
and written where ``pqctl plan`` finds them."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from planner.cluster import DeviceSpec
from pqctl.ray_inventory import cluster_from_reports, probe_nodes
from runtime.cluster.ray_nodes import RayClusterError, connected, pinned, ray_module


@dataclass(frozen=True, slots=True)
class RemoteProfile:
    """One device type's profile: measured where, and the file written here."""

    host: str
    device: str
    device_type: str
    path: Path


def profile_on_node(request: Any, device: str) -> list[tuple[str, str]]:
    """Runs on the node: the profiler for ``device``; each profile file's name and text."""
    from pqctl.device_profiles import run_profile

    with tempfile.TemporaryDirectory(prefix="pqctl-profile-") as scratch:
        outcomes = run_profile(replace(request, devices=device, output_dir=Path(scratch)))
        return [(o.path.name, o.path.read_text()) for o in outcomes]


def ray_profiles(
    address: str, request: Any, say: Callable[[str], None] | None = None
) -> list[RemoteProfile]:
    """Profile one device of each type the Ray cluster at ``address`` has; the files go to
    ``request.output_dir``. Raises ``RayClusterError`` naming the node that failed."""
    say = say or (lambda _: None)
    ray = ray_module()
    with connected(address) as resolved:
        nodes, reports = probe_nodes(resolved, say)
        cluster, _ = cluster_from_reports(nodes, reports, {})
        chosen: dict[str, DeviceSpec] = {}
        for d in cluster.devices:
            chosen.setdefault(d.type.name, d)
        task = ray.remote(max_retries=0)(profile_on_node)
        by_host = {n.host: n for n in nodes}
        runs = []
        for name, d in chosen.items():
            device = "cpu" if d.index < 0 else f"cuda:{d.index}"
            say(f"profiling {name} on {d.host} ({device})")
            options: dict[str, Any] = {"scheduling_strategy": pinned(by_host[d.host])}
            options["num_cpus"] = 0
            if d.index >= 0:
                options["num_gpus"] = 1
            runs.append((d, device, task.options(**options).remote(request, device)))
        timeout = None if request.budget_s is None else request.budget_s * 2 + 300
        results = []
        for d, device, ref in runs:
            try:
                files = ray.get(ref, timeout=timeout)
            except ray.exceptions.GetTimeoutError as exc:
                raise RayClusterError(f"profiling {d.key} took longer than {timeout:g} s") from exc
            except ray.exceptions.RayError as exc:
                raise RayClusterError(f"profiling {d.key} failed: {exc}") from exc
            request.output_dir.mkdir(parents=True, exist_ok=True)
            for file_name, text in files:
                path = request.output_dir / file_name
                path.write_text(text)
                results.append(RemoteProfile(d.host, device, d.type.name, path))
    return results
